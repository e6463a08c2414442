"""Chunk-wise DPO equals a plain full-sequence DPO implementation, in float64.

The reference here is what TRL-style trainers do: four full forward passes (policy and
reference, preferred and rejected answer, the prompt processed in each), the sigmoid
DPO loss, one autograd backward.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seco_core import ChunkConfig
from seco_core.dpo import DPOOutput, answer_logps, dpo_backward, dpo_evaluate, dpo_loss_and_weight, reference_model
from seco_core.prefix import tree_num_chunks
from tests.seco_core.test_parity import max_rel_error
from tests.seco_core.test_prefix import lora_model
from tests.seco_core.tiny import CONFIGS, VOCAB, memory_options, tiny_model

REL_TOL = 1e-12
BETA = 0.5  # larger than the default so sigmoid(-beta z) is far from 1/2 and errors in z show


def pair(prompt: int = 30, chosen: int = 11, rejected: int = 6, seed: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(3, VOCAB, (1, n), generator=g) for n in (prompt, chosen, rejected))


def full_logp(model: nn.Module, prompt: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the answer's tokens given the prompt: one full forward pass."""
    logits = model(input_ids=torch.cat([prompt, answer], 1)).logits[:, prompt.shape[1] - 1 : -1]
    return F.log_softmax(logits, dim=-1).gather(-1, answer.unsqueeze(-1)).sum()


def plain_dpo(
    model: nn.Module,
    prompt: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    beta: float = BETA,
    reference: tuple[float, float] | None = None,
) -> tuple[float, dict[str, torch.Tensor], tuple[float, float]]:
    """Four full forward passes, one backward; returns (loss, grads, reference logps)."""
    model.zero_grad(set_to_none=True)
    if reference is None:
        with torch.no_grad(), model.disable_adapter():
            reference = (float(full_logp(model, prompt, chosen)), float(full_logp(model, prompt, rejected)))
    z = (full_logp(model, prompt, chosen) - reference[0]) - (full_logp(model, prompt, rejected) - reference[1])
    loss = -F.logsigmoid(beta * z)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads, reference


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.usefixtures("float64_norms")
def test_lora_dpo_matches_plain_dpo(arch: str) -> None:
    """Reference = the same weights with the adapter disabled; prompt of 30 tokens ends inside a
    chunk of 7, answers of 11 and 6 tokens."""
    model = lora_model(arch)
    prompt, chosen, rejected = pair()
    ref_loss, ref, ref_logps = plain_dpo(model, prompt, chosen, rejected)
    out = dpo_backward(model, prompt, chosen, rejected, ChunkConfig(chunk_size=7), beta=BETA)
    assert out.loss == pytest.approx(ref_loss, rel=1e-12)
    assert (out.reference_chosen_logp, out.reference_rejected_logp) == pytest.approx(ref_logps, rel=1e-13)
    assert out.chunks_backpropagated == out.num_chunks == sum(tree_num_chunks(30, [11, 6], 7))
    assert max_rel_error(model, ref) < REL_TOL


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.usefixtures("float64_norms")
def test_plain_model_dpo_with_given_reference(arch: str) -> None:
    """A plain model has no adapter to disable: the reference log-probs are given (here another model's)."""
    model = tiny_model(arch)
    prompt, chosen, rejected = pair()
    reference = tuple(answer_logps(tiny_model(arch, seed=5), prompt, [chosen, rejected], ChunkConfig(chunk_size=8)))
    ref_loss, ref, _ = plain_dpo(model, prompt, chosen, rejected, reference=reference)  # type: ignore[arg-type]
    out = dpo_backward(model, prompt, chosen, rejected, ChunkConfig(chunk_size=8), beta=BETA, reference_logps=reference)  # type: ignore[arg-type]
    assert out.loss == pytest.approx(ref_loss, rel=1e-12)
    assert max_rel_error(model, ref) < REL_TOL


@pytest.mark.parametrize("chunk_size", [1, 5, 29, 40])
@pytest.mark.parametrize(
    "lengths", [(30, 11, 6), (30, 4, 17), (2, 9, 9)], ids=["longer-chosen", "longer-rejected", "tiny-prompt"]
)
@pytest.mark.usefixtures("float64_norms")
def test_chunk_sizes_and_lengths(chunk_size: int, lengths: tuple[int, int, int]) -> None:
    """29 divides the 29 shared tokens (the prompt ends on a chunk boundary); 5 does not."""
    model = lora_model("llama")
    prompt, chosen, rejected = pair(*lengths)
    _, ref, _ = plain_dpo(model, prompt, chosen, rejected)
    dpo_backward(model, prompt, chosen, rejected, ChunkConfig(chunk_size=chunk_size), beta=BETA)
    assert max_rel_error(model, ref) < REL_TOL


@memory_options
@pytest.mark.parametrize("arch", ["gemma", "gpt_neox", "qwen2"])
@pytest.mark.usefixtures("float64_norms")
def test_memory_options_keep_dpo_exact(arch: str, options: dict[str, bool]) -> None:
    model = lora_model(arch)
    prompt, chosen, rejected = pair()
    _, ref, _ = plain_dpo(model, prompt, chosen, rejected)
    dpo_backward(model, prompt, chosen, rejected, ChunkConfig(chunk_size=6, **options), beta=BETA)
    assert max_rel_error(model, ref) < REL_TOL


