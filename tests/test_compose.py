"""docker-compose.yml gives every GPU worker its share of host memory for KV offload.

Why: each worker container sees one GPU, so a worker without SECO_HOST_MEMORY_BUDGET
plans with all of the host's available RAM (its share is RAM / visible GPUs = all of
it), and several workers offloading at once would pin more than the host has.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.record.settings import Settings

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"
DEFAULT = re.compile(r"^\$\{(?P<name>[A-Z0-9_]+):-(?P<default>[^}]*)\}$")


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _workers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("command", [])[:2] == ["seco", "worker"]}


def _default(value: str) -> str:
    """The value compose uses when the variable is unset (`${NAME:-default}`)."""
    m = DEFAULT.match(str(value))
    return m.group("default") if m else str(value)


def test_every_worker_has_a_host_memory_budget_and_together_they_fit_the_stated_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compose = _compose()
    workers = _workers(compose)
    assert workers, "docker-compose.yml runs no `seco worker`"
    budgets = {}
    for name, svc in workers.items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert [len(d["device_ids"]) for d in devices] == [1], f"{name} should see exactly one GPU"
        env = svc["environment"]
        assert "SECO_HOST_MEMORY_BUDGET" in env, f"{name} plans KV offload with all of the host's RAM"
        # What the worker itself reads from that value (the real settings path).
        monkeypatch.setenv("SECO_HOST_MEMORY_BUDGET", _default(env["SECO_HOST_MEMORY_BUDGET"]))
        budgets[name] = Settings().host_memory_budget_bytes
    assert all(b is not None and b > 0 for b in budgets.values())
    host, reserve = int(compose["x-host-memory-bytes"]), int(compose["x-host-reserve-bytes"])
    total = sum(b for b in budgets.values() if b)
    assert total + reserve <= host, (
        f"the workers' host budgets ({total / 2**30:.1f} GiB) and the reserve ({reserve / 2**30:.1f} GiB) "
        f"exceed the stated host ({host / 2**30:.1f} GiB)"
    )
    assert reserve >= 8 * 2**30  # OS, Redis, MinIO, API and each worker's own process


def _serving(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("command", [])[:2] == ["seco", "serve"]}


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_api_forwards_completions_to_the_inference_service_that_runs_seco_serve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The API's SECO_INFERENCE_URL names the `seco serve` service at the port it listens on; that
    service reaches the object store and the models as the workers do, answers its health check
    on that port, and publishes no port (adapter loading is part of its API: only the API may
    call it)."""
    compose = _compose()
    serving = _serving(compose)
    assert len(serving) == 1, "docker-compose.yml runs no `seco serve`"
    (name, inference), api = next(iter(serving.items())), compose["services"]["api"]
    port = _flag(inference["command"], "--port")
    assert _flag(inference["command"], "--host") == "0.0.0.0"
    monkeypatch.setenv("SECO_INFERENCE_URL", api["environment"]["SECO_INFERENCE_URL"])
    assert Settings().inference_url == f"http://{name}:{port}"  # as the API reads it
    assert "ports" not in inference
    assert f"127.0.0.1:{port}/health" in " ".join(inference["healthcheck"]["test"])
    worker = next(iter(_workers(compose).values()))
    for var in ("SECO_STORAGE_URL", "AWS_ENDPOINT_URL", "AWS_SECRET_ACCESS_KEY", "SECO_MODELS"):
        assert inference["environment"][var] == worker["environment"][var], var
    models = [v for v in worker["volumes"] if str(v).endswith(":/models:ro")]
    assert models and models[0] in inference["volumes"]


def test_a_worker_sharing_the_inference_gpu_plans_without_the_inference_share() -> None:
    """A worker on the inference process's GPU carries the same SECO_SERVE_MEMORY_BYTES, so its
    memory plan leaves free what the inference process may take."""
    compose = _compose()
    (inference,) = _serving(compose).values()
    gpus = {
        _default(d) for dev in inference["deploy"]["resources"]["reservations"]["devices"] for d in dev["device_ids"]
    }
    share = inference["environment"]["SECO_SERVE_MEMORY_BYTES"]
    assert int(_default(share)) > 0
    for name, worker in _workers(compose).items():
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        if gpus & {_default(d) for dev in devices for d in dev["device_ids"]}:
            assert worker["environment"].get("SECO_SERVE_MEMORY_BYTES") == share, name
