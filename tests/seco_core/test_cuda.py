"""CUDA checks: run with a GPU (`pytest -m gpu tests/seco_core/test_cuda.py`); skipped without one.

On CPU the offload's host and compute device coincide; here the K/V leaves really live in
pinned host memory and are streamed to the GPU block by block.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seco_core import ChunkConfig, chunked_backward
from seco_core.lora import attach_lora
from tests.seco_core.test_parity import batch, max_rel_error, reference_grads
from tests.seco_core.tiny import tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def lora_model(arch: str, dtype: torch.dtype) -> nn.Module:
    model = attach_lora(tiny_model(arch, dtype=dtype), r=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return model.cuda()


@pytest.mark.parametrize("options", [{}, {"offload_kv": True, "layer_checkpointing": True}], ids=["plain", "offload"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt_neox"])
def test_parity_on_cuda(arch: str, options: dict[str, bool]) -> None:
    model = lora_model(arch, torch.float64)
    ids, labels = (t.cuda() for t in batch())
    _, ref = reference_grads(model, ids, labels)
    chunked_backward(model, ids, labels, ChunkConfig(chunk_size=8, **options))
    assert max_rel_error(model, ref) < 1e-10


def test_offload_keeps_device_memory_flat() -> None:
    """With KV offload the device peak must not grow with the sequence length."""
    model = lora_model("llama", torch.float32)
    peaks = []
    for length in (2048, 8192):
        ids = torch.randint(3, 97, (1, length), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        chunked_backward(model, ids, ids, ChunkConfig(chunk_size=256, offload_kv=True, layer_checkpointing=True))
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        model.zero_grad(set_to_none=True)
    assert peaks[1] < 1.2 * peaks[0], peaks
