"""The estimate: bytes per term of the peak of one chunk-wise training step.

    M(L, c) ≈ W + O_LoRA + L·kv + (L−c)·kv·g + c·a + logits(c) + T(L) + workspace

`PlanOptions` says how the step runs (each option changes some terms); `estimate` returns
every term separately (`MemoryEstimate`). The terms follow what seco_core runs: K/V
gradient sums in float32 (kv_store.py), fused per-block attention kernels that never
hold a block's scores (attention.py), logits of one loss slice, and the logits and
attention transients never alive at the same time (the loss is back-propagated before
the layers are).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from seco_core.kv_store import STAGING_BUFFERS
from seco_core.memory_plan.allocators import ALLOCATOR_FRAGMENTATION, cuda_block_bytes, pinned_bytes
from seco_core.memory_plan.shapes import ModelShape
from seco_core.memory_plan.sizes import GiB, format_bytes

NF4_BYTES_PER_PARAM = 0.5 + 0.127 / 8
"""QLoRA NF4: 4 bits per weight plus double-quantised block constants (0.127 bits/param,
Dettmers et al. 2023). Only decoder linear layers are quantised; embeddings, the LM head
and norms stay in the compute dtype."""


# Per-token, per-decoder-layer tensors that one layer keeps for its backward pass, in
# elements of the compute dtype (see `layer_activation_bytes`):
LAYER_ACT_HIDDEN = 4
"""H-sized: the layer input and the mid-layer residual (both saved by the RMSNorms) and
the two RMSNorm outputs (inputs of the attention and MLP projections)."""
LAYER_ACT_NORM_FP32 = 2
"""H-sized float32: Llama's RMSNorm upcasts its input to fp32 and saves it (two norms)."""
LAYER_ACT_QO = 2
"""(num_heads·head_dim)-sized: the rotated queries and the attention output (o_proj input)."""
LAYER_ACT_KV = 2
"""(num_kv_heads·head_dim)-sized: the chunk's rotated keys and values."""
LAYER_ACT_MLP = 4
"""I-sized: gate_proj and up_proj outputs, act(gate) and act(gate)·up (down_proj input)."""


