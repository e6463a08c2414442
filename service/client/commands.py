"""Client commands of `seco`: submit, jobs, status, cancel, events, follow, download, bench.

They talk HTTP only, through `service.client.http` (stdlib + httpx), so they run on a laptop
that has neither torch nor the server stack; `seco bench` alone needs torch, and says so.
The server is `--url` or SECO_URL (default http://127.0.0.1:8000), the key `--api-key`
or SECO_API_KEY. Any failure prints one line (the server's own message when it sent
one) and exits non-zero; a traceback is never the answer.

Exit codes: 0 success, 1 an error or a failed job, 2 a usage error, 3 a cancelled job,
130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

from service.client.format import (
    ProgressLine,
    age,
    clock,
    datetime_text,
    human_bytes,
    human_duration,
    job_progress,
    table,
)
from service.client.http import Client, ClientError
from service.client.sse import follow_events

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED, EXIT_INTERRUPTED = 0, 1, 3, 130
JOB_EXIT = {"succeeded": EXIT_OK, "failed": EXIT_ERROR, "cancelled": EXIT_CANCELLED}

Command = Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------- registration


def register(sub: Any) -> None:
    """Add the client subcommands to `seco`'s subparsers (called by service.client.cli)."""
    conn = argparse.ArgumentParser(add_help=False)
    g = conn.add_argument_group("server")
    g.add_argument("--url", help="server root URL (default: $SECO_URL or http://127.0.0.1:8000)")
    g.add_argument("--api-key", help="API key (default: $SECO_API_KEY)")

    p = sub.add_parser(
        "submit",
        parents=[conn],
        help="upload a JSONL file and start a fine-tuning job",
        description="Upload FILE (or use an uploaded file id) and create a job; prints its id.",
    )
    p.add_argument("file", help="training data: a local .jsonl file, or the id of an uploaded file")
    p.add_argument("--model", required=True, help="base model name offered by the server (see /v1/models)")
    p.add_argument("--validation-file", help="validation data: a local .jsonl file or a file id")
    hp = p.add_argument_group("hyperparameters")
    hp.add_argument("--epochs", type=_int_or_auto, help="passes over the data (default: auto)")
    hp.add_argument("--batch-size", type=_int_or_auto, help="windows (dpo: pairs) per optimizer step (default: auto)")
    hp.add_argument("--lr-multiplier", type=_float_or_auto, help="scales the base learning rate (default: auto)")
    hp.add_argument("--method", choices=["supervised", "dpo"], help="dpo: preference pairs (default: supervised)")
    hp.add_argument("--beta", type=_float_or_auto, help="dpo: how far the policy may move from the reference "
                    "(default: auto = 0.1)")  # fmt: skip
    hp.add_argument("--suffix", help="added to the fine-tuned model's name")
    hp.add_argument("--seed", type=int)
    hp.add_argument("--metadata", action="append", metavar="KEY=VALUE", default=[], help="repeatable")
    sc = p.add_argument_group("SeCO / SpaCO")
    sc.add_argument("--mode", choices=["seco", "spaco"], help="seco: exact gradients; spaco: a subset of chunks")
    sc.add_argument("--chunk-size", type=int, help="tokens per chunk (default: from the memory plan)")
    sc.add_argument("--max-length", type=int, help="tokens per training window (default: the model's context)")
    sc.add_argument("--budget", type=int, help="spaco: chunks back-propagated per sequence")
    sc.add_argument("--sampling", choices=["bernoulli", "fixed"], help="spaco: bernoulli is unbiased")
    sc.add_argument("--max-compensation", type=float, help="spaco: cap on the compensation factor")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora-r", type=int)
    lo.add_argument("--lora-alpha", type=float)
    lo.add_argument("--lora-dropout", type=float)
    lo.add_argument("--lora-target-modules", help="comma-separated module names (default: attention projections)")
    p.add_argument("--follow", "-f", action="store_true", help="then follow it live until it finishes")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", parents=[conn], help="list your fine-tuning jobs")
    p.add_argument("--limit", type=int, default=20, help="how many, newest first (default 20)")
    p.add_argument("--json", action="store_true", help="print the raw job objects")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("status", parents=[conn], help="show one job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="print the raw job object")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", parents=[conn], help="cancel a job (a running one stops after its current step)")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("pause", parents=[conn], help="pause a job (a running one stops after its current step, "
                       "with a checkpoint, and frees its worker)")  # fmt: skip
    p.add_argument("job_id")
    p.set_defaults(func=cmd_pause)

    p = sub.add_parser("resume", parents=[conn], help="resume a paused job from its last checkpoint")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("events", parents=[conn], help="print a job's events, oldest first")
    p.add_argument("job_id")
    p.add_argument("--limit", type=int, default=100, help="the newest N events (default 100)")
    p.add_argument("--json", action="store_true", help="one JSON event per line")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser(
        "follow",
        parents=[conn],
        help="watch a job live: progress, loss, memory, messages",
        description="Exit code: 0 if the job succeeds, 1 if it fails, 3 if it is cancelled.",
    )
    p.add_argument("job_id")
    p.set_defaults(func=cmd_follow)

    p = sub.add_parser("download", parents=[conn], help="download and extract a job's LoRA adapter")
    p.add_argument("job_id")
    p.add_argument("-o", "--output", type=Path, help="directory to extract into (default ./<job id>-adapter)")
    p.add_argument("--force", action="store_true", help="extract into a non-empty directory")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser(
        "bench",
        add_help=False,
        help="run the chunk-wise training benchmark (needs torch; --help for its options)",
        description="Runs `python -m benchmarks.bench` with the arguments given.",
    )
    p.__class__ = _PassThroughParser  # every argument, options included, goes to benchmarks.bench


