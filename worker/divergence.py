"""Stop a diverging job before a non-finite value reaches its weights.

A loss or gradient that is NaN or infinite (a learning rate far too high, data the model
cannot fit in its dtype) would, once applied, turn every LoRA weight into NaN: every later
step and checkpoint would be useless, and the job would still "succeed". The training loop
therefore checks each step's loss and gradient norm *before* the optimizer step and fails
the job with code `training_diverged`, naming the step and the last finite loss. Nothing
non-finite has been applied, so the checkpoints written so far are good and stay listed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from worker.spec import TrainingError

DIVERGED = "training_diverged"


@dataclass
class DivergenceGuard:
    """The last finite training loss and the last checkpoint, for the failure message."""

    last_loss: float | None = None
    last_loss_step: int | None = None
    last_checkpoint_step: int | None = None

    def resumed(self, step: int, metrics: dict[str, object]) -> None:
        """A resume from the checkpoint at `step` whose metrics are `metrics`."""
        self.last_checkpoint_step = step
        loss = metrics.get("train_loss")
        if isinstance(loss, int | float) and math.isfinite(loss):
            self.last_loss, self.last_loss_step = float(loss), step

    def check(self, step: int, loss: float, grad_norm: float) -> None:
        """Raise TrainingError(training_diverged) if the step's loss or gradient norm is not finite."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.last_loss, self.last_loss_step = loss, step
            return
        what = "loss" if not math.isfinite(loss) else "gradient"
        last = (
            f"the last finite training loss was {self.last_loss:.6g} at step {self.last_loss_step}"
            if self.last_loss is not None
            else "no earlier step had a finite loss"
        )
        kept = (
            f"the last good checkpoint (step {self.last_checkpoint_step}) is kept"
            if self.last_checkpoint_step is not None
            else "no checkpoint had been written yet"
        )
        raise TrainingError(
            f"Training diverged at step {step}: the {what} is not finite "
            f"(loss {loss:.6g}, gradient norm {grad_norm:.6g}); "
            f"{last}. This step was not applied to the weights, and {kept}. "
            "Try a lower learning_rate_multiplier.",
            code=DIVERGED,
        )

    def checkpointed(self, step: int) -> None:
        self.last_checkpoint_step = step
