"""Pure-arithmetic memory plan for one chunk-wise (SeCO / SpaCO) training step.

Why: a job that cannot fit must be refused before a GPU spends minutes loading weights,
with a message that says what *would* fit; and when a job leaves `chunk_size` unset the
worker picks the largest chunk that fits (bigger chunks are faster). No tensor is
allocated here: everything follows from the model's shape.

The peak of a SeCO step is at the first backward chunk (stage 2, chunk k): the whole
KV cache exists, gradients for every earlier chunk's K/V have just been produced, and
one chunk's graph is alive. Term by term:

    M(L, c) ≈ W + O_LoRA + L·kv + (L−c)·kv·g + c·a + logits(c) + T(L) + workspace

with, for Llama-3-8B in bf16, kv = 128 KiB/token (32 layers × K,V × 8 heads × 128 × 2 B).
`estimate` returns each term separately (`MemoryEstimate`), `choose_chunk_size` and
`max_length` search over it, and `plan` turns it into a decision plus a human message.
The terms follow what seco_core runs: K/V gradient sums in float32 (kv_store.py), fused
per-block attention kernels that never hold a block's scores (attention.py), logits of
one loss slice, and the logits and attention transients never alive at the same time
(the loss is back-propagated before the layers are).

What the allocators really take is counted too. On the device, each K/V block is its own
allocation rounded to the CUDA caching allocator's granularity, and the allocator holds a
share of the step's short-lived tensors beyond what is allocated (ALLOCATOR_FRAGMENTATION).
On the host (KV offload), every buffer is chunk-sized, a shorter last block's too, and
pinned through PyTorch's caching host allocator, which rounds each request up to a power of
two: the host terms are those buffers as pinned, planned against the worker's host budget
(SECO_HOST_MEMORY_BUDGET), with their count (a long first step pins thousands of buffers).
A refusal names what would fit: a smaller chunk, a shorter max_length, a host budget, or a
memory-saving option this plan does not use yet.

The activation coefficients are model assumptions for a Llama-style decoder layer and
were checked against measured peaks on CPU (see `LAYER_ACT_*` below); the worker
reports the estimate next to the measured peak so they can be recalibrated on GPUs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from seco_core.kv_store import STAGING_BUFFERS

KiB = 1024
MiB = 1024**2
GiB = 1024**3

MIN_CHUNK = 64
"""Smallest chunk `choose_chunk_size` proposes: below this, per-chunk overheads (a
forward pass per chunk and layer, kernel launches) dominate the step time."""

FASTEST_CHUNK = {"cpu": 2048, "cuda": 4096}
"""The chunk size past which a step gets slower again, per device kind: a step costs
about L * (a + b/c + g*c) (b: per-chunk overheads, g: the chunk's own causal block and
cache locality), so time falls with c only up to sqrt(b/g). Measured on this project's
2-core CPU (16K tokens, 4-layer 256-wide Llama): chunk 512 33.1 s, 2048 29.1 s,
8192 33.8 s, i.e. an optimum near 2048. On a GPU larger matrix products keep paying off
longer, and each doubling halves the host<->device traffic of KV offload; 4096 is the
default there until GPU measurements say otherwise (scripts/gpu_check.sh)."""

NF4_BYTES_PER_PARAM = 0.5 + 0.127 / 8
"""QLoRA NF4: 4 bits per weight plus double-quantised block constants (0.127 bits/param,
Dettmers et al. 2023). Only decoder linear layers are quantised; embeddings, the LM head
and norms stay in the compute dtype."""

PINNED_PAGE = 4 * KiB
"""Smallest pinned allocation: cudaHostAlloc locks whole pages."""

ALLOCATOR_FRAGMENTATION = 0.10
"""Share of the step's short-lived device tensors (one chunk's activations, the logits or
attention transients, the streamed K/V blocks) that the CUDA caching allocator holds beyond
what is allocated at the peak: freed blocks cached per stream (the copy streams' blocks are
not reused by the compute stream), split blocks that a later request of another size
cannot use, the shorter last chunk. An assumption (PyTorch training commonly reserves
5-20% above its allocated peak; workers set expandable_segments, which keeps it low),
checked by `scripts/gpu_check.sh`, which reports max_memory_reserved beside
max_memory_allocated."""

CUDA_SMALL_ALLOC = MiB
"""Requests up to this size are rounded to CUDA_ROUND_SMALL; larger ones come from
segments the allocator rounds to CUDA_ROUND_LARGE (its kRoundLarge)."""
CUDA_ROUND_SMALL = 512
CUDA_ROUND_LARGE = 2 * MiB

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

# Projection name -> (in_features, out_features) as functions of the shape; used to count
# LoRA parameters, r·(in + out) per adapted projection per layer.
_PROJECTIONS: dict[str, Callable[[ModelShape], tuple[int, int]]] = {}


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer that memory depends on."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_params: int
    """All parameters (embeddings, decoder, LM head); Llama-3-8B: 8.03e9."""
    name: str = "model"

    @classmethod
    def from_config(cls, config: Any, num_params: int | None = None) -> ModelShape:
        """Read a transformers config (Llama-style field names; multimodal configs use
        their text config). `num_params` defaults to a Llama-style count: pass the real
        one (`sum(p.numel() for p in model.parameters())`) when it is known."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        shape = cls(
            num_layers=int(config.num_hidden_layers),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=int(getattr(config, "intermediate_size", None) or 4 * hidden),
            vocab_size=int(config.vocab_size),
            num_params=0,
            name=str(getattr(config, "model_type", "model")),
        )
        if num_params is None:
            num_params = shape.llama_param_count(tied=bool(getattr(config, "tie_word_embeddings", False)))
        return ModelShape(**{**shape.__dict__, "num_params": int(num_params)})

    def llama_param_count(self, tied: bool = False) -> int:
        """Parameters of a Llama-style model of this shape (no biases)."""
        h = self.hidden_size
        embed = self.vocab_size * h
        return embed * (1 if tied else 2) + self.num_layers * (self.decoder_linear_params_per_layer() + 2 * h) + h

    def decoder_linear_params_per_layer(self) -> int:
        """q, k, v, o and the gated MLP's three projections of one layer."""
        return sum(i * o for i, o in (self.projection(n) for n in _LLAMA_LINEARS))

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every layer for one token: the size of the KV cache per token."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def projection(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a linear layer named as in transformers."""
        try:
            return _PROJECTIONS[name](self)
        except KeyError:
            known = ", ".join(sorted(_PROJECTIONS))
            raise ValueError(f"unknown LoRA target module {name!r}; known: {known}") from None

    def lora_params(self, r: int, targets: tuple[str, ...]) -> int:
        """Trainable LoRA parameters: A (r × in) and B (out × r) per target, per layer."""
        if "all-linear" in targets:
            targets = _LLAMA_LINEARS
        return self.num_layers * sum(r * sum(self.projection(t)) for t in targets)


_LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _register_projections() -> None:
    def q(s: ModelShape) -> tuple[int, int]:
        return s.hidden_size, s.num_heads * s.head_dim

    def kv(s: ModelShape) -> tuple[int, int]:
        return s.hidden_size, s.num_kv_heads * s.head_dim

    def o(s: ModelShape) -> tuple[int, int]:
        return s.num_heads * s.head_dim, s.hidden_size

    def qkv(s: ModelShape) -> tuple[int, int]:
        return s.hidden_size, (s.num_heads + 2 * s.num_kv_heads) * s.head_dim

    def up(s: ModelShape) -> tuple[int, int]:
        return s.hidden_size, s.intermediate_size

    def gate_up(s: ModelShape) -> tuple[int, int]:
        return s.hidden_size, 2 * s.intermediate_size

    def down(s: ModelShape) -> tuple[int, int]:
        return s.intermediate_size, s.hidden_size

    table: dict[Callable[[ModelShape], tuple[int, int]], tuple[str, ...]] = {
        q: ("q_proj",),
        kv: ("k_proj", "v_proj"),
        o: ("o_proj", "dense"),  # dense: GPT-NeoX attention output
        qkv: ("qkv_proj", "query_key_value"),  # Phi-3, GPT-NeoX fused projections
        up: ("gate_proj", "up_proj", "dense_h_to_4h"),
        gate_up: ("gate_up_proj",),  # Phi-3
        down: ("down_proj", "dense_4h_to_h"),
    }
    for fn, names in table.items():
        for n in names:
            _PROJECTIONS[n] = fn


_register_projections()


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


def pinned_bytes(nbytes: int) -> int:
    """Host memory that pinning a buffer of `nbytes` takes: PyTorch's caching host
    allocator rounds every request up to the next power of two before cudaHostAlloc (so
    the rounded size indexes its free lists), and the driver locks whole pages."""
    if nbytes <= 0:
        return 0
    return max(PINNED_PAGE, 1 << (nbytes - 1).bit_length())


