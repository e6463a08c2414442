"""Which side may import what, checked on every import statement of the source tree.

The library is the ground floor, the worker a recipe on top of it, the service in
three sides: the client must run on a laptop (standard library and httpx), the shared
record must not pull in the API or torch, and the worker must not depend on the API.
No import runs back up the tree: the API reaches the workers through the queue's contract
(`service.record.queue`), never by importing `worker`.
Function-level (lazy) imports count too: a rule broken inside a function still breaks
a deployment that lacks the package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)

# package -> (allowed third-party or project top-level names, forbidden dotted prefixes)
RULES: dict[str, tuple[set[str], tuple[str, ...]]] = {
    # the library: torch, transformers and peft (and psutil, which peft requires: the host's free
    # memory for the plan, a process's RSS where /proc is missing); tools on it live in benchmarks/
    "seco_core": ({"seco_core", "torch", "transformers", "peft", "psutil"}, ()),
    "benchmarks": ({"benchmarks", "seco_core", "torch", "transformers", "peft", "tokenizers", "matplotlib"}, ()),
    "service/record": (
        {"service", "redis", "pydantic", "pydantic_settings", "obstore", "celery"},
        ("service.api", "service.client", "service.inference"),
    ),
    "service/client": ({"service", "httpx"}, ("service.api", "service.record", "service.launch")),
    "service/api": (
        {
            "service",
            "fastapi",
            "starlette",
            "pydantic",
            "redis",
            "python_multipart",
            "prometheus_client",
            "swagger_ui_bundle",
            "seco_core",
            "httpx",  # the inference process's client (service/api/inference.py)
        },
        ("service.client", "service.inference"),
    ),
    # the inference process (`seco serve`): the models and the engine, storage to fetch adapters from;
    # it answers the API over HTTP and imports none of it (nor the CLI)
    "service/inference": (
        {"service", "torch", "transformers", "peft", "seco_core", "fastapi", "starlette"},
        ("service.api", "service.client", "service.launch"),
    ),
    "worker": (
        {"worker", "service", "seco_core", "celery", "redis", "torch", "transformers", "peft", "safetensors"},
        ("service.api", "service.client"),
    ),
}

ONLY: dict[str, dict[str, tuple[str, ...]]] = {
    "service/api": {"seco_core": ("seco_core.job_config",)},
}
"""package -> {allowed top-level name: the only modules of it that package may import}. The API
takes a job's configuration from the library (its defaults and rules, stated once) but no
more: the rest of seco_core is torch."""


def imported_names(path: Path) -> set[str]:
    """Dotted names of every absolute import in a module, at any depth."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", sorted(RULES))
def test_imports_respect_the_layout(package: str) -> None:
    allowed, forbidden = RULES[package]
    problems = []
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    for path in files:
        for name in sorted(imported_names(path)):
            top = name.split(".")[0]
            if top == "__future__" or top in STDLIB:
                continue
            if top not in allowed or any(name == f or name.startswith(f + ".") for f in forbidden):
                problems.append(f"{path.relative_to(ROOT)} imports {name}")
            only = ONLY.get(package, {}).get(top)
            if only is not None and not any(name == m or name.startswith(m + ".") for m in only):
                problems.append(f"{path.relative_to(ROOT)} imports {name} (of {top}, only {', '.join(only)})")
    assert not problems, "\n".join(problems)


def test_the_api_imports_no_worker_module() -> None:
    """Stated on its own: the API publishes jobs through `service.record.queue` and deploys without
    the worker's code (the `api` extra has no torch)."""
    found = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / "service" / "api").rglob("*.py"))
        for name in sorted(imported_names(path))
        if name == "worker" or name.startswith("worker.")
    ]
    assert not found, "\n".join(found)


def test_only_the_queue_contract_imports_celery_in_the_record() -> None:
    """Celery is how a job reaches a worker; the rest of the shared record knows nothing of it."""
    found = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "service" / "record").rglob("*.py"))
        if any(n.split(".")[0] == "celery" for n in imported_names(path))
    ]
    assert found == ["service/record/queue.py"], found


def test_install_extras_per_side() -> None:
    """`api` installs no training stack, `client` nothing beyond the bare package, `serve` the inference
    process's models, `server` all of them."""
    tomllib = pytest.importorskip("tomllib")  # 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(reqs: list[str]) -> set[str]:
        return {r.split("[")[0].split(">")[0].split("=")[0].strip() for r in reqs}

    training = {"torch", "transformers", "peft"}
    assert not names(extras["api"]) & training, "the API side never imports torch"
    assert training <= names(extras["worker"])
    assert extras["client"] == [] and names(project["dependencies"]) == {"httpx"}
    assert "seco-tune[api,worker]" in extras["server"]
    assert {"torch", "transformers", "peft", "fastapi", "uvicorn"} <= names(extras["serve"])
    assert "seco-tune[serve]" in extras["server"]


def test_the_api_loads_no_torch() -> None:
    """The import rules see statements; this sees what importing the API really loads (seco_core's
    package body included: it must not pull torch in for `seco_core.job_config`)."""
    code = (
        "import sys\n"
        "import service.api.app\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
