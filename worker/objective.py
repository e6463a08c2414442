"""What the training loop trains on: a list of items and how one optimizer step uses them.

The loop in trainer.py (epochs, shuffling, optimizer, checkpoints, metrics, resume) is
the same for every method; an `Objective` supplies the rest: supervised training steps
over windows of documents (trainer.py), DPO over preference pairs (preference.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from seco_core import ChunkConfig
from seco_core.kv_store import HostBuffers


@dataclass
class StepResult:
    loss: float
    """The step's training loss (mean token CE, or the mean DPO loss of its pairs)."""
    chunks: int
    """Chunks back-propagated."""
    tokens: int
    """Tokens processed (trained tokens)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Further per-step metrics of the method (DPO's rewards), added to the step's event and CSV row."""


StepFn = Callable[[torch.nn.Module, list[Any], ChunkConfig, int, HostBuffers], StepResult]
"""(model, the batch's items, chunk config, step number, the job's host buffers for KV
offload) -> the step's result; accumulates .grad."""
ValidateFn = Callable[[torch.nn.Module, ChunkConfig, HostBuffers], dict[str, Any]]
"""(model, chunk config, host buffers) -> validation metrics ("valid_loss", ...; supervised jobs
add "valid_loss_by_position", a dict), no gradients."""


@dataclass
class Objective:
    items: Sequence[Any]
    """What a batch is drawn from: windows, or preference pairs."""
    unit: str
    """Their name in messages ("windows", "pairs")."""
    step: StepFn
    validate: ValidateFn | None
    """None without validation data."""
    fields: list[str] = field(default_factory=list)
    """Metrics CSV columns of this method, after the common ones."""
    validate_before_training: bool = False
    """Also validate the starting model, reported as step 0: what later validations compare
    with (supervised jobs: the loss by position, starting model -> now). DPO's starting
    point needs no pass on a base model: the policy is the reference (loss log 2, margin 0)."""


def step_seed(seed: int, step: int) -> int:
    """The random seed of an optimizer step, from the job's seed: a resumed job draws the same
    dropout masks and SpaCO chunks at the same step as the first attempt."""
    return seed * 1_000_003 + step
