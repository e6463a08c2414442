"""Attention of one chunk to its cached prefix plus itself, block by block.

A chunk of c queries attends to the k-1 earlier chunks (the stage-1 K/V blocks, see
kv_store.py) and causally to itself. Concatenating the prefix and calling SDPA with an
explicit mask would copy the whole prefix per layer and, on CPU, materialise a
c x (prefix + c) score matrix for every head and keep it for backward. Here each block's
attention is computed on its own and the results are merged by their log-sum-exp, as in
FlashAttention and ring attention. Only one block is processed at a time, backward
recomputes each block's share from the merged output and log-sum-exp instead of storing
anything per block, and the result equals softmax attention over the concatenation to
float rounding. The prefix blocks are not autograd inputs: backward hands each block's
gradient to the store that keeps the block (on the device, or in host memory with KV
offload), which sums them for the relay.

Per-block kernels: on CPU, PyTorch's fused flash-attention kernel; on CUDA in bf16/fp16,
PyTorch's FlashAttention-2 forward and backward ops; elsewhere (fp32/fp64 on CUDA) a
plain matmul/softmax version, which is also the reference the tests compare the fused
ones with. The fused kernels never materialise a block's scores. FlashAttention-2 needs a
GPU of compute capability 8.0 or newer; on older ones (T4, V100) the math kernel is used,
with a logged warning.

Streaming: the prefix blocks are consumed one at a time from the store's iterator, which
fetches one block ahead, so at most two blocks of a layer are on the device at once
(with KV offload, the rest stay in host memory). Work that is the same for every block
(dtype conversions, the rowsum(dO * O) term of backward) is done once per call.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from seco_core.errors import UnsupportedModelError
from seco_core.kv_store import LayerPrefix

log = logging.getLogger(__name__)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and softmax statistics in at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _local_mask(groups: int, q_len: int, device: torch.device) -> torch.Tensor:
    """(groups * q_len, q_len) boolean causal mask of the chunk on itself.

    Query rows are laid out as (group, position): row r is query position r % q_len.
    """
    tril = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
    return tril.repeat(groups, 1)


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


def _math_prepare(do: torch.Tensor, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What every block's backward shares: q and dO in the compute dtype and rowsum(dO * O)."""
    cdt = lse.dtype
    doc = do.to(cdt)
    delta = (doc * out.to(cdt)).sum(dim=-1, keepdim=True)
    return doc, q.to(cdt), delta, lse