def cuda_block_bytes(nbytes: int) -> int:
    """Device memory the CUDA caching allocator sets aside for one tensor of `nbytes`."""
    if nbytes <= 0:
        return 0
    step = CUDA_ROUND_SMALL if nbytes <= CUDA_SMALL_ALLOC else CUDA_ROUND_LARGE
    return -(-nbytes // step) * step


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


def _fits(e: MemoryEstimate, budget_bytes: int, host_budget_bytes: int | None) -> bool:
    return e.total <= budget_bytes and (host_budget_bytes is None or e.host_total <= host_budget_bytes)


def chunk_candidates(seq_len: int, max_chunk: int | None = None) -> list[int]:
    """Powers of two from MIN_CHUNK up to seq_len and `max_chunk` (just [seq_len] for a
    shorter sequence)."""
    top = min(seq_len, max_chunk or seq_len)
    if top < MIN_CHUNK:
        return [top]
    return [2**i for i in range(int(math.log2(MIN_CHUNK)), int(math.log2(top)) + 1)]


def choose_chunk_size(
    model: ModelShape | Any,
    seq_len: int,
    budget_bytes: int,
    options: PlanOptions | None = None,
    host_budget_bytes: int | None = None,
) -> int | None:
    """Largest power-of-two chunk (>= 64, <= seq_len, <= options.max_chunk) whose step fits, or None.

    Larger chunks mean fewer, better-utilised forward passes (faster) up to
    `max_chunk`, at the cost of activations and logits linear in the chunk size.
    """
    o = options or PlanOptions()
    for c in reversed(chunk_candidates(seq_len, o.max_chunk)):
        if _fits(estimate(model, seq_len, c, options), budget_bytes, host_budget_bytes):
            return c
    return None


def max_length(
    model: ModelShape | Any,
    budget_bytes: int,
    chunk_size: int | None = None,
    options: PlanOptions | None = None,
    host_budget_bytes: int | None = None,
    limit: int = 2**26,
) -> int:
    """Longest sequence (tokens, <= limit) that fits; 0 if not even one token does.

    With `chunk_size` None, a length fits when some power-of-two chunk fits it. Memory
    grows with the length, so a binary search over it is exact.
    """

    def fits(length: int) -> bool:
        if chunk_size is None:
            return choose_chunk_size(model, length, budget_bytes, options, host_budget_bytes) is not None
        return _fits(estimate(model, length, chunk_size, options), budget_bytes, host_budget_bytes)

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return limit if fits(limit) else _bisect(fits, lo, limit)
    return _bisect(fits, lo, hi)


def _bisect(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    """Largest n in [lo, hi) with fits(n), given fits(lo) and not fits(hi)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class MemoryPlan:
    """A decision for a job: whether it fits, with which chunk, and why (`message`)."""

    fits: bool
    seq_len: int
    chunk_size: int | None
    """The chunk to train with (chosen or given); when nothing fits, the smallest tried."""
    estimate: MemoryEstimate
    budget_bytes: int
    host_budget_bytes: int | None
    longest_length: int
    """Longest sequence that fits with `chunk_size` (0: none)."""
    message: str


def plan(
    model: ModelShape | Any,
    seq_len: int,
    budget_bytes: int,
    chunk_size: int | None = None,
    options: PlanOptions | None = None,
    host_budget_bytes: int | None = None,
) -> MemoryPlan:
    """Plan a step of `seq_len` tokens on a device with `budget_bytes` free.

    With `chunk_size` None, the largest power-of-two chunk that fits is chosen. When the
    requested configuration does not fit, the message says what would: a smaller chunk
    at this length, the host budget it needs (when only host memory is short), an option
    this plan does not use (layer checkpointing, KV offload, 4-bit weights) with its chunk,
    or the longest max_length at the requested (or smallest) chunk.
    """
    name = model.name if isinstance(model, ModelShape) else ModelShape.from_config(model).name
    chosen = chunk_size or choose_chunk_size(model, seq_len, budget_bytes, options, host_budget_bytes)
    if chosen is not None:
        e = estimate(model, seq_len, chosen, options)
        if _fits(e, budget_bytes, host_budget_bytes):
            longest = max_length(model, budget_bytes, chosen, options, host_budget_bytes)
            msg = (
                f"{name}: max_length={seq_len} with chunk_size={e.chunk_size} needs about "
                f"{format_bytes(e.total)} of {format_bytes(budget_bytes)} ({e.describe()})"
            )
            return MemoryPlan(True, seq_len, e.chunk_size, e, budget_bytes, host_budget_bytes, longest, msg)

    # Does not fit: report the requested (or smallest) chunk's estimate and alternatives.
    tried = chosen or min(chunk_candidates(seq_len, options.max_chunk if options else None))
    e = estimate(model, seq_len, tried, options)
    need = f"needs about {format_bytes(e.total)} on the device"
    if host_budget_bytes is not None and e.host_total > host_budget_bytes:
        host = f"{format_bytes(e.host_total)} of pinned host memory (host budget {format_bytes(host_budget_bytes)})"
        need += f" and {host}"
    if e.total > budget_bytes:
        need += f", but the device budget is {format_bytes(budget_bytes)}"
    else:
        need += f" (within the device budget of {format_bytes(budget_bytes)})"
    msg = f"{name}: max_length={seq_len} with chunk_size={e.chunk_size} {need} ({e.describe()})."
    alternatives = []
    smaller = choose_chunk_size(model, seq_len, budget_bytes, options, host_budget_bytes)
    if smaller is not None:
        alternatives.append(f"chunk_size={smaller} at max_length={seq_len}")
    if host_budget_bytes is not None:
        # Only host memory short: the host budget the device's largest fitting chunk needs.
        device_chunk = chunk_size or choose_chunk_size(model, seq_len, budget_bytes, options, None)
        on_device = estimate(model, seq_len, device_chunk, options) if device_chunk else None
        if on_device is not None and on_device.total <= budget_bytes and on_device.host_total > host_budget_bytes:
            alternatives.append(
                f"a host memory budget (SECO_HOST_MEMORY_BUDGET) of at least {format_bytes(on_device.host_total)}"
                f" ({on_device.host_buffers} pinned buffers) with chunk_size={on_device.chunk_size}"
                f" at max_length={seq_len}"
            )
    alternatives += _options_that_fit(model, seq_len, budget_bytes, options or PlanOptions(), host_budget_bytes)
    longest = max_length(model, budget_bytes, tried, options, host_budget_bytes)
    if longest > 0:
        alternatives.append(f"max_length<={longest} with chunk_size={min(tried, longest)}")
    smallest = min(chunk_candidates(seq_len, options.max_chunk if options else None))
    if smallest < tried:
        longest_small = max_length(model, budget_bytes, smallest, options, host_budget_bytes)
        if longest_small > longest:
            alternatives.append(f"max_length<={longest_small} with chunk_size={smallest}")
    if alternatives:
        msg += " What would fit: " + "; or ".join(alternatives) + "."
    else:
        fixed = e.weights + e.trainable_state + e.workspace
        # These costs do not depend on the sequence, so KV offload cannot help here.
        remedy = "a larger device" if (options and options.weights_4bit) else "4-bit weights or a larger device"
        msg += (
            f" Nothing fits: weights, trainable state and workspace alone need {format_bytes(fixed)}"
            f" (consider {remedy})."
        )
    return MemoryPlan(False, seq_len, tried, e, budget_bytes, host_budget_bytes, longest, msg)


_OPTION_CHANGES: tuple[tuple[str, dict[str, bool]], ...] = (
    ("layer checkpointing", {"layer_checkpointing": True}),
    ("KV offload with layer checkpointing", {"kv_offload": True, "layer_checkpointing": True}),
    ("4-bit weights (seco.load_in_4bit)", {"weights_4bit": True}),
)


def _options_that_fit(
    model: ModelShape | Any, seq_len: int, budget_bytes: int, options: PlanOptions, host_budget_bytes: int | None
) -> list[str]:
    """Each memory-saving option this plan does not use yet with which `seq_len` fits, and
    the chunk it would take. KV offload only where there is a host budget to offload to."""
    out = []
    for label, change in _OPTION_CHANGES:
        if all(getattr(options, k) == v for k, v in change.items()):
            continue
        if change.get("kv_offload") and host_budget_bytes is None:
            continue
        changed = replace(options, **change)  # type: ignore[arg-type]
        chunk = choose_chunk_size(model, seq_len, budget_bytes, changed, host_budget_bytes)
        if chunk is not None:
            out.append(f"{label} with chunk_size={chunk} at max_length={seq_len}")
    return out


def device_budget_bytes(device: str, reserve_bytes: int | None = None) -> int:
    """Bytes a training step may use on `device`.

    CUDA: the device's free memory now (other processes on the GPU count), capped by the
    per-process memory fraction if one was set, minus a reserve (default 1 GiB) for what
    the caching allocator never sees: the CUDA context's growth as kernels and libraries
    load (cuBLAS, FlashAttention); the allocator's own overhead is a term of the plan.
    CPU: RAM available now (psutil) minus a reserve (default 10% of total RAM, at least
    1 GiB), so the OS and other processes keep room. Call it before loading the model:
    its weights are in the plan.
    """
    if device.startswith("cuda"):
        import torch

        dev = torch.device(device)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        allowed = int(total * torch.cuda.get_per_process_memory_fraction(index)) - torch.cuda.memory_reserved(index)
        reserve = GiB if reserve_bytes is None else reserve_bytes
        return max(0, min(int(free), allowed) - reserve)
    import psutil

    vm = psutil.virtual_memory()
    reserve = max(GiB, vm.total // 10) if reserve_bytes is None else reserve_bytes
    return max(0, int(vm.available) - reserve)


_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS.update({"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12})
_UNITS.update({"kib": KiB, "mib": MiB, "gib": GiB, "tib": 1024**4})


def parse_size(text: str) -> int:
    """'24GiB' -> 25769803776, '1.5GB' -> 1500000000, '512' -> 512 (bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (e.g. 24GiB, 1.5GB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: int | float) -> str:
    """Binary units: 1536 -> '1.50 KiB'."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
