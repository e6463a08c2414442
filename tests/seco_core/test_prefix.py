"""The shared-prefix chunk tree equals the weighted sum of separate full-sequence losses (float64)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seco_core import ChunkConfig
from seco_core.chunked import backward_with_factors
from seco_core.lora import attach_lora
from seco_core.prefix import (
    Continuation,
    backward_tree_with_factors,
    prefix_tree_backward,
    prefix_tree_loss,
    tree_num_chunks,
)
from tests.seco_core.test_parity import max_rel_error
from tests.seco_core.tiny import CONFIGS, VOCAB, memory_options, tiny_model

REL_TOL = 1e-12
PREFIX = 23  # the shared part is tokens 0..21: with chunk 7 the prompt ends inside the 4th chunk


def lora_model(arch: str) -> nn.Module:
    model = attach_lora(tiny_model(arch), r=4, alpha=8)
    for name, p in model.named_parameters():  # non-zero B so LoRA A gets a gradient too
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return model


def tree(
    prefix_len: int = PREFIX, lengths: Sequence[int] = (9, 14, 5), batch: int = 2, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, list[Continuation]]:
    """A prefix with some targets (a masked span) and continuations of different lengths and weights."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, VOCAB, (batch, prefix_len), generator=g)
    prefix_labels = prefix.clone()
    prefix_labels[:, : prefix_len // 2] = -100
    weights: list[float | torch.Tensor] = [1.5, -0.7, torch.tensor([0.3, 2.0][:batch], dtype=torch.float64)]
    conts = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, VOCAB, (batch, n), generator=g)
        labels = ids.clone()
        if n > 6:
            labels[-1, 2:4] = -100  # a masked span inside one row of a continuation
        conts.append(Continuation(ids, labels, weights[i % len(weights)]))
    return prefix, prefix_labels, conts


def sequence_ce(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) summed token CE of full sequences, in the model's dtype (float64 here)."""
    logits = model(input_ids=ids).logits[:, :-1]
    ce = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="none")
    return ce.view(ids.shape[0], -1).sum(1)


def reference(
    model: nn.Module, prefix: torch.Tensor, prefix_labels: torch.Tensor, conts: Sequence[Continuation]
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """k separate full-sequence forward passes, one backward of sum_i w_i * CE_i."""
    model.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float64)
    ces = []
    for ids, labels, weight in conts:
        ce = sequence_ce(model, torch.cat([prefix, ids], 1), torch.cat([prefix_labels, labels], 1))
        ces.append(ce.detach())
        total = total + (ce * torch.as_tensor(weight, dtype=ce.dtype)).sum()
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return ces, grads


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.usefixtures("float64_norms")
def test_tree_equals_weighted_full_sequences(arch: str, lora: bool) -> None:
    model = lora_model(arch) if lora else tiny_model(arch)
    prefix, prefix_labels, conts = tree()
    ref_ce, ref = reference(model, prefix, prefix_labels, conts)
    out = prefix_tree_backward(model, prefix, conts, ChunkConfig(chunk_size=7), prefix_labels=prefix_labels)
    assert out.num_chunks == out.chunks_backpropagated == sum(tree_num_chunks(PREFIX, [9, 14, 5], 7)) == 4 + 2 + 3 + 1
    for got, want in zip(out.ce_sums, ref_ce, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    assert max_rel_error(model, ref) < REL_TOL


@pytest.mark.parametrize("chunk_size", [1, 4, 11, 22, 64])
@pytest.mark.usefixtures("float64_norms")
def test_chunk_sizes(chunk_size: int) -> None:
    """22 shared tokens: 11 and 22 divide them (the prompt ends on a chunk boundary), 4 does not."""
    model = lora_model("llama")
    prefix, prefix_labels, conts = tree()
    _, ref = reference(model, prefix, prefix_labels, conts)
    prefix_tree_backward(model, prefix, conts, ChunkConfig(chunk_size=chunk_size), prefix_labels=prefix_labels)
    assert max_rel_error(model, ref) < REL_TOL


@memory_options
@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "phi3"])
@pytest.mark.usefixtures("float64_norms")
def test_memory_options_keep_the_tree_exact(arch: str, options: dict[str, bool]) -> None:
    model = lora_model(arch)
    prefix, prefix_labels, conts = tree()
    _, ref = reference(model, prefix, prefix_labels, conts)
    cfg = ChunkConfig(chunk_size=6, loss_slice=4, **options)
    prefix_tree_backward(model, prefix, conts, cfg, prefix_labels=prefix_labels)
    assert max_rel_error(model, ref) < REL_TOL


