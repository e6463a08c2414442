"""DPO training steps over preference pairs: the `Objective` of a job with method "dpo".

Each pair is one exact chunk-wise DPO backward (seco_core.dpo): the reference's log-
probabilities with the LoRA adapter disabled, then the policy's prefix tree, the prompt
computed once per model. A batch averages its pairs' DPO losses (`loss_scale = 1/n`).

Metrics per step follow TRL's DPOTrainer: the loss, the chosen and rejected rewards
(beta times the policy's minus the reference's log-probability), the reward margin, the
reward accuracy (share of pairs whose margin is positive) and the policy's
log-probabilities; validation reports the loss, margin and accuracy on held-out pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from seco_core import ChunkConfig
from seco_core.dpo import DPOOutput, dpo_backward, dpo_evaluate
from seco_core.kv_store import HostBuffers
from service.record.formats import DataError
from worker.data import PreferencePair
from worker.objective import Objective, StepResult, step_seed
from worker.spec import JobCancelled

DPO_FIELDS = [
    "reward_chosen",
    "reward_rejected",
    "reward_margin",
    "reward_accuracy",
    "logps_chosen",
    "logps_rejected",
    "valid_reward_margin",
    "valid_reward_accuracy",
]
"""Metrics CSV columns of a DPO job, after the common ones (train_loss is the DPO loss)."""


@dataclass
class _Mean:
    """Means of the TRL metrics over a batch of pairs."""

    outputs: list[DPOOutput] = field(default_factory=list)

    def add(self, out: DPOOutput) -> None:
        self.outputs.append(out)

    def mean(self, value: Callable[[DPOOutput], float]) -> float:
        return sum(value(o) for o in self.outputs) / len(self.outputs)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}reward_chosen": self.mean(lambda o: o.chosen_reward),
            f"{prefix}reward_rejected": self.mean(lambda o: o.rejected_reward),
            f"{prefix}reward_margin": self.mean(lambda o: o.margin),
            f"{prefix}reward_accuracy": self.mean(lambda o: float(o.margin > 0)),
            f"{prefix}logps_chosen": self.mean(lambda o: o.chosen_logp),
            f"{prefix}logps_rejected": self.mean(lambda o: o.rejected_logp),
        }


def _tensors(pair: PreferencePair, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.tensor([ids], device=device) for ids in (pair.prompt, pair.chosen, pair.rejected))  # type: ignore[return-value]


def check_pair_lengths(pairs: Sequence[PreferencePair], max_length: int, file: str, why: str) -> None:
    """Refuse, by line, a pair whose prompt + longer answer exceeds max_length: a DPO pair is
    never cut into windows (its log-probabilities need the whole prompt) nor truncated silently."""
    for pair in pairs:
        if len(pair) > max_length:
            raise DataError(
                file,
                pair.line,
                f"this preference pair is {len(pair)} tokens (prompt {len(pair.prompt)} + the longer "
                f"answer {len(pair) - len(pair.prompt)}), longer than max_length {max_length} ({why}); raise "
                "seco.max_length or shorten the prompt",
            )


def preference_objective(
    pairs: Sequence[PreferencePair],
    valid_pairs: Sequence[PreferencePair],
    beta: float,
    seed: int,
    device: torch.device,
    cancelled: Callable[[], bool],
) -> Objective:
    """The DPO steps and validation of a job (see the module docstring)."""

    def step(
        model: torch.nn.Module, batch: list[PreferencePair], config: ChunkConfig, number: int, buffers: HostBuffers
    ) -> StepResult:
        torch.manual_seed(step_seed(seed, number))
        generator = torch.Generator().manual_seed(step_seed(seed, number))
        stats = _Mean()
        for pair in batch:
            if cancelled():
                raise JobCancelled()
            out = dpo_backward(
                model,
                *_tensors(pair, device),
                config,
                generator,
                beta=beta,
                loss_scale=1 / len(batch),
                host_buffers=buffers,
            )
            stats.add(out)
        chunks = sum(o.chunks_backpropagated for o in stats.outputs)
        return StepResult(stats.mean(lambda o: o.loss), chunks, sum(p.tokens for p in batch), stats.metrics())

    @torch.no_grad()
    def validate(model: torch.nn.Module, config: ChunkConfig, buffers: HostBuffers) -> dict[str, float]:
        model.eval()
        stats = _Mean()
        for pair in valid_pairs:
            stats.add(dpo_evaluate(model, *_tensors(pair, device), config, beta=beta, host_buffers=buffers))
        model.train()
        means = stats.metrics("valid_")
        return {
            "valid_loss": stats.mean(lambda o: o.loss),
            "valid_reward_margin": means["valid_reward_margin"],
            "valid_reward_accuracy": means["valid_reward_accuracy"],
        }

    return Objective(pairs, "pairs", step, validate if valid_pairs else None, DPO_FIELDS)
