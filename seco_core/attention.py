"""Attention of one chunk to its cached prefix plus itself, block by block.

A chunk of c queries attends to the k-1 earlier chunks (the detached KV leaves of
stage 1) and causally to itself. Concatenating the prefix and calling SDPA with an
explicit mask would copy the whole prefix per layer and, on CPU, materialise a
c x (prefix + c) score matrix for every head and keep it for backward. Here the
keys arrive as a list of blocks (one per cached chunk, the local block last); each
block's attention is computed on its own and the results are merged by their
log-sum-exp, as in FlashAttention and ring attention. Only one c x block score matrix
exists at a time, backward recomputes each block's scores from the merged output and
log-sum-exp instead of storing them, and the result equals softmax attention over the
concatenation to float rounding. Memory is O(c x block) per head whatever the prefix.

Per-block kernels: on CPU, PyTorch's fused flash-attention kernel (which returns the
log-sum-exp and has a backward taking it); elsewhere a plain matmul/softmax version,
which is also the reference the tests compare the fused one with.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and softmax statistics in at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _local_mask(groups: int, q_len: int, device: torch.device) -> torch.Tensor:
    """(groups * q_len, q_len) boolean causal mask of the chunk on itself.

    Query rows are laid out as (group, position): row r is query position r % q_len.
    """
    tril = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
    return tril.repeat(groups, 1)


def _stream_pairs(
    keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield each (key, value) block on `device`.

    Blocks that live elsewhere (host memory, with KV offload) are copied one at a time,
    so only one block is ever resident on the device; on CUDA the next block's copy is
    issued on a side stream while the current one is being used.
    """
    pairs = list(zip(keys, values, strict=True))
    if device.type != "cuda" or all(k.device == device for k, _ in pairs):
        for k, v in pairs:
            yield k.to(device), v.to(device)
        return
    side = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)

    def fetch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.cuda.stream(side):
            k, v = pairs[i]
            return k.to(device, non_blocking=True), v.to(device, non_blocking=True)

    ahead = fetch(0)
    for i in range(len(pairs)):
        main.wait_stream(side)
        k, v = ahead
        k.record_stream(main)
        v.record_stream(main)
        if i + 1 < len(pairs):
            ahead = fetch(i + 1)
        yield k, v


# Per-block kernels. Each takes q folded as (B, Hkv, R, D), R = groups * q_len, and one
# key/value block (B, Hkv, n, D); `causal` marks the chunk's own block (n == q_len).
# Forward returns the block's own softmax output and log-sum-exp (B, Hkv, R, 1); backward
# takes the *merged* output and log-sum-exp of all blocks, which is all FlashAttention's
# backward needs to produce this block's share of dq and its dk, dv.


def _scores(
    q: torch.Tensor, k: torch.Tensor, q_len: int, causal: bool, scale: float, dtype: torch.dtype
) -> torch.Tensor:
    """Scaled scores (B, Hkv, R, n) in `dtype`, with the chunk's causal mask when `causal`."""
    s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~_local_mask(q.shape[-2] // q_len, q_len, q.device), float("-inf"))
    return s


def _math_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_len: int, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain matmul + softmax in float32 or wider; works on any device and dtype."""
    cdt = _compute_dtype(q.dtype)
    s = _scores(q, k, q_len, causal, scale, cdt)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    return torch.matmul(torch.exp(s - lse), v.to(cdt)), lse


def _math_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_len: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cdt = lse.dtype
    p = torch.exp(_scores(q, k, q_len, causal, scale, cdt) - lse)  # the forward's probabilities, recomputed
    qc, kc, doc = q.to(cdt), k.to(cdt), do.to(cdt)
    delta = (doc * out.to(cdt)).sum(dim=-1, keepdim=True)  # rowsum(dO * O)
    ds = p * (torch.matmul(doc, v.to(cdt).transpose(-1, -2)) - delta) * scale
    return torch.matmul(ds, kc), torch.matmul(ds.transpose(-1, -2), qc), torch.matmul(p.transpose(-1, -2), doc)


def _heads(x: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, Hkv, G*c, ...) -> (B, Hkv*G, c, ...): unfold grouped heads for a causal kernel."""
    return x.reshape(x.shape[0], -1, q_len, *x.shape[3:])


def _cpu_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_len: int, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's fused CPU flash-attention kernel, which also returns the log-sum-exp."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if causal:  # rows must be positions for the causal mask: unfold the query groups
        groups = q.shape[-2] // q_len
        out, lse = flash(
            _heads(q, q_len), k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), 0.0, True, scale=scale
        )
        return out.reshape(q.shape), lse.reshape(*q.shape[:-1], 1)
    out, lse = flash(q, k, v, 0.0, False, scale=scale)
    return out, lse.unsqueeze(-1)


