"""`seco jobs`, `status`, `cancel`, `pause`, `resume`, `events`: one job (or the list) at a time."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from service.client.commands.base import EXIT_OK, command, emit, queue_text
from service.client.format import age, clock, datetime_text, human_bytes, human_duration, job_progress, table
from service.client.http import Client


def register(sub: Any, conn: argparse.ArgumentParser) -> None:
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

    p = sub.add_parser(
        "pause",
        parents=[conn],
        help="pause a job (a running one stops after its current step, with a checkpoint, and frees its worker)",
    )
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


@command
def cmd_jobs(args: argparse.Namespace, client: Client) -> int:
    jobs = client.jobs(args.limit)
    if args.json:
        emit(json.dumps(jobs, indent=2))
        return EXIT_OK
    if not jobs:
        emit("No jobs yet. Start one with: seco submit FILE --model NAME")
        return EXIT_OK
    now = time.time()
    rows = [[j["id"], j["model"], _status_text(j), job_progress(j), age(j.get("created_at"), now)] for j in jobs]
    emit(table(["ID", "MODEL", "STATUS", "PROGRESS", "AGE"], rows))
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
        emit(json.dumps(job, indent=2))
        return EXIT_OK
    now = time.time()
    rows: list[tuple[str, Any]] = [
        ("id", job["id"]),
        ("status", _status_text(job) + (f" {queue_text(job)}" if job.get("queue_position") else "")),
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
    emit("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows if v not in (None, "")))
    return EXIT_OK


def _eta_text(ts: int | None, now: float) -> str | None:
    return f"{clock(ts)} (in {human_duration(ts - now)})" if ts else None


@command
def cmd_cancel(args: argparse.Namespace, client: Client) -> int:
    job = client.cancel(args.job_id)
    if job["status"] == "cancelled":
        emit(f"Cancelled {job['id']}")
    else:
        emit(f"Cancellation requested: {job['id']} stops after its current step (watch: seco follow {job['id']})")
    return EXIT_OK


@command
def cmd_pause(args: argparse.Namespace, client: Client) -> int:
    job = client.pause(args.job_id)
    if job["status"] == "paused":
        emit(f"Paused {job['id']} (continue it with: seco resume {job['id']})")
    else:
        emit(
            f"Pause requested: {job['id']} stops after its current step, with a checkpoint "
            f"(watch: seco follow {job['id']})"
        )
    return EXIT_OK


@command
def cmd_resume(args: argparse.Namespace, client: Client) -> int:
    job = client.resume(args.job_id)
    emit(f"Resumed {job['id']}: {job['status']} {queue_text(job)}".rstrip())
    return EXIT_OK


def event_line(ev: dict[str, Any]) -> str:
    level = ev.get("level", "info")
    return f"{datetime_text(ev.get('created_at'))}  {'' if level == 'info' else level.upper() + ': '}{ev['message']}"


@command
def cmd_events(args: argparse.Namespace, client: Client) -> int:
    events = client.events(args.job_id, args.limit)
    for ev in events:
        emit(json.dumps(ev) if args.json else event_line(ev))
    return EXIT_OK