@pytest.mark.usefixtures("float64_norms")
def test_one_token_prefix_and_no_prefix_targets() -> None:
    """P = 1: nothing is shared but the first token, which each branch repeats."""
    model = lora_model("qwen3")
    prefix, _, conts = tree(prefix_len=1)
    no_labels = torch.full_like(prefix, -100)
    _, ref = reference(model, prefix, no_labels, conts)
    out = prefix_tree_backward(model, prefix, conts, ChunkConfig(chunk_size=5))
    assert tree_num_chunks(1, [9, 14, 5], 5)[0] == 0
    assert max_rel_error(model, ref) < REL_TOL
    assert out.targets == [int((c.labels != -100).sum()) for c in conts]


@pytest.mark.usefixtures("float64_norms")
def test_weight_fn_sees_exact_losses_and_sets_the_weights() -> None:
    model = lora_model("mistral")
    prefix, prefix_labels, conts = tree()
    ref_ce, _ = reference(model, prefix, prefix_labels, conts)
    chosen = [torch.tensor(2.0), torch.tensor(-1.0), torch.tensor(0.25)]
    _, ref = reference(model, prefix, prefix_labels, [c._replace(weight=w) for c, w in zip(conts, chosen, strict=True)])
    seen: list[list[torch.Tensor]] = []

    def weight_fn(ce_sums: list[torch.Tensor]) -> list[torch.Tensor]:
        seen.append([c.clone() for c in ce_sums])
        return chosen

    out = prefix_tree_backward(
        model, prefix, conts, ChunkConfig(chunk_size=8), prefix_labels=prefix_labels, weight_fn=weight_fn
    )
    assert len(seen) == 1
    for got, want in zip(seen[0], ref_ce, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    assert [float(w[0]) for w in out.weights] == [2.0, -1.0, 0.25]
    assert max_rel_error(model, ref) < REL_TOL


def test_the_prefix_runs_once_per_stage() -> None:
    """Tokens through the embedding: the shared prefix twice (stage 1, stage 2), each branch
    (its first token is the prefix's last) twice; k separate sequences would run the prefix 2k times."""
    model = tiny_model("llama")
    prefix, prefix_labels, conts = tree()
    seen: list[int] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    prefix_tree_backward(model, prefix, conts, ChunkConfig(chunk_size=7), prefix_labels=prefix_labels)
    hook.remove()
    assert sum(seen) == 2 * (PREFIX - 1) + 2 * sum(c.input_ids.shape[1] + 1 for c in conts)


def test_loss_only_has_no_gradients() -> None:
    model = lora_model("olmo2")
    prefix, prefix_labels, conts = tree()
    ref_ce, _ = reference(model, prefix, prefix_labels, conts)
    ce = prefix_tree_loss(
        model, prefix, [(c.input_ids, c.labels) for c in conts], ChunkConfig(chunk_size=9), prefix_labels=prefix_labels
    )
    for got, want in zip(ce, ref_ce, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    assert all(p.grad is None for p in model.parameters())


def test_bad_inputs_are_refused() -> None:
    model = tiny_model("llama")
    prefix, _, conts = tree()
    cfg = ChunkConfig(chunk_size=8)
    with pytest.raises(ValueError, match="at least one continuation"):
        prefix_tree_backward(model, prefix, [], cfg)
    with pytest.raises(ValueError, match="continuation 1"):
        prefix_tree_backward(model, prefix, [conts[0], (conts[1].input_ids[:1], conts[1].labels[:1], 1.0)], cfg)
    with pytest.raises(ValueError, match="weight_fn returned 1 weights for 3"):
        prefix_tree_backward(model, prefix, conts, cfg, weight_fn=lambda ce: [1.0])
    with pytest.raises(ValueError, match="weight 0"):
        prefix_tree_backward(model, prefix, [conts[0]._replace(weight=torch.ones(3))], cfg)
    no_targets = [(c.input_ids, torch.full_like(c.labels, -100), 1.0) for c in conts]
    with pytest.raises(ValueError, match="no target tokens"):
        prefix_tree_backward(model, prefix, no_targets, cfg)


# ---------------------------------------------------------------- SpaCO over the tree


SPACO_CHUNK, SPACO_LENGTHS, SPACO_PREFIX = 8, (6, 10), 17  # shared 16 tokens: 2 + 1 + 2 = 5 chunks


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.usefixtures("float64_norms")
def test_bernoulli_over_the_tree_is_exactly_unbiased() -> None:
    """Enumerate every subset of the tree's chunks: the Bernoulli-weighted mean is the exact gradient."""
    model = lora_model("llama")
    prefix, prefix_labels, conts = tree(prefix_len=SPACO_PREFIX, lengths=SPACO_LENGTHS)
    k = sum(tree_num_chunks(SPACO_PREFIX, SPACO_LENGTHS, SPACO_CHUNK))
    assert k == 5
    budget = 2
    q = budget / k
    cfg = ChunkConfig(chunk_size=SPACO_CHUNK, mode="spaco", budget=budget)
    prefix_tree_backward(model, prefix, conts, ChunkConfig(chunk_size=SPACO_CHUNK), prefix_labels=prefix_labels)
    exact = flat_grads(model)
    expectation = torch.zeros_like(exact)
    for subset in itertools.product([False, True], repeat=k):
        if not any(subset):
            continue  # nothing back-propagated: a zero gradient
        model.zero_grad(set_to_none=True)
        factors = [1 / q if s else 0.0 for s in subset]
        backward_tree_with_factors(model, prefix, conts, cfg, factors, prefix_labels=prefix_labels)
        n = sum(subset)
        expectation += q**n * (1 - q) ** (k - n) * flat_grads(model)
    assert ((expectation - exact).norm() / exact.norm()).item() < REL_TOL


def test_spaco_draws_over_the_tree_are_reproducible() -> None:
    model = tiny_model("llama")
    prefix, prefix_labels, conts = tree()
    cfg = ChunkConfig(chunk_size=5, mode="spaco", budget=3)
    runs = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        out = prefix_tree_backward(
            model, prefix, conts, cfg, torch.Generator().manual_seed(3), prefix_labels=prefix_labels
        )
        runs.append((out.chunks_backpropagated, flat_grads(model)))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert 0 < runs[0][0] < out.num_chunks


@pytest.mark.parametrize("options", [{}, dict(offload_kv=True, layer_checkpointing=True)], ids=["device", "offload"])
@pytest.mark.parametrize("factors", [[1.0] * 5, [2.0, 0.0, 1.5, 0.0, 3.0], [0.0, 1.0, 0.0, 0.0, 0.0]])
def test_a_sequence_is_a_tree_of_one_branch(factors: list[float], options: dict[str, bool]) -> None:
    """Split on a chunk boundary, a sequence as a prefix and one continuation runs the same
    chunks, relays and random states as `chunked_backward`: bit for bit the same gradients,
    with LoRA dropout replayed and SpaCO-style factors (float32, where any reordering shows)."""
    model = attach_lora(tiny_model("llama", torch.float32), r=4, alpha=8, dropout=0.3).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    split = 13  # with chunks of 6 the tree shares tokens 0..11 (two chunks), then a branch of three
    ids = torch.randint(3, VOCAB, (2, 30), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 20:23] = -100
    n_targets = int((labels[:, 1:] != -100).sum())
    cfg = ChunkConfig(chunk_size=6, **options)

    torch.manual_seed(7)
    loss = backward_with_factors(model, ids, labels, cfg, factors, loss_scale=0.5).loss
    sequence, sequence_rng = flat_grads(model), torch.get_rng_state()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    branch = Continuation(ids[:, split:], labels[:, split:], 0.5 / n_targets)
    out = backward_tree_with_factors(model, ids[:, :split], [branch], cfg, factors, prefix_labels=labels[:, :split])
    assert out.targets == [n_targets] and out.num_chunks == 5
    assert float(out.ce_sums[0].sum()) / n_targets == pytest.approx(loss, rel=1e-6)
    assert sequence.abs().sum() > 0 and torch.equal(flat_grads(model), sequence)
    assert torch.equal(torch.get_rng_state(), sequence_rng)  # both leave the same random state behind
