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


@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim"), [(32, 8, 128), (8, 8, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_kernel_matches_math_on_cuda(q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    """FlashAttention-2 per block (prefix blocks with folded GQA rows, the causal chunk
    unfolded), merged by log-sum-exp, against the float32 matmul kernel: output, dq, the
    chunk's dk/dv and every prefix block's gradient sum."""
    from seco_core.attention import chunk_attention
    from seco_core.kv_store import DeviceStore, LayerPrefix

    torch.manual_seed(0)
    c, prefix = 256, [256, 256, 100]
    results = {}
    for kernel in ("cuda", "math"):
        torch.manual_seed(0)
        q = torch.randn(1, q_heads, c, head_dim, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(1, kv_heads, c, head_dim, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(1, kv_heads, c, head_dim, device="cuda", dtype=dtype, requires_grad=True)
        store = DeviceStore()
        blocks = [
            store.put(
                torch.randn(1, kv_heads, n, head_dim, device="cuda", dtype=dtype),
                torch.randn(1, kv_heads, n, head_dim, device="cuda", dtype=dtype),
                needs_grad=True,
            )
            for n in prefix
        ]
        out = chunk_attention(q, k, v, head_dim**-0.5, LayerPrefix(store, blocks, 0), kernel=kernel)
        out.backward(torch.randn_like(out))
        results[kernel] = [out, q.grad, k.grad, v.grad, *(g for b in blocks for g in (b.key_grad, b.value_grad))]
    for fused, ref in zip(results["cuda"], results["math"], strict=True):
        assert fused is not None and ref is not None
        err = ((fused.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err < 2e-2, err