def _math_backward(
    prepared: tuple[torch.Tensor, ...], k: torch.Tensor, v: torch.Tensor, q_len: int, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    doc, qc, delta, lse = prepared
    cdt = lse.dtype
    p = torch.exp(_scores(qc, k, q_len, causal, scale, cdt) - lse)  # the forward's probabilities, recomputed
    ds = p * (torch.matmul(doc, v.to(cdt).transpose(-1, -2)) - delta) * scale
    return torch.matmul(ds, k.to(cdt)), torch.matmul(ds.transpose(-1, -2), qc), torch.matmul(p.transpose(-1, -2), doc)


def _heads(x: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, Hkv, G*c, ...) -> (B, Hkv*G, c, ...): unfold grouped heads for a causal kernel."""
    return x.reshape(x.shape[0], -1, q_len, *x.shape[3:])


# The fused kernels. PyTorch's flash-attention ops take (B, H, L, D) with equal query and
# key/value heads and return the log-sum-exp as (B, H, L). A prefix block (no mask) takes
# the folded rows as they are: grouped query heads are just more rows attending to the
# same key/value head. The chunk's own block needs the causal mask by position, so its
# query heads are unfolded and its key/value heads repeated to match (c x heads x D:
# small next to the prefix), and the repeated heads' gradients are summed back.

FusedForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, float], tuple[torch.Tensor, torch.Tensor]]


def _fused_forward(
    op: FusedForward, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_len: int, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if not causal:
        out, lse = op(q, k, v, False, scale)
        return out, lse[..., : q.shape[-2]].unsqueeze(-1)
    groups = q.shape[-2] // q_len
    out, lse = op(_heads(q, q_len), k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), True, scale)
    return out.reshape(q.shape), lse[..., :q_len].reshape(*q.shape[:-1], 1)


def _fused_prepare(do: torch.Tensor, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The op's layout for what every block's backward shares: dO and the merged output in
    q's dtype and contiguous, the log-sum-exp as (B, Hkv, R)."""
    return do.contiguous(), q, out.to(q.dtype).contiguous(), lse.squeeze(-1).contiguous()


def _fused_backward(
    op: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    prepared: tuple[torch.Tensor, ...],
    k: torch.Tensor,
    v: torch.Tensor,
    q_len: int,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's backward given the *merged* output and log-sum-exp of all blocks: it
    recomputes this block's probabilities as exp(q k^T * scale - lse) and takes
    rowsum(dO * O) from the merged output, i.e. exactly this block's share of dq and
    its dk, dv."""
    do, q, out, lse = prepared
    if not causal:
        return op(do, q, k, v, out, lse, False, scale)
    groups = q.shape[-2] // q_len
    dq, dk, dv = op(
        _heads(do, q_len),
        _heads(q, q_len),
        k.repeat_interleave(groups, 1),
        v.repeat_interleave(groups, 1),
        _heads(out, q_len),
        _heads(lse, q_len),
        True,
        scale,
    )
    fold = (k.shape[0], k.shape[1], groups, *k.shape[2:])  # sum the repeated heads' gradients
    return dq.reshape(q.shape), dk.reshape(fold).sum(2), dv.reshape(fold).sum(2)


def _cpu_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's fused CPU flash-attention kernel, which also returns the log-sum-exp."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse


def _cpu_op_backward(*args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    do, q, k, v, out, lse, causal, scale = args
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    dq, dk, dv = backward(do, q, k, v, out, lse, 0.0, causal, scale=scale)
    return dq, dk, dv


def _cuda_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's FlashAttention-2 forward (bf16/fp16 on CUDA), which returns the log-sum-exp."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    return out, lse


def _cuda_op_backward(*args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense (no cumulative sequence lengths) and no dropout: the random-state arguments are
    unused placeholders."""
    do, q, k, v, out, lse, causal, scale = args
    unused = torch.empty((), dtype=torch.long, device=q.device)
    backward = torch.ops.aten._scaled_dot_product_flash_attention_backward
    dq, dk, dv = backward(
        do, q, k, v, out, lse, None, None, q.shape[-2], k.shape[-2], 0.0, causal, unused, unused, scale=scale
    )
    return dq, dk, dv


_cpu_forward = functools.partial(_fused_forward, _cpu_op)
_cpu_backward = functools.partial(_fused_backward, _cpu_op_backward)
_cuda_forward = functools.partial(_fused_forward, _cuda_op)
_cuda_backward = functools.partial(_fused_backward, _cuda_op_backward)


@dataclass(frozen=True)
class Kernel:
    """A per-block kernel: `forward(q, k, v, q_len, causal, scale) -> (out, lse)`;
    `prepare(dO, q, out, lse)` once per backward call, then per block
    `backward(prepared, k, v, q_len, causal, scale) -> (dq, dk, dv)`."""

    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    prepare: Callable[..., tuple[torch.Tensor, ...]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


KERNELS: dict[str, Kernel] = {
    "math": Kernel(_math_forward, _math_prepare, _math_backward),
    "cpu": Kernel(_cpu_forward, _fused_prepare, _cpu_backward),
    "cuda": Kernel(_cuda_forward, _fused_prepare, _cuda_backward),
}
FUSED_CUDA_DTYPES = (torch.bfloat16, torch.float16)
FLASH_MIN_CAPABILITY = (8, 0)
"""PyTorch's FlashAttention-2 kernels run on Ampere (8.0) and newer."""


@functools.cache
def _flash_supported(index: int) -> bool:
    """Whether GPU `index` runs FlashAttention-2; says once per GPU when it does not."""
    capability = tuple(torch.cuda.get_device_capability(index))
    if capability >= FLASH_MIN_CAPABILITY:
        return True
    log.warning(
        "cuda:%d has compute capability %d.%d; FlashAttention-2 needs %d.%d or newer, so chunk attention "
        "uses the math kernel there (correct, but slower and with a block's scores in memory)",
        index,
        *capability,
        *FLASH_MIN_CAPABILITY,
    )
    return False


def kernel_for(q: torch.Tensor, requested: str = "auto") -> str:
    """The per-block kernel for a query tensor: fused where PyTorch has one for its device,
    dtype and (on CUDA) compute capability; the math kernel otherwise."""
    if requested != "auto":
        if requested not in KERNELS:
            raise ValueError(f"unknown attention kernel {requested!r}; choose one of {sorted(KERNELS)} or 'auto'")
        return requested
    if q.device.type == "cpu":
        return "cpu"
    head_dim = q.shape[-1]
    if q.device.type == "cuda" and q.dtype in FUSED_CUDA_DTYPES and head_dim % 8 == 0 and head_dim <= 256:
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        if _flash_supported(index):
            return "cuda"
    return "math"


def _merge(
    out: torch.Tensor | None, lse: torch.Tensor | None, out_i: torch.Tensor, lse_i: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one block's softmax output and log-sum-exp into the running ones, in place and
    in the statistics' dtype (float32 or wider): out = out * e^(lse - m) + out_i * e^(lse_i - m)."""
    if out is None or lse is None:
        return out_i.to(lse_i.dtype), lse_i  # no copy when the kernel's output is already that dtype
    merged = torch.logaddexp(lse, lse_i)
    out.mul_(torch.exp(lse - merged)).addcmul_(out_i, torch.exp(lse_i - merged))
    return out, merged


class _BlockAttention(torch.autograd.Function):
    """softmax(q K^T * scale) V over the prefix blocks (fully visible) and the chunk (causal).

    Shapes: q (B, Hkv, R, D) with R = groups * q_len (grouped-query heads folded into
    rows); k, v the chunk's own (B, Hkv, q_len, D); each prefix block (B, Hkv, n_i, D).
    Returns (B, Hkv, R, D). The blocks' outputs are merged by their log-sum-exp in
    float32 (or wider), so only one block is ever being processed. q, k, v are autograd
    inputs; the prefix blocks are not: backward streams them again and deposits each
    block's dk, dv with its store (`LayerPrefix.deposit`).
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        prefix: LayerPrefix,
        scale: float,
        q_len: int,
        kernel: str,
    ) -> torch.Tensor:
        block_forward = KERNELS[kernel].forward
        out: torch.Tensor | None = None
        lse: torch.Tensor | None = None
        # One block at a time, straight from the store's iterator (never a list of them): the
        # store fetches the next block while this one is used, and each block's reference is
        # dropped before the one after next is fetched, so at most two are on the device.
        for k_i, v_i in prefix.stream(forward=True):
            out_i, lse_i = block_forward(q, k_i, v_i, q_len, False, scale)
            del k_i, v_i
            out, lse = _merge(out, lse, out_i, lse_i)
            del out_i, lse_i
        out, lse = _merge(out, lse, *block_forward(q, k, v, q_len, True, scale))
        ctx.prefix, ctx.scale, ctx.q_len, ctx.kernel = prefix, scale, q_len, kernel
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        kernel: Kernel = KERNELS[ctx.kernel]
        prefix: LayerPrefix = ctx.prefix
        prepared = kernel.prepare(grad_out, q, out, lse)
        dq, dk, dv = kernel.backward(prepared, k, v, ctx.q_len, True, ctx.scale)
        dq = dq.to(lse.dtype)  # summed over the blocks in float32 or wider
        i = 0  # not enumerate(), whose reused result tuple would keep the previous block alive
        for k_i, v_i in prefix.stream(forward=False):
            dq_i, dk_i, dv_i = kernel.backward(prepared, k_i, v_i, ctx.q_len, False, ctx.scale)
            del k_i, v_i  # before the store fetches the block after next
            dq += dq_i
            prefix.deposit(i, dk_i, dv_i)
            del dq_i, dk_i, dv_i
            i += 1  # noqa: SIM113 (see above)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def refuse_unsupported_options(module: Any, dropout: float, options: dict[str, Any]) -> None:
    """What `chunk_attention` does not compute, refused by name (a transformers attention
    function receives them from the layer): attention dropout, logit soft-capping, sinks."""
    arch = type(module).__name__
    if dropout:
        raise UnsupportedModelError(f"{arch}: attention dropout ({dropout}) is not supported; set it to 0")
    if options.get("softcap") is not None:
        raise UnsupportedModelError(f"{arch}: attention logit soft-capping is not supported")
    if options.get("s_aux") is not None:
        raise UnsupportedModelError(f"{arch}: attention sinks are not supported")


def chunk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    prefix: LayerPrefix | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Attention of a chunk's queries to its prefix blocks (fully visible) and itself (causal).

    query: (B, Hq, c, D); key, value: the chunk's own (B, Hkv, c, D); `prefix` the
    earlier chunks' blocks of this layer (none: plain causal attention). Hq must be a
    multiple of Hkv (grouped-query attention). Returns (B, c, Hq, D), the layout
    transformers' attention functions return.
    """
    bsz, q_heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")
    if key.shape[-2] != q_len:
        raise ValueError("key and value must be the chunk's own (as long as the query)")
    groups = q_heads // kv_heads
    q = query.contiguous().reshape(bsz, kv_heads, groups * q_len, head_dim)  # heads h = kv * groups + g
    prefix = prefix if prefix is not None else LayerPrefix.empty()
    out = _BlockAttention.apply(q, key.contiguous(), value.contiguous(), prefix, scale, q_len, kernel_for(q, kernel))
    out = out.reshape(bsz, q_heads, q_len, head_dim)
    return out.transpose(1, 2)
