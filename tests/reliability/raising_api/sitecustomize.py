"""Test-only: an API with one extra route, `GET /test/raise`, that raises an unexpected error.

Every real route turns bad input into a 4xx, so nothing in the service raises on demand;
the keep-alive test puts this directory first on one API process's PYTHONPATH. Python
imports `sitecustomize` at start-up; it hooks the import of `service.api.app` and wraps
`create_app` so the app it builds has that route. Everything else (uvicorn, the middleware
stack, the error handlers) is the real path.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

RAISE_ROUTE = "/test/raise"


def _add_route(module: ModuleType) -> None:
    original = module.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)

        @app.get(RAISE_ROUTE)
        def _raise() -> None:
            raise RuntimeError("an unexpected failure inside a route")

        return app

    setattr(module, "create_app", create_app)  # noqa: B010


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "service.api.app":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.loader is not None
        loader: Any = spec.loader
        execute = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            _add_route(module)

        loader.exec_module = exec_module
        return spec


if os.environ.get("SECO_TEST_RAISE_ROUTE") == "1":
    sys.meta_path.insert(0, _Finder())
