"""`seco follow`: a job's events live, progress redrawn in place, until it finishes."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from typing import Any, TextIO

from service.client.commands.base import EXIT_ERROR, EXIT_INTERRUPTED, JOB_EXIT, command
from service.client.format import ProgressLine, clock, human_bytes, human_duration
from service.client.http import Client
from service.client.sse import follow_events


def register(sub: Any, conn: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "follow",
        parents=[conn],
        help="watch a job live: progress, loss, memory, messages",
        description="Exit code: 0 if the job succeeds, 1 if it fails, 3 if it is cancelled.",
    )
    p.add_argument("job_id")
    p.set_defaults(func=cmd_follow)


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
