"""The searches over the estimate: the largest chunk that fits, the longest sequence that
fits, and `plan`, a decision for one configuration with a message that says what would fit
when it does not."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from seco_core.memory_plan.estimate import MemoryEstimate, PlanOptions, estimate
from seco_core.memory_plan.shapes import ModelShape
from seco_core.memory_plan.sizes import format_bytes

MIN_CHUNK = 64
"""Smallest chunk `choose_chunk_size` proposes: below this, per-chunk overheads (a
forward pass per chunk and layer, kernel launches) dominate the step time."""

FASTEST_CHUNK = {"cpu": 2048, "cuda": 4096}
"""The chunk size past which a step gets slower again, per device kind: a step costs
about L * (a + b/c + g*c) (b: per-chunk overheads, g: the chunk's own causal block and
cache locality), so time falls with c only up to sqrt(b/g). Measured on this project's
2-core CPU (16K tokens, 4-layer 256-wide Llama): chunk 512 33.1 s, 2048 29.1 s,
8192 33.8 s, i.e. an optimum near 2048. On a GPU larger matrix products keep paying off
longer, and each doubling halves the host<->device traffic of KV offload; 4096 is the
default there until GPU measurements say otherwise (scripts/gpu_check.sh)."""


def _fits(e: MemoryEstimate, budget_bytes: int, host_budget_bytes: int | None) -> bool:
    return e.total <= budget_bytes and (host_budget_bytes is None or e.host_total <= host_budget_bytes)


def chunk_candidates(seq_len: int, max_chunk: int | None = None) -> list[int]:
    """Powers of two from MIN_CHUNK up to seq_len and `max_chunk` (just [seq_len] for a
    shorter sequence)."""
    top = min(seq_len, max_chunk or seq_len)
    if top < MIN_CHUNK:
        return [top]
    return [2**i for i in range(int(math.log2(MIN_CHUNK)), int(math.log2(top)) + 1)]


def choose_chunk_size(
    model: ModelShape | Any,
    seq_len: int,
    budget_bytes: int,
    options: PlanOptions | None = None,
    host_budget_bytes: int | None = None,
) -> int | None:
    """Largest power-of-two chunk (>= 64, <= seq_len, <= options.max_chunk) whose step fits, or None.

    Larger chunks mean fewer, better-utilised forward passes (faster) up to
    `max_chunk`, at the cost of activations and logits linear in the chunk size.
    """
    o = options or PlanOptions()
    for c in reversed(chunk_candidates(seq_len, o.max_chunk)):
        if _fits(estimate(model, seq_len, c, options), budget_bytes, host_budget_bytes):
            return c
    return None


def max_length(
    model: ModelShape | Any,
    budget_bytes: int,
    chunk_size: int | None = None,
    options: PlanOptions | None = None,
    host_budget_bytes: int | None = None,
    limit: int = 2**26,
) -> int:
    """Longest sequence (tokens, <= limit) that fits; 0 if not even one token does.

    With `chunk_size` None, a length fits when some power-of-two chunk fits it. Memory
    grows with the length, so a binary search over it is exact.
    """

    def fits(length: int) -> bool:
        if chunk_size is None:
            return choose_chunk_size(model, length, budget_bytes, options, host_budget_bytes) is not None
        return _fits(estimate(model, length, chunk_size, options), budget_bytes, host_budget_bytes)

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return limit if fits(limit) else _bisect(fits, lo, limit)
    return _bisect(fits, lo, hi)


def _bisect(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest n in [lo, hi) with fits(n), given fits(lo) and not fits(hi)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class MemoryPlan:
    """A decision for a job: whether it fits, with which chunk, and why (`message`)."""

    fits: bool
    seq_len: int
    chunk_size: int | None
    """The chunk to train with (chosen or given); when nothing fits, the smallest tried."""
    estimate: MemoryEstimate
    budget_bytes: int
    host_budget_bytes: int | None
    longest_length: int
    """Longest sequence that fits with `chunk_size` (0: none)."""
    message: str


def plan(
    model: ModelShape | Any,
    seq_len: int,
    budget_bytes: int,
    chunk_size: int | None = None,
    options: PlanOptions | None = None,
    host_budget_bytes: int | None = None,
) -> MemoryPlan:
    """Plan a step of `seq_len` tokens on a device with `budget_bytes` free.

    With `chunk_size` None, the largest power-of-two chunk that fits is chosen. When the
    requested configuration does not fit, the message says what would: a smaller chunk
    at this length, the host budget it needs (when only host memory is short), an option
    this plan does not use (layer checkpointing, KV offload, 4-bit weights) with its chunk,
    or the longest max_length at the requested (or smallest) chunk.
    """
    name = model.name if isinstance(model, ModelShape) else ModelShape.from_config(model).name
    chosen = chunk_size or choose_chunk_size(model, seq_len, budget_bytes, options, host_budget_bytes)
    if chosen is not None:
        e = estimate(model, seq_len, chosen, options)
        if _fits(e, budget_bytes, host_budget_bytes):
            longest = max_length(model, budget_bytes, chosen, options, host_budget_bytes)
            msg = (
                f"{name}: max_length={seq_len} with chunk_size={e.chunk_size} needs about "
                f"{format_bytes(e.total)} of {format_bytes(budget_bytes)} ({e.describe()})"
            )
            return MemoryPlan(True, seq_len, e.chunk_size, e, budget_bytes, host_budget_bytes, longest, msg)

    # Does not fit: report the requested (or smallest) chunk's estimate and alternatives.
    tried = chosen or min(chunk_candidates(seq_len, options.max_chunk if options else None))
    e = estimate(model, seq_len, tried, options)
    need = f"needs about {format_bytes(e.total)} on the device"
    if host_budget_bytes is not None and e.host_total > host_budget_bytes:
        host = f"{format_bytes(e.host_total)} of pinned host memory (host budget {format_bytes(host_budget_bytes)})"
        need += f" and {host}"
    if e.total > budget_bytes:
        need += f", but the device budget is {format_bytes(budget_bytes)}"
    else:
        need += f" (within the device budget of {format_bytes(budget_bytes)})"
    msg = f"{name}: max_length={seq_len} with chunk_size={e.chunk_size} {need} ({e.describe()})."
    alternatives = []
    smaller = choose_chunk_size(model, seq_len, budget_bytes, options, host_budget_bytes)
    if smaller is not None:
        alternatives.append(f"chunk_size={smaller} at max_length={seq_len}")
    if host_budget_bytes is not None:
        # Only host memory short: the host budget the device's largest fitting chunk needs.
        device_chunk = chunk_size or choose_chunk_size(model, seq_len, budget_bytes, options, None)
        on_device = estimate(model, seq_len, device_chunk, options) if device_chunk else None
        if on_device is not None and on_device.total <= budget_bytes and on_device.host_total > host_budget_bytes:
            alternatives.append(
                f"a host memory budget (SECO_HOST_MEMORY_BUDGET) of at least {format_bytes(on_device.host_total)}"
                f" ({on_device.host_buffers} pinned buffers) with chunk_size={on_device.chunk_size}"
                f" at max_length={seq_len}"
            )
    alternatives += _options_that_fit(model, seq_len, budget_bytes, options or PlanOptions(), host_budget_bytes)
    longest = max_length(model, budget_bytes, tried, options, host_budget_bytes)
    if longest > 0:
        alternatives.append(f"max_length<={longest} with chunk_size={min(tried, longest)}")
    smallest = min(chunk_candidates(seq_len, options.max_chunk if options else None))
    if smallest < tried:
        longest_small = max_length(model, budget_bytes, smallest, options, host_budget_bytes)
        if longest_small > longest:
            alternatives.append(f"max_length<={longest_small} with chunk_size={smallest}")
    if alternatives:
        msg += " What would fit: " + "; or ".join(alternatives) + "."
    else:
        fixed = e.weights + e.trainable_state + e.workspace
        # These costs do not depend on the sequence, so KV offload cannot help here.
        remedy = "a larger device" if (options and options.weights_4bit) else "4-bit weights or a larger device"
        msg += (
            f" Nothing fits: weights, trainable state and workspace alone need {format_bytes(fixed)}"
            f" (consider {remedy})."
        )
    return MemoryPlan(False, seq_len, tried, e, budget_bytes, host_budget_bytes, longest, msg)


_OPTION_CHANGES: tuple[tuple[str, dict[str, bool]], ...] = (
    ("layer checkpointing", {"layer_checkpointing": True}),
    ("KV offload with layer checkpointing", {"kv_offload": True, "layer_checkpointing": True}),
    ("4-bit weights (seco.load_in_4bit)", {"weights_4bit": True}),
)


def _options_that_fit(
    model: ModelShape | Any, seq_len: int, budget_bytes: int, options: PlanOptions, host_budget_bytes: int | None
) -> list[str]:
    """Each memory-saving option this plan does not use yet with which `seq_len` fits, and
    the chunk it would take. KV offload only where there is a host budget to offload to."""
    out = []
    for label, change in _OPTION_CHANGES:
        if all(getattr(options, k) == v for k, v in change.items()):
            continue
        if change.get("kv_offload") and host_budget_bytes is None:
            continue
        changed = replace(options, **change)  # type: ignore[arg-type]
        chunk = choose_chunk_size(model, seq_len, budget_bytes, changed, host_budget_bytes)
        if chunk is not None:
            out.append(f"{label} with chunk_size={chunk} at max_length={seq_len}")
    return out
