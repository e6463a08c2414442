"""Block attention equals softmax attention over the concatenated prefix and chunk."""

from __future__ import annotations

import logging
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from seco_core import attention
from seco_core.attention import (
    _cuda_backward,
    _cuda_forward,
    _fused_prepare,
    _math_forward,
    chunk_attention,
    kernel_for,
)
from seco_core.kv_store import DeviceStore, HostBuffers, HostStore, KVBlock, LayerPrefix, _Prefetched


@pytest.mark.parametrize("kernel", ["math", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 2), (3, 3)])
@pytest.mark.parametrize("store", ["device", "host"])
def test_matches_sdpa_over_the_concatenation(
    kernel: str, dtype: torch.dtype, q_heads: int, kv_heads: int, store: str
) -> None:
    torch.manual_seed(0)
    bsz, c, d, prefix = 2, 5, 8, [7, 3, 5]
    q = torch.randn(bsz, q_heads, c, d, dtype=dtype, requires_grad=True)
    ks = [torch.randn(bsz, kv_heads, n, d, dtype=dtype, requires_grad=True) for n in [*prefix, c]]
    vs = [torch.randn(bsz, kv_heads, n, d, dtype=dtype, requires_grad=True) for n in [*prefix, c]]
    kv = DeviceStore() if store == "device" else HostStore(torch.device("cpu"), chunk_size=8)
    blocks = [kv.put(k, v, needs_grad=True) for k, v in zip(ks[:-1], vs[:-1], strict=True)]
    out = chunk_attention(q, ks[-1], vs[-1], 0.3, LayerPrefix(kv, blocks, 0), kernel=kernel)

    g = q_heads // kv_heads
    k_all = torch.cat(ks, dim=2).repeat_interleave(g, dim=1)
    v_all = torch.cat(vs, dim=2).repeat_interleave(g, dim=1)
    p = sum(prefix)
    mask = torch.ones(c, p + c, dtype=torch.bool)
    mask[:, p:] = torch.ones(c, c, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=0.3).transpose(1, 2)

    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert out.shape == (bsz, c, q_heads, d)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, ks[-1], vs[-1]], grad)
    want = torch.autograd.grad(ref, [q, *ks, *vs], grad)
    for a, b in zip(got, [want[0], want[len(ks)], want[-1]], strict=True):  # q and the chunk's own k, v
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    kv.close()
    for i, block in enumerate(blocks):  # the prefix blocks' gradients went to their sums, in float32 or wider
        assert block.key_grad is not None and block.value_grad is not None
        assert block.key_grad.dtype == torch.promote_types(dtype, torch.float32)
        torch.testing.assert_close(block.key_grad, want[1 + i], rtol=tol, atol=tol)
        torch.testing.assert_close(block.value_grad, want[len(ks) + 1 + i], rtol=tol, atol=tol)


def test_non_contiguous_inputs() -> None:
    """GPT-NeoX hands over q/k/v as slices of one fused projection."""
    torch.manual_seed(1)
    qkv = torch.randn(1, 2, 6, 24, dtype=torch.float64)
    q, k, v = qkv.chunk(3, dim=-1)
    out = chunk_attention(q, k, v, scale=0.5)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5).transpose(1, 2)
    torch.testing.assert_close(out, ref)


def test_fused_cuda_kernel_matches_the_installed_ops() -> None:
    """The fused CUDA kernel runs where a GPU is; here its calls are checked against the
    installed torch's op schemas by running them on meta tensors (shapes and dtypes only),
    for a prefix block (folded query heads) and the chunk's own causal block (GQA)."""
    names = {
        "_scaled_dot_product_flash_attention": [
            "query",
            "key",
            "value",
            "dropout_p",
            "is_causal",
            "return_debug_mask",
            "scale",
        ],
        "_scaled_dot_product_flash_attention_backward": [
            "grad_out",
            "query",
            "key",
            "value",
            "out",
            "logsumexp",
            "cum_seq_q",
            "cum_seq_k",
            "max_q",
            "max_k",
            "dropout_p",
            "is_causal",
            "philox_seed",
            "philox_offset",
            "scale",
        ],
    }
    for op, args in names.items():
        assert [a.name for a in getattr(torch.ops.aten, op).default._schema.arguments] == args
    bsz, kv_heads, groups, c, n, d = 1, 8, 4, 256, 384, 128  # Llama-3-8B's heads
    meta = {"device": "meta", "dtype": torch.bfloat16}
    q = torch.empty(bsz, kv_heads, groups * c, d, **meta)
    for k_len, causal in ((n, False), (c, True)):
        k, v = torch.empty(bsz, kv_heads, k_len, d, **meta), torch.empty(bsz, kv_heads, k_len, d, **meta)
        out, lse = _cuda_forward(q, k, v, c, causal, 0.088)
        ref_out, ref_lse = _math_forward(q.to("meta"), k, v, c, causal, 0.088)
        assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
        assert lse.dtype == torch.float32
        dq, dk, dv = _cuda_backward(_fused_prepare(out, q, out.float(), lse), k, v, c, causal, 0.088)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