def _cpu_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_len: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    out, lse = out.to(q.dtype), lse.squeeze(-1)
    if not causal:
        return flash_backward(do, q, k, v, out, lse, 0.0, False, scale=scale)
    groups = q.shape[-2] // q_len
    dq, dk, dv = flash_backward(
        _heads(do, q_len), _heads(q, q_len), k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
        _heads(out, q_len), _heads(lse, q_len), 0.0, True, scale=scale,
    )  # fmt: skip
    fold = (k.shape[0], k.shape[1], groups, *k.shape[2:])  # sum the repeated heads' gradients
    return dq.reshape(q.shape), dk.reshape(fold).sum(2), dv.reshape(fold).sum(2)


KERNELS = {"math": (_math_forward, _math_backward), "cpu": (_cpu_forward, _cpu_backward)}


def _kernel_name(q: torch.Tensor, requested: str) -> str:
    if requested != "auto":
        return requested
    return "cpu" if q.device.type == "cpu" else "math"


class _BlockAttention(torch.autograd.Function):
    """softmax(q K^T * scale) V over key blocks, the last of which is causal.

    Shapes: q (B, Hkv, R, D) with R = groups * q_len (grouped-query heads folded into
    rows); each key/value block (B, Hkv, n_i, D). Returns (B, Hkv, R, D). The blocks'
    outputs are merged by their log-sum-exp, so only one block's scores ever exist.
    Blocks may live on another device than q (offloaded KV): they are streamed in, only
    the host tensors are saved for backward, which streams them again and sends their
    gradients back to where they live.
    """

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, scale: float, q_len: int, kernel: str, *blocks: torch.Tensor
    ) -> torch.Tensor:
        block_forward = KERNELS[kernel][0]
        keys, values = blocks[0::2], blocks[1::2]
        last = len(keys) - 1
        out = lse = None
        for i, (k, v) in enumerate(_stream_pairs(keys, values, q.device)):
            out_i, lse_i = block_forward(q, k, v, q_len, i == last, scale)
            if out is None or lse is None:
                out, lse = out_i.to(lse_i.dtype), lse_i
                continue
            merged = torch.logaddexp(lse, lse_i)
            out = out * torch.exp(lse - merged) + out_i.to(merged.dtype) * torch.exp(lse_i - merged)
            lse = merged
        assert out is not None and lse is not None
        ctx.scale, ctx.q_len, ctx.kernel = scale, q_len, kernel
        ctx.save_for_backward(q, out, lse, *blocks)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, out, lse, *blocks = ctx.saved_tensors
        block_backward = KERNELS[ctx.kernel][1]
        keys, values = blocks[0::2], blocks[1::2]
        grad_out = grad_out.contiguous()
        dq = torch.zeros(q.shape, dtype=lse.dtype, device=q.device)
        block_grads: list[torch.Tensor | None] = []
        last = len(keys) - 1
        for i, (k, v) in enumerate(_stream_pairs(keys, values, q.device)):
            dq_i, dk, dv = block_backward(grad_out, q, k, v, out, lse, ctx.q_len, i == last, ctx.scale)
            dq += dq_i
            home_k, home_v = keys[i], values[i]  # gradients go back to where the block lives
            block_grads.append(dk.to(home_k.device, home_k.dtype) if ctx.needs_input_grad[4 + 2 * i] else None)
            block_grads.append(dv.to(home_v.device, home_v.dtype) if ctx.needs_input_grad[5 + 2 * i] else None)
        return (dq.to(q.dtype), None, None, None, *block_grads)


def chunk_attention(
    query: torch.Tensor,
    key_blocks: list[torch.Tensor],
    value_blocks: list[torch.Tensor],
    scale: float,
    kernel: str = "auto",
) -> torch.Tensor:
    """Attention of a chunk's queries to prefix blocks (fully visible) and itself (causal).

    query: (B, Hq, c, D). key_blocks / value_blocks: lists of (B, Hkv, n_i, D); the last
    block is the chunk itself (n_last == c). Hq must be a multiple of Hkv (grouped-query
    attention). Returns (B, c, Hq, D), the layout transformers' attention functions return.
    """
    bsz, q_heads, q_len, head_dim = query.shape
    kv_heads = key_blocks[-1].shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")
    if key_blocks[-1].shape[-2] != q_len:
        raise ValueError("the last key block must be the chunk itself")
    groups = q_heads // kv_heads
    q = query.contiguous().reshape(bsz, kv_heads, groups * q_len, head_dim)  # heads h = kv * groups + g
    blocks = [t for kv in zip(key_blocks, value_blocks, strict=True) for t in kv]
    out = _BlockAttention.apply(q, scale, q_len, _kernel_name(q, kernel), *blocks)
    out = out.reshape(bsz, q_heads, q_len, head_dim)
    return out.transpose(1, 2)
