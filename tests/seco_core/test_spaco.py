"""SpaCO: Bernoulli sampling is exactly unbiased, the paper's fixed-size draw is not."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from seco_core import ChunkConfig, chunked_backward
from seco_core.chunked import backward_with_factors
from seco_core.sampling import chunk_factors
from tests.seco_core.test_parity import batch, max_rel_error, reference_grads
from tests.seco_core.tiny import tiny_model

K, T, CHUNK = 4, 2, 12  # 4 chunks of a 45-token sequence, budget 2


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def grads_for_subsets(cfg: ChunkConfig, subsets: list[tuple[bool, ...]], factor: float) -> dict:
    model = tiny_model("llama")
    ids, labels = batch()
    out = {}
    for subset in subsets:
        model.zero_grad(set_to_none=True)
        if any(subset):
            backward_with_factors(model, ids, labels, cfg, [factor if s else 0.0 for s in subset])
            out[subset] = flat_grads(model)
        else:
            out[subset] = None  # nothing back-propagated: zero gradient
    return out


@pytest.fixture
def exact(float64_norms: None) -> torch.Tensor:
    model = tiny_model("llama")
    ids, labels = batch()
    chunked_backward(model, ids, labels, ChunkConfig(chunk_size=CHUNK))
    return flat_grads(model)


@pytest.fixture
def bernoulli_grads(float64_norms: None) -> dict:
    cfg = ChunkConfig(chunk_size=CHUNK, mode="spaco", budget=T)
    return grads_for_subsets(cfg, list(itertools.product([False, True], repeat=K)), K / T)


def test_bernoulli_expectation_is_exact(exact: torch.Tensor, bernoulli_grads: dict) -> None:
    q = T / K
    expectation = torch.zeros_like(exact)
    for subset, g in bernoulli_grads.items():
        if g is not None:
            n = sum(subset)
            expectation += q**n * (1 - q) ** (K - n) * g
    assert ((expectation - exact).norm() / exact.norm()).item() < 1e-12


def test_fixed_draw_is_biased(exact: torch.Tensor) -> None:
    cfg = ChunkConfig(chunk_size=CHUNK, mode="spaco", budget=T, sampling="fixed")
    subsets = [tuple(i in c for i in range(K)) for c in itertools.combinations(range(K), T)]
    grads = grads_for_subsets(cfg, subsets, K / T)
    expectation = sum(grads.values()) / len(subsets)
    bias = ((expectation - exact).norm() / exact.norm()).item()
    assert bias > 1e-3  # multi-chunk paths are under-weighted


def test_monte_carlo_error_falls_like_inverse_sqrt(exact: torch.Tensor, bernoulli_grads: dict) -> None:
    """Draw chunk subsets with the real sampler and average the per-subset gradients."""
    cfg = ChunkConfig(chunk_size=CHUNK, mode="spaco", budget=T)
    gen = torch.Generator().manual_seed(0)
    draws = [100, 400, 1600, 6400]
    total = torch.zeros_like(exact)
    errors = []
    n = 0
    for target in draws:
        while n < target:
            subset = tuple(f > 0 for f in chunk_factors(K, cfg, gen))
            if bernoulli_grads[subset] is not None:
                total += bernoulli_grads[subset]
            n += 1
        errors.append(((total / n - exact).norm() / exact.norm()).item())
    slope = (math.log(errors[-1]) - math.log(errors[0])) / (math.log(draws[-1]) - math.log(draws[0]))
    assert errors[-1] < errors[0]
    assert -0.75 < slope < -0.25, (errors, slope)


def test_generator_makes_draws_reproducible() -> None:
    model = tiny_model("llama")
    ids, labels = batch()
    cfg = ChunkConfig(chunk_size=5, mode="spaco", budget=3)
    outs = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        out = chunked_backward(model, ids, labels, cfg, generator=torch.Generator().manual_seed(42))
        outs.append((out, flat_grads(model)))
    assert outs[0][0] == outs[1][0]
    assert torch.equal(outs[0][1], outs[1][1])
    assert 0 <= outs[0][0].chunks_backpropagated <= 9


def test_spaco_loss_is_full_loss() -> None:
    """Skipped chunks still count in the reported loss (computed in stage 1)."""
    model = tiny_model("llama")
    ids, labels = batch()
    ref_loss, _ = reference_grads(model, ids, labels)
    cfg = ChunkConfig(chunk_size=5, mode="spaco", budget=2, sampling="fixed")
    out = chunked_backward(model, ids, labels, cfg, generator=torch.Generator().manual_seed(1))
    assert out.chunks_backpropagated == 2
    assert out.loss == pytest.approx(ref_loss, rel=1e-12)


def test_full_budget_is_seco() -> None:
    model = tiny_model("llama")
    ids, labels = batch()
    _, ref = reference_grads(model, ids, labels)
    chunked_backward(model, ids, labels, ChunkConfig(chunk_size=9, mode="spaco", budget=5))
    assert max_rel_error(model, ref) < 1e-12


def test_compensation_cap() -> None:
    cfg = ChunkConfig(chunk_size=8, mode="spaco", budget=2, sampling="fixed", max_compensation=2.0)
    factors = chunk_factors(8, cfg, torch.Generator().manual_seed(0))
    assert sorted(factors) == [0.0] * 6 + [2.0, 2.0]
    uncapped = chunk_factors(8, ChunkConfig(chunk_size=8, mode="spaco", budget=2, sampling="fixed"))
    assert sorted(uncapped)[-1] == 4.0
