"""Pure-arithmetic memory plan for one chunk-wise (SeCO / SpaCO) training step.

Why: a job that cannot fit must be refused before a GPU spends minutes loading weights,
with a message that says what *would* fit; and when a job leaves `chunk_size` unset the
worker picks the largest chunk that fits (bigger chunks are faster). No tensor is
allocated here: everything follows from the model's shape.

The peak of a SeCO step is at the first backward chunk (stage 2, chunk k): the whole
KV cache exists, gradients for every earlier chunk's K/V have just been produced, and
one chunk's graph is alive:

    M(L, c) ≈ W + O_LoRA + L·kv + (L−c)·kv·g + c·a + logits(c) + T(L) + workspace

with, for Llama-3-8B in bf16, kv = 128 KiB/token (32 layers × K,V × 8 heads × 128 × 2 B).

One module per concern, read in this order:
- shapes.py: `ModelShape`, the dimensions memory depends on, from a Hugging Face config.
- allocators.py: what the CUDA caching allocator and the pinned host allocator really take
  for a buffer (each K/V block is its own allocation; pinned buffers round to powers of two).
- estimate.py: `PlanOptions` (how the step runs) and `estimate`, each term of the peak
  (`MemoryEstimate`), device and host.
- search.py: `choose_chunk_size` and `max_length` search over the estimate; `plan` turns it
  into a decision plus a message naming what would fit (a smaller chunk, a shorter
  max_length, a host budget, or a memory-saving option the plan does not use yet).
- policy.py: `plan_job`, the memory mode (layer checkpointing, KV offload), length and
  chunk one job trains with on one device: the policy the worker applies.
- budgets.py: `device_budget_bytes`, what a device (or the host) has free now.
- sizes.py: byte units (`parse_size`, `format_bytes`).

The activation coefficients are model assumptions for a Llama-style decoder layer and
were checked against measured peaks on CPU (`LAYER_ACT_*` in estimate.py); the worker
reports the estimate next to the measured peak so they can be recalibrated on GPUs.
"""

from seco_core.memory_plan.allocators import (
    ALLOCATOR_FRAGMENTATION,
    CUDA_ROUND_LARGE,
    CUDA_ROUND_SMALL,
    CUDA_SMALL_ALLOC,
    PINNED_PAGE,
    cuda_block_bytes,
    pinned_bytes,
)
from seco_core.memory_plan.budgets import device_budget_bytes
from seco_core.memory_plan.estimate import (
    LAYER_ACT_HIDDEN,
    LAYER_ACT_KV,
    LAYER_ACT_MLP,
    LAYER_ACT_NORM_FP32,
    LAYER_ACT_QO,
    NF4_BYTES_PER_PARAM,
    MemoryEstimate,
    PlanOptions,
    estimate,
    layer_activation_bytes,
)
from seco_core.memory_plan.policy import DEFAULT_LENGTH, MEMORY_MODES, JobPlan, PlanRefused, plan_job
from seco_core.memory_plan.search import (
    FASTEST_CHUNK,
    MIN_CHUNK,
    MemoryPlan,
    choose_chunk_size,
    chunk_candidates,
    max_length,
    plan,
)
from seco_core.memory_plan.shapes import ModelShape
from seco_core.memory_plan.sizes import GiB, KiB, MiB, format_bytes, parse_size

__all__ = [
    "ALLOCATOR_FRAGMENTATION",
    "CUDA_ROUND_LARGE",
    "CUDA_ROUND_SMALL",
    "CUDA_SMALL_ALLOC",
    "DEFAULT_LENGTH",
    "FASTEST_CHUNK",
    "LAYER_ACT_HIDDEN",
    "LAYER_ACT_KV",
    "LAYER_ACT_MLP",
    "LAYER_ACT_NORM_FP32",
    "LAYER_ACT_QO",
    "MEMORY_MODES",
    "MIN_CHUNK",
    "NF4_BYTES_PER_PARAM",
    "PINNED_PAGE",
    "GiB",
    "JobPlan",
    "KiB",
    "MemoryEstimate",
    "MemoryPlan",
    "MiB",
    "ModelShape",
    "PlanOptions",
    "PlanRefused",
    "choose_chunk_size",
    "chunk_candidates",
    "cuda_block_bytes",
    "device_budget_bytes",
    "estimate",
    "format_bytes",
    "layer_activation_bytes",
    "max_length",
    "parse_size",
    "pinned_bytes",
    "plan",
    "plan_job",
]
