"""Exact chunk-wise DPO (Rafailov et al. 2023, sigmoid loss) on a shared-prefix chunk tree.

The loss of a preference pair is a scalar function of four summed log-probabilities of
the answers given the prompt: the policy's (base + LoRA) `lp_w`, `lp_l` and the
reference's (the same weights, adapter disabled) `ref_w`, `ref_l`:

    L = -log sigmoid(beta * z),    z = (lp_w - ref_w) - (lp_l - ref_l)
    dL/dθ = -beta * sigmoid(-beta * z) * (∇lp_w - ∇lp_l) = c * (∇CE_w - ∇CE_l)

with `c = beta * sigmoid(-beta * z)` and `CE = -lp` the answer's summed token
cross-entropy. So one DPO step is:

1. the reference log-probabilities: a stage-1-only prefix tree with the adapter
   disabled (peft's `disable_adapter()`: the same tensors, no second model in memory);
2. the policy's prefix tree (prefix.py): stage 1 yields `lp_w`, `lp_l` exactly, hence
   `c`; stage 2 back-propagates the preferred answer's CE with weight `+c` and the
   rejected one's with `-c`, through the prompt, which is computed once per model.

The gradient equals that of a plain full-sequence DPO implementation (four forward
passes, one backward) to float rounding; SpaCO's Bernoulli sampling stays unbiased
because `c` comes from the exact stage 1 (prefix.py explains the draw over the tree).

A plain (non-peft) model has no adapter to disable, hence no reference: pass the
reference log-probabilities (`reference_logps`), e.g. from `answer_logps` on a frozen
copy, or get a refusal that says so.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn

from seco_core.config import ChunkConfig
from seco_core.kv_store import HostBuffers
from seco_core.prefix import Continuation, backward_tree_with_factors, prefix_tree_backward, prefix_tree_loss

DEFAULT_BETA = 0.1
"""OpenAI's and TRL's default: how far the policy may move from the reference."""


@dataclass(frozen=True)
class DPOOutput:
    """One preference pair's DPO loss and the log-probabilities behind it (TRL's metrics)."""

    loss: float
    """-log sigmoid(beta * z)."""
    chosen_logp: float
    """Policy: summed log-probability of the preferred answer given the prompt."""
    rejected_logp: float
    reference_chosen_logp: float
    reference_rejected_logp: float
    beta: float
    num_chunks: int = 0
    chunks_backpropagated: int = 0

    @property
    def chosen_reward(self) -> float:
        """beta * (lp_w - ref_w): the implicit reward of the preferred answer."""
        return self.beta * (self.chosen_logp - self.reference_chosen_logp)

    @property
    def rejected_reward(self) -> float:
        return self.beta * (self.rejected_logp - self.reference_rejected_logp)

    @property
    def margin(self) -> float:
        """chosen_reward - rejected_reward = beta * z; the pair is ranked right when > 0."""
        return self.chosen_reward - self.rejected_reward


def _softplus(v: float) -> float:
    """log(1 + e^v) without overflow."""
    return max(v, 0.0) + math.log1p(math.exp(-abs(v)))


def dpo_loss_and_weight(beta: float, z: float) -> tuple[float, float]:
    """(L, c) = (-log sigmoid(beta z), beta sigmoid(-beta z)) = (softplus(-beta z), beta e^-softplus(beta z))."""
    x = beta * z
    return _softplus(-x), beta * math.exp(-_softplus(x))


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, int | float) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive number, got {beta!r}")


def _pair_tensors(prompt_ids: torch.Tensor, answers: Sequence[torch.Tensor]) -> None:
    for name, t in (("prompt_ids", prompt_ids), *((f"answer {i}", a) for i, a in enumerate(answers))):
        if t.dim() != 2 or t.shape[0] != 1 or t.shape[1] < 1:
            raise ValueError(f"{name} must be (1, length >= 1): one preference pair per call; got {tuple(t.shape)}")


@contextlib.contextmanager
def reference_model(model: nn.Module) -> Iterator[nn.Module]:
    """The reference policy: `model` with its LoRA adapter disabled (no copy of the weights).

    A plain model has no adapter to disable, hence no reference: ValueError.
    """
    if not isinstance(model, PeftModel):
        raise ValueError(
            f"{type(model).__name__} has no LoRA adapter to disable, so it has no DPO reference: pass "
            "reference_logps (the reference model's summed log-probabilities of the chosen and rejected "
            "answers, e.g. from answer_logps on a frozen copy)"
        )
    with model.disable_adapter():
        yield model


def answer_logps(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    answers: Sequence[torch.Tensor],
    config: ChunkConfig,
    *,
    host_buffers: HostBuffers | None = None,
) -> list[float]:
    """Summed log-probability of every token of each answer given the prompt, no gradients.

    prompt_ids: (1, P); each answer (1, n). One stage-1 pass of a prefix tree: the
    prompt is computed once for all answers.
    """
    _pair_tensors(prompt_ids, answers)
    ce = prefix_tree_loss(model, prompt_ids, [(a, a) for a in answers], config, host_buffers=host_buffers)
    return [-float(c.sum()) for c in ce]


def reference_answer_logps(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    answers: Sequence[torch.Tensor],
    config: ChunkConfig,
    *,
    host_buffers: HostBuffers | None = None,
) -> list[float]:
    """`answer_logps` of the reference policy (adapter disabled)."""
    with reference_model(model):
        return answer_logps(model, prompt_ids, answers, config, host_buffers=host_buffers)


def dpo_backward(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    chosen_ids: torch.Tensor,
    rejected_ids: torch.Tensor,
    config: ChunkConfig,
    generator: torch.Generator | None = None,
    *,
    beta: float = DEFAULT_BETA,
    reference_logps: tuple[float, float] | None = None,
    loss_scale: float = 1.0,
    factors: list[float] | None = None,
    host_buffers: HostBuffers | None = None,
) -> DPOOutput:
    """Accumulate the DPO gradient of one preference pair into `.grad`, chunk by chunk.

    prompt_ids: (1, P); chosen_ids, rejected_ids: (1, n_w), (1, n_l), every token a
    target. `reference_logps` = (ref_w, ref_l); None computes them with the adapter
    disabled (`reference_model`). `loss_scale` multiplies the gradient (not the returned
    loss), e.g. 1/pairs to average a batch of pairs. `factors` replaces SpaCO's draw
    with given per-chunk factors (`prefix.backward_tree_with_factors`; tests enumerate
    every draw with it). `host_buffers`: the job's pool for KV offload.
    """
    _check_beta(beta)
    _pair_tensors(prompt_ids, [chosen_ids, rejected_ids])
    if reference_logps is None:
        ref_w, ref_l = reference_answer_logps(
            model, prompt_ids, [chosen_ids, rejected_ids], config, host_buffers=host_buffers
        )
    else:
        ref_w, ref_l = (float(x) for x in reference_logps)
    seen: dict[str, float] = {}

    def weights(ce_sums: list[torch.Tensor]) -> list[float]:
        lp_w, lp_l = -float(ce_sums[0].sum()), -float(ce_sums[1].sum())
        loss, c = dpo_loss_and_weight(beta, (lp_w - ref_w) - (lp_l - ref_l))
        seen.update(lp_w=lp_w, lp_l=lp_l, loss=loss)
        return [c * loss_scale, -c * loss_scale]  # d(loss)/d(CE_w) = +c, d(loss)/d(CE_l) = -c

    answers = [Continuation(chosen_ids, chosen_ids), Continuation(rejected_ids, rejected_ids)]
    if factors is None:
        out = prefix_tree_backward(
            model, prompt_ids, answers, config, generator, weight_fn=weights, host_buffers=host_buffers
        )
    else:
        out = backward_tree_with_factors(
            model, prompt_ids, answers, config, factors, weight_fn=weights, host_buffers=host_buffers
        )
    return DPOOutput(
        loss=seen["loss"],
        chosen_logp=seen["lp_w"],
        rejected_logp=seen["lp_l"],
        reference_chosen_logp=ref_w,
        reference_rejected_logp=ref_l,
        beta=beta,
        num_chunks=out.num_chunks,
        chunks_backpropagated=out.chunks_backpropagated,
    )


@torch.no_grad()
def dpo_evaluate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    chosen_ids: torch.Tensor,
    rejected_ids: torch.Tensor,
    config: ChunkConfig,
    *,
    beta: float = DEFAULT_BETA,
    reference_logps: tuple[float, float] | None = None,
    host_buffers: HostBuffers | None = None,
) -> DPOOutput:
    """The DPO loss and rewards of a pair with no gradients (validation): stage 1 only."""
    _check_beta(beta)
    answers = [chosen_ids, rejected_ids]
    if reference_logps is None:
        ref_w, ref_l = reference_answer_logps(model, prompt_ids, answers, config, host_buffers=host_buffers)
    else:
        ref_w, ref_l = (float(x) for x in reference_logps)
    lp_w, lp_l = answer_logps(model, prompt_ids, answers, config, host_buffers=host_buffers)
    loss, _ = dpo_loss_and_weight(beta, (lp_w - ref_w) - (lp_l - ref_l))
    return DPOOutput(loss, lp_w, lp_l, ref_w, ref_l, beta)
