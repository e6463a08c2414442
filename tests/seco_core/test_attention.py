"""Block attention equals softmax attention over the concatenated prefix and chunk."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seco_core.attention import chunk_attention


@pytest.mark.parametrize("kernel", ["math", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 2), (3, 3)])
def test_matches_sdpa_over_the_concatenation(kernel: str, dtype: torch.dtype, q_heads: int, kv_heads: int) -> None:
    torch.manual_seed(0)
    bsz, c, d, prefix = 2, 5, 8, [7, 3, 5]
    q = torch.randn(bsz, q_heads, c, d, dtype=dtype, requires_grad=True)
    ks = [torch.randn(bsz, kv_heads, n, d, dtype=dtype, requires_grad=True) for n in [*prefix, c]]
    vs = [torch.randn(bsz, kv_heads, n, d, dtype=dtype, requires_grad=True) for n in [*prefix, c]]
    out = chunk_attention(q, ks, vs, scale=0.3, kernel=kernel)

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
    got = torch.autograd.grad(out, [q, *ks, *vs], grad)
    want = torch.autograd.grad(ref, [q, *ks, *vs], grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_non_contiguous_inputs() -> None:
    """GPT-NeoX hands over q/k/v as slices of one fused projection."""
    torch.manual_seed(1)
    qkv = torch.randn(1, 2, 6, 24, dtype=torch.float64)
    q, k, v = qkv.chunk(3, dim=-1)
    out = chunk_attention(q, [k], [v], scale=0.5)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5).transpose(1, 2)
    torch.testing.assert_close(out, ref)
