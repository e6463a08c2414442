"""Where the K/V blocks and their gradient sums live: float32 sums, reused host buffers, bf16 accuracy."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seco_core import ChunkConfig, chunked_backward
from seco_core.kv_store import DeviceStore, HostBuffers, HostStore, KVBlock
from seco_core.lora import attach_lora
from tests.seco_core.tiny import VOCAB, tiny_model


def lora_llama(dtype: torch.dtype = torch.float64) -> nn.Module:
    model = attach_lora(tiny_model("llama", dtype=dtype), r=4, alpha=8)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return model


def tokens(length: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("store_class", [DeviceStore, HostStore])
def test_gradient_sums_are_float32_under_a_bf16_model(
    monkeypatch: pytest.MonkeyPatch, store_class: type[DeviceStore]
) -> None:
    """A block receives one contribution per later chunk: they are summed in float32."""
    blocks: list[KVBlock] = []
    put = store_class.put

    def recording_put(self: DeviceStore, key: torch.Tensor, value: torch.Tensor, needs_grad: bool) -> KVBlock:
        blocks.append(put(self, key, value, needs_grad))
        return blocks[-1]

    monkeypatch.setattr(store_class, "put", recording_put)
    model = lora_llama(torch.bfloat16)
    ids = tokens(40)
    chunked_backward(model, ids, ids, ChunkConfig(chunk_size=8, offload_kv=store_class is HostStore))
    assert len(blocks) == 5 * 2  # 5 chunks x 2 layers
    assert {b.key.dtype for b in blocks} == {torch.bfloat16}
    with_sums = [b for b in blocks if b.key_grad is not None]
    assert len(with_sums) == 4 * 2  # every chunk but the last receives relayed gradients
    assert {b.key_grad.dtype for b in with_sums} | {b.value_grad.dtype for b in with_sums} == {torch.float32}


def test_offload_reuses_host_buffers_across_steps() -> None:
    """Pinning host memory is a slow driver call: after the first step of a job, steps of the
    same chunk size take every buffer from the job's pool (a shorter last chunk included)."""
    model = lora_llama(torch.float32)
    buffers = HostBuffers()
    config = ChunkConfig(chunk_size=8, offload_kv=True, layer_checkpointing=True)
    chunked_backward(model, tokens(40), tokens(40), config, host_buffers=buffers)
    first = buffers.allocations
    assert first > 0 and buffers.bytes_allocated > 0
    for length, seed in ((40, 3), (37, 4), (24, 5)):
        chunked_backward(model, tokens(length, seed), tokens(length, seed), config, host_buffers=buffers)
        assert buffers.allocations == first, length
    buffers.release()


def grads_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.double().flatten() for p in model.parameters() if p.requires_grad])


def test_bf16_chunkwise_error_is_no_worse_than_a_plain_bf16_backward() -> None:
    """32 chunks in bf16: each block sums up to 31 relayed contributions. Against a float64
    reference, the chunk-wise gradient is no further off than a plain bf16 full-sequence
    backward (measured: 0.85% vs 1.09% relative)."""
    reference = lora_llama(torch.float64)
    ids = tokens(256)

    def plain(model: nn.Module) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        return grads_of(model)

    exact = plain(reference)
    bf16 = copy.deepcopy(reference)
    bf16.get_base_model().to(torch.bfloat16)
    for p in bf16.parameters():
        if p.requires_grad:  # LoRA weights stay float32, as peft keeps them
            p.data = p.data.float()
    plain_error = ((plain(bf16) - exact).norm() / exact.norm()).item()
    bf16.zero_grad(set_to_none=True)
    out = chunked_backward(bf16, ids, ids, ChunkConfig(chunk_size=8))
    assert out.num_chunks == 32
    chunked_error = ((grads_of(bf16) - exact).norm() / exact.norm()).item()
    assert 1e-4 < chunked_error <= plain_error, (chunked_error, plain_error)