class _PassThroughParser(argparse.ArgumentParser):
    """A subcommand parser that hands all of its arguments to another program, unparsed.

    argparse's REMAINDER cannot start with an option (`seco bench --lengths 1024` would be
    "unrecognized arguments"), so the bench subparser collects them itself.
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace = namespace if namespace is not None else argparse.Namespace()
        namespace.args = list(args if args is not None else [])
        namespace.func = cmd_bench
        return namespace, []


def _int_or_auto(v: str) -> int | str:
    return "auto" if v == "auto" else int(v)


def _float_or_auto(v: str) -> float | str:
    return "auto" if v == "auto" else float(v)


def command(fn: Callable[[argparse.Namespace, Client], int]) -> Command:
    """Run `fn` with a client; turn failures into one line on stderr and an exit code."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            with Client(args.url, args.api_key) as client:
                return fn(args, client)
        except ClientError as e:
            print(f"seco: error: {e}", file=sys.stderr)
            return EXIT_ERROR
        except OSError as e:  # a local file that cannot be read or written
            print(f"seco: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            print("\nseco: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED

    return run


def _emit(text: str = "", file: TextIO | None = None) -> None:
    print(text, file=file or sys.stdout, flush=True)


# --------------------------------------------------------------------------- submit


def _file_id(client: Client, ref: str, what: str, uploaded: list[str]) -> str:
    """Upload a local file (its id is appended to `uploaded`), or pass through an uploaded file's id."""
    path = Path(ref)
    if path.is_file():
        obj = client.upload(path)
        uploaded.append(str(obj["id"]))
        _emit(f"Uploaded {path.name} as {obj['id']} ({human_bytes(obj.get('bytes'))})", sys.stderr)
        return str(obj["id"])
    if ref.startswith("file-") and "/" not in ref:
        return ref
    raise ClientError(f"{what}: no such file: {ref}")


def job_body(args: argparse.Namespace, training_file: str, validation_file: str | None) -> dict[str, Any]:
    """The create-job request; only the options given are sent, so the server's defaults apply."""
    body: dict[str, Any] = {"model": args.model, "training_file": training_file}
    if validation_file:
        body["validation_file"] = validation_file
    hp = {"n_epochs": args.epochs, "batch_size": args.batch_size, "learning_rate_multiplier": args.lr_multiplier}
    if args.beta is not None and args.method != "dpo":
        raise ClientError("--beta applies to --method dpo")
    if args.method == "dpo":  # OpenAI's method object carries a DPO job's hyperparameters, beta included
        hp["beta"] = args.beta
        body["method"] = {"type": "dpo", "dpo": {"hyperparameters": {k: v for k, v in hp.items() if v is not None}}}
    elif hp := {k: v for k, v in hp.items() if v is not None}:
        body["hyperparameters"] = hp
    for name in ("suffix", "seed"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.metadata:
        pairs = [m.partition("=") for m in args.metadata]
        if bad := [k for k, eq, _ in pairs if not eq or not k]:
            raise ClientError(f"--metadata takes KEY=VALUE (got {bad[0]!r})")
        body["metadata"] = {k: v for k, _, v in pairs}
    seco = {k: getattr(args, k) for k in ("mode", "chunk_size", "max_length", "budget", "sampling",
                                          "max_compensation") if getattr(args, k) is not None}  # fmt: skip
    lora = {k: getattr(args, f"lora_{k}") for k in ("r", "alpha", "dropout") if getattr(args, f"lora_{k}") is not None}
    if args.lora_target_modules:
        lora["target_modules"] = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
    if lora:
        seco["lora"] = lora
    if seco:
        body["seco"] = seco
    return body


@command
def cmd_submit(args: argparse.Namespace, client: Client) -> int:
    """Prints the job id alone on stdout (`JOB=$(seco submit ...)`); the rest goes to stderr."""
    uploaded: list[str] = []
    try:
        training = _file_id(client, args.file, "FILE", uploaded)
        validation = (
            _file_id(client, args.validation_file, "--validation-file", uploaded) if args.validation_file else None
        )
        job = client.create_job(job_body(args, training, validation))
    except ClientError:
        for file_id in uploaded:  # no job will use them: don't leave them taking up the quota
            with contextlib.suppress(ClientError):
                client.delete_file(file_id)
        raise
    _emit(job["id"])
    _emit(f"Created job {job['id']} on {job['model']}: {job['status']} {_queue_text(job)}".rstrip(), sys.stderr)
    if not args.follow:
        _emit(f"Watch it with: seco follow {job['id']}", sys.stderr)
        return EXIT_OK
    return follow_job(client, job["id"])


def _queue_text(job: dict[str, Any]) -> str:
    return f"(#{job['queue_position']} in queue)" if job.get("queue_position") else ""


# --------------------------------------------------------------------------- jobs, status, cancel, events


@command
def cmd_jobs(args: argparse.Namespace, client: Client) -> int:
    jobs = client.jobs(args.limit)
    if args.json:
        _emit(json.dumps(jobs, indent=2))
        return EXIT_OK
    if not jobs:
        _emit("No jobs yet. Start one with: seco submit FILE --model NAME")
        return EXIT_OK
    now = time.time()
    rows = [[j["id"], j["model"], _status_text(j), job_progress(j), age(j.get("created_at"), now)] for j in jobs]
    _emit(table(["ID", "MODEL", "STATUS", "PROGRESS", "AGE"], rows))
    return EXIT_OK


def _status_text(job: dict[str, Any]) -> str:
    if job["status"] != "running":
        return str(job["status"])
    if job.get("cancel_requested"):
        return "running (cancelling)"
    return "running (pausing)" if job.get("pause_requested") else "running"


def _kv(pairs: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in pairs.items() if v is not None and not isinstance(v, dict))


@command
def cmd_status(args: argparse.Namespace, client: Client) -> int:
    job = client.job(args.job_id)
    if args.json:
        _emit(json.dumps(job, indent=2))
        return EXIT_OK
    now = time.time()
    rows: list[tuple[str, Any]] = [
        ("id", job["id"]),
        ("status", _status_text(job) + (f" {_queue_text(job)}" if job.get("queue_position") else "")),
        ("model", job["model"]),
        ("fine-tuned model", job.get("fine_tuned_model")),
        ("progress", job_progress(job) if job.get("progress") is not None else None),
        ("estimated finish", _eta_text(job.get("estimated_finish"), now)),
        ("created", f"{datetime_text(job['created_at'])} ({age(job['created_at'], now)} ago)"),
        ("started", datetime_text(job.get("started_at")) if job.get("started_at") else None),
        ("finished", datetime_text(job.get("finished_at")) if job.get("finished_at") else None),
        ("trained tokens", f"{job['trained_tokens']:,}" if job.get("trained_tokens") else None),
        ("peak memory", human_bytes(job["peak_memory_bytes"]) if job.get("peak_memory_bytes") else None),
        ("training file", job.get("training_file")),
        ("validation file", job.get("validation_file")),
        ("method", (job.get("method") or {}).get("type")),
        ("hyperparameters", _kv(job.get("hyperparameters") or {})),
        ("seco", _kv(job.get("seco") or {})),
        ("lora", _kv((job.get("seco") or {}).get("lora") or {})),
        ("result files", ", ".join(job.get("result_files") or []) or None),
        ("attempts", job.get("attempts") or None),
    ]
    if job.get("error"):
        rows.append(("error", f"{job['error'].get('message')} ({job['error'].get('code')})"))
    width = max(len(k) for k, _ in rows)
    _emit("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows if v not in (None, "")))
    return EXIT_OK


def _eta_text(ts: int | None, now: float) -> str | None:
    return f"{clock(ts)} (in {human_duration(ts - now)})" if ts else None


@command
def cmd_cancel(args: argparse.Namespace, client: Client) -> int:
    job = client.cancel(args.job_id)
    if job["status"] == "cancelled":
        _emit(f"Cancelled {job['id']}")
    else:
        _emit(f"Cancellation requested: {job['id']} stops after its current step (watch: seco follow {job['id']})")
    return EXIT_OK


@command
def cmd_pause(args: argparse.Namespace, client: Client) -> int:
    job = client.pause(args.job_id)
    if job["status"] == "paused":
        _emit(f"Paused {job['id']} (continue it with: seco resume {job['id']})")
    else:
        _emit(f"Pause requested: {job['id']} stops after its current step, with a checkpoint "
              f"(watch: seco follow {job['id']})")  # fmt: skip
    return EXIT_OK


@command
def cmd_resume(args: argparse.Namespace, client: Client) -> int:
    job = client.resume(args.job_id)
    _emit(f"Resumed {job['id']}: {job['status']} {_queue_text(job)}".rstrip())
    return EXIT_OK


def event_line(ev: dict[str, Any]) -> str:
    level = ev.get("level", "info")
    return f"{datetime_text(ev.get('created_at'))}  {'' if level == 'info' else level.upper() + ': '}{ev['message']}"


@command
def cmd_events(args: argparse.Namespace, client: Client) -> int:
    events = client.events(args.job_id, args.limit)
    for ev in events:
        _emit(json.dumps(ev) if args.json else event_line(ev))
    return EXIT_OK


# --------------------------------------------------------------------------- follow


class FollowView:
    """Lifecycle messages as lines; training progress as one line, redrawn in place on a terminal."""

    def __init__(self, out: TextIO, live: bool | None = None) -> None:
        self.out = out
        self.live = out.isatty() if live is None else live
        encoding = (getattr(out, "encoding", None) or "ascii").lower()
        self.progress = ProgressLine(unicode=encoding.startswith("utf"))
        self._drawn = False

    def _clear(self) -> None:
        if self._drawn:
            self.out.write("\r\x1b[K")
            self._drawn = False

    def _draw(self) -> None:
        if self.progress.step:
            width = shutil.get_terminal_size((120, 24)).columns - 1
            self.out.write(self.progress.render()[:width])
            self._drawn = True
        self.out.flush()

    def event(self, ev: dict[str, Any]) -> None:
        if ev.get("type") == "metrics" and isinstance(ev.get("data"), dict):
            self.progress.update(ev["data"])
            if self.live:
                self._clear()
                self._draw()
            else:
                self.line(self.progress.render())
            return
        level = ev.get("level", "info")
        self.line(f"{clock(ev.get('created_at'))}  {'' if level == 'info' else level.upper() + ': '}{ev['message']}")

    def line(self, text: str) -> None:
        self._clear()
        self.out.write(text + "\n")
        if self.live:
            self._draw()
        self.out.flush()

    def reconnecting(self, reason: str, delay: float) -> None:
        when = f"in {delay:.0f}s" if delay >= 1 else "now"
        self.line(f"{clock(time.time())}  (stream interrupted: {reason}; resuming after the last event {when})")

    def close(self) -> None:
        if self._drawn:
            self.out.write("\n")
            self._drawn = False
        self.out.flush()


def follow_job(client: Client, job_id: str, out: TextIO | None = None) -> int:
    """Stream the job's events until it finishes; the exit code says how it ended."""
    out = out or sys.stdout
    job = client.job(job_id)
    view = FollowView(out)
    view.line(f"Following {job_id} ({job['model']}, {job['status']}); Ctrl-C stops following, not the job")
    try:
        for kind, data in follow_events(client, job_id, on_reconnect=view.reconnecting):
            if kind == "end":
                break
            view.event(data)
    except KeyboardInterrupt:
        view.close()
        print(f"Stopped following; the job goes on (seco cancel {job_id} stops it)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        view.close()
    return finish_line(client.job(job_id), out)


def finish_line(job: dict[str, Any], out: TextIO) -> int:
    status = job["status"]
    if status == "succeeded":
        extra = []
        if job.get("finished_at") and job.get("started_at"):
            extra.append(f"in {human_duration(job['finished_at'] - job['started_at'])}")
        if job.get("trained_tokens"):
            extra.append(f"{job['trained_tokens']:,} tokens")
        if job.get("peak_memory_bytes"):
            extra.append(f"peak memory {human_bytes(job['peak_memory_bytes'])}")
        out.write(f"Job {job['id']} succeeded ({', '.join(extra)}): {job.get('fine_tuned_model')}\n")
        out.write(f"Download the adapter: seco download {job['id']}\n")
    elif status == "failed":
        err = job.get("error") or {}
        out.write(f"Job {job['id']} failed: {err.get('message', 'no error message')}\n")
    else:
        out.write(f"Job {job['id']} {status}\n")
    out.flush()
    return JOB_EXIT.get(status, EXIT_ERROR)


@command
def cmd_follow(args: argparse.Namespace, client: Client) -> int:
    return follow_job(client, args.job_id)


# --------------------------------------------------------------------------- download


def safe_extract(archive: Path, dest: Path) -> list[str]:
    """Extract regular files and directories of a .tar.gz under `dest`; refuse anything else.

    An archive is data from the network: absolute names, `..`, links and device files
    could write outside `dest` (or point there later), so any of them fails the whole
    extraction before a byte is written.
    """
    dest = dest.resolve()
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            parts = PurePosixPath(m.name).parts
            if m.name.startswith(("/", "\\")) or ".." in parts or "\\" in m.name or not (m.isfile() or m.isdir()):
                raise ClientError(f"refusing to extract {m.name!r}: the adapter archive may only hold plain files")
            if not (dest / m.name).resolve().is_relative_to(dest):
                raise ClientError(f"refusing to extract {m.name!r}: it would land outside {dest}")
        names = []
        for m in members:
            target = dest / m.name
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None  # a regular file always has content
            with src, target.open("wb") as f:
                shutil.copyfileobj(src, f)
            names.append(str(PurePosixPath(m.name)))
    return names


@command
def cmd_download(args: argparse.Namespace, client: Client) -> int:
    job = client.job(args.job_id)
    dest: Path = args.output or Path(f"{job['id']}-adapter")
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not args.force)):
        raise ClientError(f"{dest} exists and is not empty (choose another -o, or pass --force)")
    parent = dest.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    # Download next to the destination and create it only once the archive is here: a
    # refused or interrupted download leaves nothing behind.
    with tempfile.TemporaryDirectory(prefix=".seco-download-", dir=parent) as tmp:
        archive = Path(tmp) / "adapter.tar.gz"
        with archive.open("wb") as f:
            size = client.download_adapter(job["id"], f)
        dest.mkdir(exist_ok=True)
        try:
            names = safe_extract(archive, dest)
        except (tarfile.TarError, EOFError) as e:
            raise ClientError(f"the downloaded adapter is not a valid .tar.gz: {e}") from None
    _emit(f"Extracted {len(names)} files ({human_bytes(size)}) to {dest}/: {', '.join(sorted(names))}")
    _emit(f'Load it (BASE: the weights of {job["model"]!r}): '
          f'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "{dest}")')  # fmt: skip
    return EXIT_OK


# --------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    """Delegate to `python -m benchmarks.bench` (a subprocess: its exit code is ours)."""
    # find_spec on top-level names only: it locates them without importing torch here.
    missing = [m for m in ("torch", "seco_core") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"seco: error: `seco bench` runs the training library locally and needs {', '.join(missing)}; "
              "install the server extras: pip install 'seco-tune[server]'", file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    try:
        return subprocess.call([sys.executable, "-m", "benchmarks.bench", *args.args])
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
