"""SeCO gradients equal one full-sequence backward, in float64, for every supported architecture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seco_core import ChunkConfig, chunked_backward, chunked_loss
from seco_core.lora import attach_lora
from tests.seco_core.tiny import CONFIGS, VOCAB, memory_options, tiny_model

REL_TOL = 1e-12


def reference_grads(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """One full-sequence backward with the loss in the model's dtype (float64 here).

    `model(labels=...)` upcasts logits to float32 only, which would hide 1e-12 agreement.
    """
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def max_rel_error(model: nn.Module, ref: dict[str, torch.Tensor]) -> float:
    errors = []
    for name, p in model.named_parameters():
        if name not in ref:
            assert p.grad is None, f"{name} got a gradient the reference does not have"
            continue
        assert p.grad is not None, f"{name} has no gradient"
        errors.append(((p.grad - ref[name]).norm() / ref[name].norm().clamp_min(1e-300)).item())
    assert errors
    return max(errors)


def batch(length: int = 45, seed: int = 1, mask_prefix: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    labels = ids.clone()
    labels[:, :mask_prefix] = -100  # a prompt with no loss
    labels[1, 20:25] = -100  # and a masked span inside the second row
    return ids, labels


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.usefixtures("float64_norms")
def test_seco_matches_full_backward(arch: str, lora: bool) -> None:
    model = tiny_model(arch)
    if lora:
        model = attach_lora(model, r=4, alpha=8)
        for name, p in model.named_parameters():  # non-zero B so LoRA A gets a gradient too
            if "lora_B" in name:
                nn.init.normal_(p, std=0.1)
    ids, labels = batch()
    ref_loss, ref = reference_grads(model, ids, labels)
    out = chunked_backward(model, ids, labels, ChunkConfig(chunk_size=7))  # 7 does not divide 45
    assert out.num_chunks == 7
    assert out.chunks_backpropagated == 7
    assert out.loss == pytest.approx(ref_loss, rel=1e-13)
    assert max_rel_error(model, ref) < REL_TOL


def test_gemma_as_shipped() -> None:
    model = tiny_model("gemma")
    ids, labels = batch()
    _, ref = reference_grads(model, ids, labels)
    chunked_backward(model, ids, labels, ChunkConfig(chunk_size=7))
    assert max_rel_error(model, ref) < 1e-6  # float32 norms inside the model, see above


@pytest.mark.parametrize("chunk_size", [1, 16, 44, 45, 64])
def test_chunk_sizes(chunk_size: int) -> None:
    model = tiny_model("llama")
    ids, labels = batch()
    _, ref = reference_grads(model, ids, labels)
    chunked_backward(model, ids, labels, ChunkConfig(chunk_size=chunk_size))
    assert max_rel_error(model, ref) < REL_TOL


def test_accumulates_like_backward() -> None:
    model = tiny_model("qwen2")
    ids, labels = batch()
    _, ref = reference_grads(model, ids, labels)
    cfg = ChunkConfig(chunk_size=10)
    chunked_backward(model, ids, labels, cfg)
    chunked_backward(model, ids, labels, cfg)
    assert max_rel_error(model, {n: 2 * g for n, g in ref.items()}) < REL_TOL


def test_loss_scale_scales_gradients_once() -> None:
    model = tiny_model("llama")
    ids, labels = batch()
    _, ref = reference_grads(model, ids, labels)
    out = chunked_backward(model, ids, labels, ChunkConfig(chunk_size=6), loss_scale=0.25)
    assert max_rel_error(model, {n: 0.25 * g for n, g in ref.items()}) < REL_TOL
    assert out.loss == pytest.approx(reference_grads(model, ids, labels)[0], rel=1e-13)


def test_chunked_loss_has_no_gradients() -> None:
    model = tiny_model("olmo2")
    ids, labels = batch()
    ref_loss, _ = reference_grads(model, ids, labels)
    assert chunked_loss(model, ids, labels, ChunkConfig(10)) == pytest.approx(ref_loss, rel=1e-13)
    offloaded = ChunkConfig(10, offload_kv=True, layer_checkpointing=True)
    assert chunked_loss(model, ids, labels, offloaded) == pytest.approx(ref_loss, rel=1e-13)
    assert all(p.grad is None for p in model.parameters())


def test_loss_slices_do_not_change_gradients() -> None:
    model = tiny_model("llama")
    ids, labels = batch()
    _, ref = reference_grads(model, ids, labels)
    chunked_backward(model, ids, labels, ChunkConfig(chunk_size=16, loss_slice=5))
    assert max_rel_error(model, ref) < REL_TOL


def test_float32_loss_equals_hf_loss() -> None:
    model = tiny_model("llama", dtype=torch.float32)
    ids, labels = batch()
    with torch.no_grad():
        hf_loss = model(input_ids=ids, labels=labels).loss.item()
    out = chunked_backward(model, ids, labels, ChunkConfig(chunk_size=9))
    assert out.loss == pytest.approx(hf_loss, rel=1e-5)


def test_dropout_is_replayed_consistently() -> None:
    """Stage 2 must recompute a chunk with the dropout masks its stage-1 pass drew.

    With one chunk, SeCO is a plain forward/backward whose masks come from the random
    state at the call, so it must match a plain backward under the same seed; without
    the replay stage 2 would draw fresh masks and differ.
    """
    model = attach_lora(tiny_model("llama"), r=4, alpha=8, dropout=0.5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    model.train()
    ids, labels = batch()
    torch.manual_seed(123)
    _, ref = reference_grads(model, ids, labels)
    torch.manual_seed(123)
    chunked_backward(model, ids, labels, ChunkConfig(chunk_size=45))
    assert max_rel_error(model, ref) < REL_TOL
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    first = chunked_backward(model, ids, labels, ChunkConfig(chunk_size=9))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    second = chunked_backward(model, ids, labels, ChunkConfig(chunk_size=9))
    assert first.loss == second.loss
    assert all(torch.equal(grads[n], p.grad) for n, p in model.named_parameters() if p.grad is not None)


@memory_options
@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "phi3"])
@pytest.mark.usefixtures("float64_norms")
def test_memory_options_keep_gradients_exact(arch: str, options: dict[str, bool]) -> None:
    """KV offload (here the compute and offload device are both the CPU, so the
    streaming code path runs with no-op copies) and layer checkpointing change where
    tensors live and when they are computed, never the gradients."""
    model = attach_lora(tiny_model(arch), r=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    ids, labels = batch()
    ref_loss, ref = reference_grads(model, ids, labels)
    out = chunked_backward(model, ids, labels, ChunkConfig(chunk_size=8, **options))
    assert out.loss == pytest.approx(ref_loss, rel=1e-13)
    assert max_rel_error(model, ref) < REL_TOL


def test_spaco_with_memory_options_matches_plain_spaco() -> None:
    model = tiny_model("qwen3")
    ids, labels = batch()
    grads = []
    for options in ({}, {"offload_kv": True, "layer_checkpointing": True}):
        model.zero_grad(set_to_none=True)
        cfg = ChunkConfig(chunk_size=6, mode="spaco", budget=3, **options)
        chunked_backward(model, ids, labels, cfg, generator=torch.Generator().manual_seed(5))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize(("enabled", "calls_per_chunk"), [(False, 2), (True, 3)])
def test_layer_checkpointing_recomputes_layers_in_backward(enabled: bool, calls_per_chunk: int) -> None:
    """Stage 1 runs each layer once per chunk, stage 2 once more, and checkpointing once
    more again in backward (its activations were not kept)."""
    model = tiny_model("llama")
    layer = model.model.layers[1]
    calls = []
    original = layer.forward

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    layer.forward = counting  # type: ignore[method-assign]
    ids, labels = batch()
    out = chunked_backward(model, ids, labels, ChunkConfig(chunk_size=15, layer_checkpointing=enabled))
    assert len(calls) == calls_per_chunk * out.num_chunks
    assert layer.forward is counting  # restored


def test_chunks_without_targets_skip_the_output_head() -> None:
    """A long masked prompt costs no logits: only chunks with targets run the head (stage 1 or 2)."""
    model = tiny_model("llama")
    ids, labels = batch(length=40, mask_prefix=30)  # positions 0..28 predict nothing
    calls: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    _, ref = reference_grads(model, ids, labels)
    calls.clear()
    chunked_backward(model, ids, labels, ChunkConfig(chunk_size=10))
    hook.remove()
    assert calls == [10, 10]  # stage 2 of chunks 30-39 and 20-29 (position 29 has a target), nothing else
    assert max_rel_error(model, ref) < REL_TOL
