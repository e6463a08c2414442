"""Attention of one chunk to its cached prefix plus itself, block by block.

A chunk of c queries attends to the k-1 earlier chunks (the detached KV leaves of
stage 1) and causally to itself. Concatenating the prefix and calling SDPA with an
explicit mask would copy the whole prefix per layer and, on CPU, materialise a
c x (prefix + c) score matrix for every head and keep it for backward. Here the
keys arrive as a list of blocks (one per cached chunk, the local block last) and
are folded in with an online softmax (running max and log-sum-exp, as in
FlashAttention): only one c x block score matrix exists at a time, and backward
recomputes the scores per block from the saved log-sum-exp instead of storing them.
Memory is O(c x block) per head whatever the prefix length, on CPU and GPU alike,
and the result equals softmax attention over the concatenation (to float rounding).
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


class _BlockAttention(torch.autograd.Function):
    """softmax(q K^T * scale) V over key blocks, the last of which is causal.

    Shapes: q (B, Hkv, R, D) with R = groups * q_len (grouped-query heads folded into
    rows); each key/value block (B, Hkv, n_i, D). Returns (B, Hkv, R, D). Blocks may live
    on another device than q (offloaded KV): they are streamed in, and only the host
    tensors are saved for backward, which streams them again and sends their gradients
    back to where they live.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, scale: float, q_len: int, *blocks: torch.Tensor) -> torch.Tensor:
        cdt = _compute_dtype(q.dtype)
        keys, values = blocks[0::2], blocks[1::2]
        groups = q.shape[-2] // q_len
        mask = _local_mask(groups, q_len, q.device)
        qc = q.to(cdt)
        batch_heads = q.shape[:-1]
        row_max = torch.full((*batch_heads, 1), float("-inf"), dtype=cdt, device=q.device)
        row_sum = torch.zeros((*batch_heads, 1), dtype=cdt, device=q.device)
        acc = torch.zeros(qc.shape, dtype=cdt, device=q.device)
        last = len(keys) - 1
        for i, (k, v) in enumerate(_stream_pairs(keys, values, q.device)):
            s = torch.matmul(qc, k.to(cdt).transpose(-1, -2)) * scale  # (B, Hkv, R, n_i)
            if i == last:
                s = s.masked_fill(~mask, float("-inf"))
            new_max = torch.maximum(row_max, s.amax(dim=-1, keepdim=True))
            p = torch.exp(s - new_max)
            correction = torch.exp(row_max - new_max)
            row_sum = row_sum * correction + p.sum(dim=-1, keepdim=True)
            acc = acc * correction + torch.matmul(p, v.to(cdt))
            row_max = new_max
        out = acc / row_sum
        lse = row_max + torch.log(row_sum)  # (B, Hkv, R, 1)
        ctx.scale = scale
        ctx.q_len = q_len
        ctx.save_for_backward(q, out, lse, *blocks)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, out, lse, *blocks = ctx.saved_tensors
        keys, values = blocks[0::2], blocks[1::2]
        scale: float = ctx.scale
        cdt = out.dtype
        groups = q.shape[-2] // ctx.q_len
        mask = _local_mask(groups, ctx.q_len, q.device)
        qc = q.to(cdt)
        do = grad_out.to(cdt)
        delta = (do * out).sum(dim=-1, keepdim=True)  # rowsum(dO * O), (B, Hkv, R, 1)
        dq = torch.zeros_like(qc)
        block_grads: list[torch.Tensor | None] = []
        last = len(keys) - 1
        for i, (k, v) in enumerate(_stream_pairs(keys, values, q.device)):
            kc, vc = k.to(cdt), v.to(cdt)
            s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
            if i == last:
                s = s.masked_fill(~mask, float("-inf"))
            p = torch.exp(s - lse)  # the forward's probabilities, recomputed
            dp = torch.matmul(do, vc.transpose(-1, -2))
            ds = p * (dp - delta) * scale
            dq += torch.matmul(ds, kc)
            need_k = ctx.needs_input_grad[3 + 2 * i]
            need_v = ctx.needs_input_grad[4 + 2 * i]
            home_k, home_v = keys[i], values[i]  # gradients go back to where the block lives
            dk = torch.matmul(ds.transpose(-1, -2), qc).to(home_k.device, home_k.dtype) if need_k else None
            dv = torch.matmul(p.transpose(-1, -2), do).to(home_v.device, home_v.dtype) if need_v else None
            block_grads += [dk, dv]
        return (dq.to(q.dtype), None, None, *block_grads)


def chunk_attention(
    query: torch.Tensor,
    key_blocks: list[torch.Tensor],
    value_blocks: list[torch.Tensor],
    scale: float,
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
    q = query.reshape(bsz, kv_heads, groups * q_len, head_dim)  # heads h = kv * groups + g
    blocks = [t for kv in zip(key_blocks, value_blocks, strict=True) for t in kv]
    out = _BlockAttention.apply(q, scale, q_len, *blocks)
    out = out.reshape(bsz, q_heads, q_len, head_dim)
    return out.transpose(1, 2)
