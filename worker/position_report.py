"""How a job reports its validation loss by target position (seco_core/position_buckets.py).

In a metrics event the buckets are one field, `valid_loss_by_position` (bucket name ->
mean token loss, only the buckets the validation file has targets in); in the metrics
CSV one column per such bucket (`valid_loss_0_1k`, ..., `valid_loss_64k_plus`, in bucket
order); in the job's events a sentence comparing each bucket with the starting model's
(step 0): "loss at 1K-4K: 2.41 -> 2.02". The starting model's row is the CSV's step-0
row, so a resumed job (whose CSV comes back with its checkpoint) still compares with it.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from seco_core.position_buckets import POSITION_EDGES, bucket_names, buckets_with_targets

VALID_BY_POSITION = "valid_loss_by_position"
"""The metrics event field: {bucket name: mean token loss}."""


def csv_column(name: str) -> str:
    """The CSV column of a bucket: "1K-4K" -> "valid_loss_1k_4k", "64K+" -> "valid_loss_64k_plus"."""
    return "valid_loss_" + name.lower().replace("-", "_").replace("+", "_plus")


def present_buckets(label_rows: Iterable[Sequence[int]], edges: Sequence[int] = POSITION_EDGES) -> list[str]:
    """Names of the buckets that the windows' labels have targets in, in bucket order: the
    buckets every validation of the job reports (it always covers the whole file)."""
    found: set[int] = set()
    for labels in label_rows:
        found |= buckets_with_targets(labels, edges)
    names = bucket_names(edges)
    return [names[i] for i in sorted(found)]


def csv_cells(metrics: dict[str, Any]) -> dict[str, float]:
    """The bucket columns of one CSV row, from a metrics event's `valid_loss_by_position`."""
    return {csv_column(name): loss for name, loss in (metrics.get(VALID_BY_POSITION) or {}).items()}


def starting_losses(metrics_csv: Path) -> dict[str, float] | None:
    """The step-0 row's loss per bucket (the model the job started from), or None when the
    CSV has no such row (a job that has not validated yet, or one from before buckets)."""
    if not metrics_csv.exists():
        return None
    with metrics_csv.open(newline="") as fh:
        row = next((r for r in csv.DictReader(fh) if r.get("step") == "0"), None)
    if row is None:
        return None
    found = {name: row.get(csv_column(name)) for name in bucket_names()}
    return {name: float(cell) for name, cell in found.items() if cell} or None


def comparison(base: dict[str, float], now: dict[str, float]) -> str:
    """'loss at 0-1K: 2.90 -> 2.50, loss at 1K-4K: 2.41 -> 2.02' (starting model -> now), the
    buckets both have, in bucket order."""
    return ", ".join(f"loss at {name}: {base[name]:.2f} -> {loss:.2f}" for name, loss in now.items() if name in base)
