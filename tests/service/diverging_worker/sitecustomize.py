"""Test-only: a worker whose training step `SECO_TEST_DIVERGE_AT` gets a NaN gradient.

The tiny demo model on CPU does not diverge on its own within the API's bounds (its norms
keep activations finite and AdamW's updates are bounded by the learning rate), so the
divergence test puts this directory first on the PYTHONPATH of one Celery worker. Python
imports `sitecustomize` at start-up; it hooks the import of `worker.trainer` (in the pool
child, where torch is first imported) and wraps its step function so that, at that step,
one LoRA weight's gradient becomes NaN after the real backward. Everything else (Celery,
Redis, the training loop and its check, storage) is the real path.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import math
import os
import sys
from types import ModuleType
from typing import Any

DIVERGE_AT = int(os.environ.get("SECO_TEST_DIVERGE_AT", "0"))


def _poison(module: ModuleType) -> None:
    original = module._optimizer_step

    def step(model: Any, windows: Any, config: Any, spec: Any, number: int, *rest: Any) -> Any:
        out = original(model, windows, config, spec, number, *rest)
        if number == DIVERGE_AT:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = math.nan
        return out

    setattr(module, "_optimizer_step", step)  # noqa: B010


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "worker.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.loader is not None
        loader: Any = spec.loader
        execute = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            _poison(module)

        loader.exec_module = exec_module
        return spec


if DIVERGE_AT:
    sys.meta_path.insert(0, _Finder())