def test_kernel_choice() -> None:
    assert kernel_for(torch.empty(1, 1, 4, 128)) == "cpu"
    assert kernel_for(torch.empty(1, 1, 4, 128, device="meta")) == "math"
    assert kernel_for(torch.empty(1, 1, 4, 128), "math") == "math"


def test_gpus_older_than_ampere_fall_back_to_the_math_kernel(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """FlashAttention-2 needs compute capability 8.0: on a T4 (7.5) or V100 (7.0) bf16 attention
    takes the math kernel, with one warning per GPU, instead of failing in the fused op. The
    capability query is faked, so this runs without a GPU."""
    capability = [(7, 5)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability[0])
    q = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, shape=(1, 8, 64, 128))
    attention._flash_supported.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="seco_core.attention"):
            assert kernel_for(q) == "math"  # type: ignore[arg-type]
            assert kernel_for(q) == "math"  # type: ignore[arg-type]
        messages = [r.getMessage() for r in caplog.records if r.name == "seco_core.attention"]
        assert len(messages) == 1, messages
        assert "compute capability 7.5" in messages[0] and "math kernel" in messages[0]
        capability[0] = (8, 0)
        attention._flash_supported.cache_clear()
        assert kernel_for(q) == "cuda"  # type: ignore[arg-type]
    finally:
        attention._flash_supported.cache_clear()


def test_an_unknown_kernel_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
        kernel_for(torch.empty(1, 1, 4, 8), "flash")


class CountingStore(HostStore):
    """A host store whose fetches are real copies (as they are to a GPU), counting how many
    fetched copies are alive at once: a copy is alive until nothing references it."""

    def __init__(self, device: torch.device, chunk_size: int, buffers: HostBuffers | None = None) -> None:
        super().__init__(device, chunk_size, buffers)
        self.alive = self.most_alive = self.fetches = 0

    def _copy_in(self, block: KVBlock) -> _Prefetched:
        key, value = block.key.clone(), block.value.clone()
        self.fetches += 1
        self.alive += 1
        self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(key, self._gone)
        return _Prefetched(block, key, value, None)

    def _gone(self) -> None:
        self.alive -= 1


@pytest.mark.parametrize("kernel", ["math", "cpu"])
def test_prefix_blocks_stream_one_ahead(kernel: str) -> None:
    """Forward and backward take the prefix blocks one at a time from the store, never as a
    list: with the next block prefetched, at most two fetched blocks are alive at once (with
    KV offload on a GPU: on the device), and the results are those of the device store."""
    torch.manual_seed(3)
    bsz, heads, c, d, n_blocks = 1, 2, 4, 8, 6
    q = torch.randn(bsz, heads, c, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(bsz, heads, c, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pairs = [
        (torch.randn(bsz, heads, c, d, dtype=torch.float64), torch.randn(bsz, heads, c, d, dtype=torch.float64))
        for _ in range(n_blocks)
    ]
    grad = torch.randn(bsz, c, heads, d, dtype=torch.float64)
    results = []
    for store in (DeviceStore(), CountingStore(torch.device("cpu"), chunk_size=c)):
        blocks = [store.put(key, value, needs_grad=True) for key, value in pairs]
        out = chunk_attention(q, k, v, 0.4, LayerPrefix(store, blocks, 0), kernel=kernel)
        results.append((out.detach(), *torch.autograd.grad(out, [q, k, v], grad)))
        store.close()
        results[-1] += tuple(b.key_grad for b in blocks) + tuple(b.value_grad for b in blocks)
    assert isinstance(store, CountingStore)
    assert store.fetches == 2 * n_blocks  # each block once in forward, once in backward
    assert store.most_alive <= 2, store.most_alive
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