@dataclass(frozen=True)
class PlanOptions:
    """How the step is run; every option changes one or more terms of the estimate."""

    dtype_bytes: int = 2
    """Compute dtype of weights, activations and the KV cache: bf16/fp16 2, fp32 4."""
    batch_size: int = 1
    """Sequences per forward pass (each of seq_len tokens)."""
    lora_r: int | None = 8
    """LoRA rank; None means full fine-tuning (every parameter trainable)."""
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Adapted projections (transformers names, or "all-linear")."""
    optimizer: bool = True
    """Count AdamW state (two fp32 moments per trainable parameter)."""
    kv_grad_bytes: int | None = None
    """Bytes per element of the K/V gradient sums; None: what seco_core keeps, float32
    (or the compute dtype when wider). 2 models bf16 sums (the reference seco code's)."""
    kv_offload: bool = False
    """KV cache and its gradients live in (pinned) host memory; the prefix is streamed to
    the device one chunk-sized block at a time while attention runs (ChunkConfig.offload_kv)."""
    layer_checkpointing: bool = False
    """Checkpoint every decoder layer inside a chunk: only the layer inputs stay alive,
    plus one layer's working set while it is recomputed."""
    loss_slice: int | None = 1024
    """Tokens whose full-vocabulary logits exist at once (ChunkConfig.loss_slice);
    None: the whole chunk's logits at once."""
    fused_loss: bool = False
    """Fused linear + cross-entropy (Liger FLCE, Apple CCE): logits never materialised."""
    weights_4bit: bool = False
    """NF4 base weights (bitsandbytes, QLoRA) for the decoder's linear layers."""
    materialized_attention: bool = False
    """Attention materialises chunk × prefix score matrices and keeps them for backward
    (the math SDPA path with an explicit mask). False: seco_core's block attention
    (attention.py), one block at a time."""
    fused_attention: bool = True
    """seco_core's block attention runs fused kernels (the CPU flash kernel; FlashAttention-2
    on CUDA in bf16/fp16) that never hold a block's scores. False: the matmul kernel (fp32
    or fp64 on CUDA), which holds one c × c block's scores, probabilities and their
    gradients while it is differentiated."""
    max_chunk: int | None = None
    """Largest chunk `choose_chunk_size` proposes even when a larger one fits: larger is
    not faster past a point (FASTEST_CHUNK per device kind)."""
    prefix_concat: bool = False
    """The layer's prefix K/V is `torch.cat`-ed with the chunk's and expanded to every
    query head for attention (the reference seco code's LayerCache.update): adds the
    transient T(L). seco_core's block attention reads the leaves in place (no T(L))."""
    workspace_bytes: int = 2 * GiB
    """Allocator slack, cuBLAS/attention workspaces and small tensors not modelled here."""
    branch_tokens: int = 0
    """A prefix-tree step (seco_core.prefix; DPO): tokens of the further continuations of
    the sequence's prefix, whose K/V blocks (and their gradient sums) stay alive beside it
    until stage 2 reaches them. A DPO pair: the shorter answer's length, with seq_len the
    prompt plus the longer answer. DPO's reference pass needs no term of its own: it is a
    stage-1-only tree on the same weights (adapter disabled), freed before the policy's."""

    def __post_init__(self) -> None:
        if self.dtype_bytes not in (1, 2, 4, 8):
            raise ValueError(f"dtype_bytes must be 1, 2, 4 or 8, got {self.dtype_bytes!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.lora_r is not None and self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1 or None, got {self.lora_r!r}")
        if self.loss_slice is not None and self.loss_slice < 1:
            raise ValueError(f"loss_slice must be >= 1 or None, got {self.loss_slice!r}")
        if self.workspace_bytes < 0:
            raise ValueError(f"workspace_bytes must be >= 0, got {self.workspace_bytes!r}")
        if self.branch_tokens < 0:
            raise ValueError(f"branch_tokens must be >= 0, got {self.branch_tokens!r}")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per term of the peak of one chunk-wise step (at the first backward chunk).

    Device terms add up to `total`; with KV offload the KV cache and its gradients are
    in `host_kv_cache` / `host_kv_grad` instead and add up to `host_total`.
    """

    seq_len: int
    chunk_size: int
    weights: int
    """Base model parameters (frozen under LoRA): num_params × dtype, or NF4 decoder linears."""
    trainable_state: int
    """LoRA: the adapters' fp32 weights + fp32 grads + AdamW m and v (16 B/param). Full
    fine-tuning: accumulated + fresh grad, fp32 master copy (low-precision weights), AdamW."""
    kv_cache: int
    """The detached K/V blocks m'_1..m'_k of every layer: B·(L + branch_tokens)·kv_per_token."""
    kv_grad: int
    """Their gradient sums for all but the last chunk: B·(L + branch_tokens − c)·kv_per_token·g."""
    activations: int
    """One chunk's saved tensors: B·c·a; a = layers × layer working set, or with layer
    checkpointing layers × layer input + one layer's working set."""
    attention_scores: int
    """Attention transients: with fused kernels, the float32 merged output, the block's
    output and dq of one layer's chunk; with the matmul kernel, one (c × c) block's
    scores, probabilities and their two gradients per head in fp32; materialized
    attention keeps (c × L) probabilities per head for every layer."""
    logits: int
    """Full-vocabulary logits of one loss slice at the cross-entropy's backward: the saved
    fp32 log-softmax, its gradient and the logits' gradient (12 B per vocabulary entry;
    measured on CPU: 12.5 B fp32, 12.2 B bf16 — the anchors' 10 B misses one)."""
    kv_transient: int
    """T(L) with prefix_concat: one layer's prefix K and V concatenated with the chunk's
    and expanded to every query head (GQA repeat), alive during that layer's attention.
    With KV offload: the block in use, the next one and the next layer's first one being
    copied in, and gradient contributions waiting for their copy out."""
    workspace: int
    token_ids: int = 0
    """The step's input ids, labels, shifted targets (B·L each) and positions (L), int64 on
    the device: the one term besides the KV cache that grows with L under KV offload."""
    allocator: int = 0
    """What the CUDA caching allocator holds beyond the bytes allocated: each device K/V
    block rounded to the allocator's granularity, plus ALLOCATOR_FRAGMENTATION of the
    step's short-lived tensors."""
    host_kv_cache: int = 0
    """KV offload: pinned host buffers of the K/V blocks, each chunk-sized (a shorter last
    block too) and rounded up to a power of two as PyTorch's pinned-memory allocator does."""
    host_kv_grad: int = 0
    """KV offload: pinned float32 gradient-sum buffers, for every block but the last."""
    host_staging: int = 0
    """KV offload: the ring of host buffers gradient contributions are copied out into."""
    host_buffers: int = 0
    """KV offload: pinned host buffers the first step allocates (a job's pool keeps them)."""
    terms: tuple[str, ...] = field(
        default=(
            "weights",
            "trainable_state",
            "kv_cache",
            "kv_grad",
            "activations",
            "attention_scores",
            "logits",
            "kv_transient",
            "token_ids",
            "allocator",
            "workspace",
        ),
        repr=False,
    )

    @property
    def transient(self) -> int:
        """Logits and attention transients are never alive together: a chunk's loss is
        back-propagated (its logits freed) before its layers' attention is."""
        return max(self.logits, self.attention_scores)

    @property
    def total(self) -> int:
        """Device bytes at the peak."""
        steady = sum(int(getattr(self, t)) for t in self.terms if t not in ("logits", "attention_scores"))
        return steady + self.transient

    @property
    def host_total(self) -> int:
        """Host bytes held for the offloaded KV cache, its gradient sums and the copy staging."""
        return self.host_kv_cache + self.host_kv_grad + self.host_staging

    @property
    def step_bytes(self) -> int:
        """The terms a step adds on top of the loaded model and optimizer (weights,
        trainable state and workspace excluded): what a measured peak-minus-baseline of a
        step is compared with."""
        return self.kv_cache + self.kv_grad + self.activations + self.transient + self.kv_transient + self.token_ids

    def as_dict(self) -> dict[str, int]:
        out = {f.name: int(getattr(self, f.name)) for f in fields(self) if f.name != "terms"}
        out["total"] = self.total
        out["host_total"] = self.host_total
        return out

    def describe(self) -> str:
        """One line, largest terms first, e.g. 'weights 14.96 GiB, kv_cache 2.00 GiB, ...'."""
        parts = sorted(((int(getattr(self, t)), t) for t in self.terms), reverse=True)
        line = ", ".join(f"{t} {format_bytes(b)}" for b, t in parts if b > 0)
        if self.host_total:
            line += (
                f"; host, pinned in {self.host_buffers} buffers: KV {format_bytes(self.host_kv_cache)}"
                f" + KV-grad {format_bytes(self.host_kv_grad)} + staging {format_bytes(self.host_staging)}"
            )
        return line


def _block_lengths(tokens: int, c: int) -> list[int]:
    """Lengths of the chunk-sized blocks `tokens` are cut into (the last one may be shorter)."""
    return [c] * (tokens // c) + ([tokens % c] if tokens % c else [])


def layer_activation_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """Bytes one decoder layer saves for backward per token (its working set)."""
    h, qo = shape.hidden_size, shape.num_heads * shape.head_dim
    kv, inter = shape.num_kv_heads * shape.head_dim, shape.intermediate_size
    elements = LAYER_ACT_HIDDEN * h + LAYER_ACT_QO * qo + LAYER_ACT_KV * kv + LAYER_ACT_MLP * inter
    return elements * dtype_bytes + LAYER_ACT_NORM_FP32 * h * 4


def _trainable_state(shape: ModelShape, o: PlanOptions) -> int:
    adam = 8 if o.optimizer else 0  # exp_avg + exp_avg_sq in fp32
    if o.lora_r is None:
        # Full fine-tuning: the accumulated grad and a chunk's fresh grad before it is added
        # in (both in the weights' dtype), plus an fp32 master copy when the weights are
        # low precision (mixed-precision AdamW).
        master = 4 if o.dtype_bytes < 4 else 0
        return shape.num_params * (2 * o.dtype_bytes + master + adam)
    # peft keeps adapter weights in fp32 (autocast_adapter_dtype) -> fp32 grads.
    return shape.lora_params(o.lora_r, o.lora_targets) * (4 + 4 + adam)


def _weights(shape: ModelShape, o: PlanOptions) -> int:
    if not o.weights_4bit:
        return shape.num_params * o.dtype_bytes
    linear = shape.num_layers * shape.decoder_linear_params_per_layer()
    return math.ceil(linear * NF4_BYTES_PER_PARAM) + (shape.num_params - linear) * o.dtype_bytes


def estimate(
    model: ModelShape | Any, seq_len: int, chunk_size: int, options: PlanOptions | None = None
) -> MemoryEstimate:
    """Peak memory of one chunk-wise step of `seq_len` tokens in chunks of `chunk_size`.

    `model` is a `ModelShape` or a transformers config. The chunk is capped at seq_len.
    """
    shape = model if isinstance(model, ModelShape) else ModelShape.from_config(model)
    o = options or PlanOptions()
    if seq_len < 1 or chunk_size < 1:
        raise ValueError(f"seq_len and chunk_size must be >= 1, got {seq_len!r}, {chunk_size!r}")
    b, length, c, d = o.batch_size, seq_len, min(chunk_size, seq_len), o.dtype_bytes
    g = o.kv_grad_bytes or max(d, 4)  # float32 sums (kv_store.grad_dtype)
    kv_tok = shape.kv_bytes_per_token(d)  # K,V of all layers for one token

    kv_tokens = length + o.branch_tokens  # a prefix tree keeps every branch's blocks until stage 2
    kv_cache = b * kv_tokens * kv_tok
    kv_grad = b * (kv_tokens - c) * kv_tok * g // d

    layer_act = layer_activation_bytes(shape, d)
    if o.layer_checkpointing:
        per_token = shape.num_layers * shape.hidden_size * d + layer_act  # layer inputs + one layer
    else:
        per_token = shape.num_layers * layer_act
    activations = b * c * per_token

    score_bytes = max(d, 4)  # scores and softmax in at least fp32
    if o.materialized_attention:
        # Probabilities (B, heads, c, L) saved per layer; plus the scores/grad transient of
        # the layer being differentiated.
        saved_layers = 1 if o.layer_checkpointing else shape.num_layers
        attention_scores = b * shape.num_heads * c * length * score_bytes * (saved_layers + 2)
    elif o.fused_attention:
        # Merged output and dq in fp32, one block's output and its rescaled copy.
        attention_scores = b * c * shape.num_heads * shape.head_dim * score_bytes * 4
    else:
        # Backward of one (c × c) block: scores s, probabilities p, dp and ds.
        attention_scores = b * shape.num_heads * c * c * score_bytes * 4

    if o.fused_loss:
        logits = 0
    else:
        rows = min(c, o.loss_slice) if o.loss_slice else c
        # Backward of F.cross_entropy on fp32 logits: saved log-softmax output, the dense
        # grad nll_loss returns for it, and log_softmax's grad for the logits (3 x fp32).
        # The forward peak (bf16 logits + fp32 upcast + log-softmax, 10 B) is lower.
        logits = b * rows * shape.vocab_size * 12

    kv_transient = 0
    if o.prefix_concat:  # one layer's K,V over the whole sequence, expanded to all query heads
        kv_transient = b * length * 2 * shape.num_heads * shape.head_dim * d
    # The blocks of every chunk (a prefix tree: of its branches too) and how many tokens each holds.
    blocks = _block_lengths(length, c)
    if o.branch_tokens:  # at most: the prompt's last block may be partial, then each answer starts a block
        blocks += [c, *_block_lengths(o.branch_tokens, c)]
    per_token = b * shape.num_kv_heads * shape.head_dim  # elements of one layer's K (or V) per token
    host_kv_cache = host_kv_grad = host_staging = host_buffers = 0
    if o.kv_offload:
        # kv_store.HostStore streams the prefix one chunk-sized block at a time: the block in
        # use, the next one and the next layer's first one being copied in, and (in the
        # compute dtype) about two blocks' gradient contributions waiting for their copy out.
        block_kv = 2 * c * per_token  # elements of one block's K and V, one layer
        kv_transient += block_kv * (3 * d + 2 * d)
        # Host: HostBuffers hands out chunk-sized buffers (a shorter last block takes one
        # too), pinned: each rounded up to a power of two. K and V per block and layer, their
        # float32 gradient sums for every block but the last, and the copy-out ring. The ring
        # (buffers of the gradient contributions' dtype: the compute dtype with the fused
        # kernels) is taken at the first deposit, just after stage 2 released the last
        # block's K and V of every layer: those buffers serve it first.
        kv_buffer, grad_buffer = pinned_bytes(c * per_token * d), pinned_bytes(c * per_token * g)
        layers, n_grad = shape.num_layers, len(blocks) - 1
        host_kv_cache = layers * len(blocks) * 2 * kv_buffer
        host_kv_grad = layers * n_grad * 2 * grad_buffer
        contribution = d if o.fused_attention else max(d, 4)
        reused = 2 * layers if contribution == d else 0
        ring = max(0, STAGING_BUFFERS - reused) if n_grad else 0  # one chunk: nothing is ever deposited
        host_staging = ring * pinned_bytes(c * per_token * contribution)
        host_buffers = layers * 2 * (len(blocks) + n_grad) + ring
        # The current chunk's own K/V (all layers) stays on the device, and so does the
        # gradient relayed into it: both are O(c), not O(L).
        kv_cache = b * c * kv_tok
        kv_grad = b * c * kv_tok * g // d
        blocks = [c]

    # The device K/V blocks (and gradient sums) are allocations of their own: the allocator's
    # rounding of each, plus its cached-but-unused share of the short-lived tensors.
    def waste(nbytes: int) -> int:
        return cuda_block_bytes(nbytes) - nbytes

    rounding = shape.num_layers * 2 * sum(waste(n * per_token * d) + waste(n * per_token * g) for n in blocks)
    short_lived = activations + max(logits, attention_scores) + kv_transient
    allocator = rounding + math.ceil(ALLOCATOR_FRAGMENTATION * short_lived)
    token_ids = (3 * b + 1) * length * 8

    return MemoryEstimate(
        seq_len=length,
        chunk_size=c,
        weights=_weights(shape, o),
        trainable_state=_trainable_state(shape, o),
        kv_cache=kv_cache,
        kv_grad=kv_grad,
        activations=activations,
        attention_scores=attention_scores,
        logits=logits,
        kv_transient=kv_transient,
        workspace=o.workspace_bytes,
        token_ids=token_ids,
        allocator=allocator,
        host_kv_cache=host_kv_cache,
        host_kv_grad=host_kv_grad,
        host_staging=host_staging,
        host_buffers=host_buffers,
    )