@pytest.mark.usefixtures("float64_norms")
def test_loss_scale_and_accumulation() -> None:
    """Two pairs with loss_scale 1/2 accumulate the gradient of their mean DPO loss."""
    model = lora_model("phi3")
    pairs = [pair(seed=3), pair(prompt=12, chosen=5, rejected=9, seed=4)]
    total: dict[str, torch.Tensor] = {}
    for p in pairs:
        _, grads, _ = plain_dpo(model, *p)
        for n, g in grads.items():
            total[n] = total.get(n, 0) + g / 2
    for p in pairs:
        dpo_backward(model, *p, ChunkConfig(chunk_size=4), beta=BETA, loss_scale=0.5)
    assert max_rel_error(model, total) < REL_TOL


def test_metrics_are_trls() -> None:
    """Rewards beta * (policy - reference) log-probs; margin = beta * z; loss = -log sigmoid(margin)."""
    out = DPOOutput(
        loss=0.0,
        chosen_logp=-10.0,
        rejected_logp=-12.0,
        reference_chosen_logp=-11.0,
        reference_rejected_logp=-11.5,
        beta=0.1,
    )
    assert out.chosen_reward == pytest.approx(0.1) and out.rejected_reward == pytest.approx(-0.05)
    assert out.margin == pytest.approx(0.15)
    loss, c = dpo_loss_and_weight(0.1, 1.5)
    assert loss == pytest.approx(-math.log(1 / (1 + math.exp(-0.15))))
    assert c == pytest.approx(0.1 / (1 + math.exp(0.15)))
    for z in (-1e6, 1e6):  # no overflow far out in either tail
        loss, c = dpo_loss_and_weight(2.0, z)
        assert math.isfinite(loss) and 0.0 <= c <= 2.0


@pytest.mark.usefixtures("float64_norms")
def test_evaluate_matches_training_loss_and_has_no_gradients() -> None:
    model = lora_model("olmo2")
    prompt, chosen, rejected = pair()
    ref_loss, _, _ = plain_dpo(model, prompt, chosen, rejected)
    out = dpo_evaluate(model, prompt, chosen, rejected, ChunkConfig(chunk_size=9), beta=BETA)
    assert out.loss == pytest.approx(ref_loss, rel=1e-12)
    assert all(p.grad is None for p in model.parameters())
    assert model.active_adapters == ["default"]  # the adapter is enabled again after the reference pass


def test_a_plain_model_without_reference_is_refused() -> None:
    model = tiny_model("llama")
    prompt, chosen, rejected = pair()
    with pytest.raises(ValueError, match=r"no LoRA adapter to disable.*pass reference_logps"):
        dpo_backward(model, prompt, chosen, rejected, ChunkConfig(chunk_size=8))
    with pytest.raises(ValueError, match="no LoRA adapter"), reference_model(model):
        pass
    with pytest.raises(ValueError, match="one preference pair per call"):
        dpo_backward(model, prompt.expand(2, -1), chosen, rejected, ChunkConfig(chunk_size=8), reference_logps=(0, 0))
    with pytest.raises(ValueError, match="beta must be a positive number"):
        dpo_backward(model, prompt, chosen, rejected, ChunkConfig(chunk_size=8), beta=0.0, reference_logps=(0, 0))


@pytest.mark.usefixtures("float64_norms")
def test_spaco_dpo_is_exactly_unbiased() -> None:
    """Every Bernoulli draw over the pair's chunk tree, weighted by its probability, averages to
    the exact DPO gradient: the weight c comes from the exact stage 1, never from the draw."""
    model = lora_model("llama")
    prompt, chosen, rejected = pair(prompt=17, chosen=10, rejected=6)
    cfg = ChunkConfig(chunk_size=8, mode="spaco", budget=2)
    k = sum(tree_num_chunks(17, [10, 6], 8))
    assert k == 5
    q = 2 / k
    _, exact_grads, reference = plain_dpo(model, prompt, chosen, rejected)
    named = list(model.named_parameters())
    exact = torch.cat([exact_grads[n].flatten() for n, _ in named if n in exact_grads])
    expectation = torch.zeros_like(exact)
    for subset in itertools.product([False, True], repeat=k):
        if not any(subset):
            continue
        model.zero_grad(set_to_none=True)
        dpo_backward(
            model,
            prompt,
            chosen,
            rejected,
            cfg,
            beta=BETA,
            reference_logps=reference,
            factors=[1 / q if s else 0.0 for s in subset],
        )
        n = sum(subset)
        # a draw of prompt chunks alone back-propagates nothing: the prompt has no targets
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for n_, p in named if n_ in exact_grads]
        expectation += q**n * (1 - q) ** (k - n) * torch.cat([g.flatten() for g in grads])
    assert ((expectation - exact).norm() / exact.norm()).item() < REL_TOL
