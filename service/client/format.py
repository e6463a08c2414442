"""Plain-text rendering for the `seco` CLI: tables, sizes, ages and the live progress line.

No third-party dependency: a progress bar is one line of text, redrawn with `\\r` on a
terminal and printed once per step otherwise (so logs and CI output stay readable).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float | None) -> str:
    """`1:02:03`, `2:03` or `-`."""
    if seconds is None or seconds < 0:
        return "-"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def age(created_at: int | None, now: float | None = None) -> str:
    """How long ago, in the largest whole unit: `45s`, `3m`, `2h`, `4d`."""
    if not created_at:
        return "-"
    d = max(0, int((now if now is not None else time.time()) - created_at))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if d >= size:
            return f"{d // size}{unit}"
    return f"{d}s"


def clock(ts: int | float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "--:--:--"


def datetime_text(ts: int | float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def bar(fraction: float, width: int = 24, unicode: bool = True) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full, empty = ("█", "░") if unicode else ("#", "-")
    filled = round(fraction * width)
    return full * filled + empty * (width - filled)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in [headers, *rows]]
    return "\n".join(lines)


def job_progress(job: dict[str, Any]) -> str:
    """`45% (9/20)` while running, `100%` when done, `#3 in queue` while queued."""
    if job.get("status") == "queued" and job.get("queue_position"):
        return f"#{job['queue_position']} in queue"
    progress = job.get("progress")
    if progress is None:
        return "-"
    text = f"{progress * 100:.0f}%"
    if job.get("step") is not None and job.get("total_steps") and job.get("status") == "running":
        text += f" ({job['step']}/{job['total_steps']})"
    return text


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _newer(value: Any, old: float | None) -> float | None:
    """A metric that is absent from this step's event (validation loss) keeps its last value."""
    v = _num(value)
    return v if v is not None else old


@dataclass
class ProgressLine:
    """The state behind the one-line live view of a training job, fed with metrics events."""

    unicode: bool = True
    step: int = 0
    total: int | None = None
    train_loss: float | None = None
    valid_loss: float | None = None
    token_accuracy: float | None = None
    """Supervised jobs: the step's training token accuracy (share of targets predicted right)."""
    peak_bytes: float | None = None
    tokens_per_second: float | None = None
    reward_margin: float | None = None
    """DPO jobs: the step's mean reward margin and the share of pairs ranked right."""
    reward_accuracy: float | None = None
    valid_reward_margin: float | None = None
    _step_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=20))

    def update(self, metrics: dict[str, Any]) -> None:
        self.step = int(metrics.get("step") or self.step)
        self.total = int(metrics["total_steps"]) if metrics.get("total_steps") else self.total
        self.train_loss = _newer(metrics.get("train_loss"), self.train_loss)
        self.valid_loss = _newer(metrics.get("valid_loss"), self.valid_loss)
        self.token_accuracy = _newer(metrics.get("train_mean_token_accuracy"), self.token_accuracy)
        peak = _num(metrics.get("peak_memory_bytes"))
        self.peak_bytes = max(self.peak_bytes or 0, peak) if peak is not None else self.peak_bytes
        self.tokens_per_second = _newer(metrics.get("tokens_per_second"), self.tokens_per_second)
        self.reward_margin = _newer(metrics.get("reward_margin"), self.reward_margin)
        self.reward_accuracy = _newer(metrics.get("reward_accuracy"), self.reward_accuracy)
        self.valid_reward_margin = _newer(metrics.get("valid_reward_margin"), self.valid_reward_margin)
        if (s := _num(metrics.get("step_seconds"))) is not None:
            self._step_seconds.append(s)

    def eta_seconds(self) -> float | None:
        """Mean of the recent steps' durations times the steps left."""
        if not self.total or not self._step_seconds:
            return None
        return sum(self._step_seconds) / len(self._step_seconds) * max(self.total - self.step, 0)

    def render(self) -> str:
        total = self.total or 0
        frac = self.step / total if total else 0.0
        parts = [
            f"step {self.step}/{total or '?'}",
            bar(frac, unicode=self.unicode),
            f"{frac * 100:.0f}%",
            f"ETA {human_duration(self.eta_seconds())}",
        ]
        if self.tokens_per_second is not None:
            parts.append(f"{self.tokens_per_second:,.0f} tok/s")
        if self.train_loss is not None:
            loss = f"loss {self.train_loss:.4f}"
            if self.valid_loss is not None:
                loss += f" (val {self.valid_loss:.4f})"
            if self.token_accuracy is not None:
                loss += f" tok acc {self.token_accuracy * 100:.1f}%"
            parts.append(loss)
        if self.reward_margin is not None:
            margin = f"margin {self.reward_margin:.3f}"
            if self.valid_reward_margin is not None:
                margin += f" (val {self.valid_reward_margin:.3f})"
            if self.reward_accuracy is not None:
                margin += f" acc {self.reward_accuracy * 100:.0f}%"
            parts.append(margin)
        if self.peak_bytes is not None:
            parts.append(f"peak {human_bytes(self.peak_bytes)}")
        return "  ".join(parts)
