"""What the allocators really take: the CUDA caching allocator's rounding and the pinned host
allocator's powers of two, and the share of short-lived tensors the CUDA allocator holds.

The estimate (estimate.py) counts each buffer as these allocators size it, not as its
tensor's bytes.
"""

from __future__ import annotations

from seco_core.memory_plan.sizes import KiB, MiB

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
