"""ChunkConfig: how a long sequence is split and which chunks are back-propagated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mode = Literal["seco", "spaco"]
Sampling = Literal["bernoulli", "fixed"]


@dataclass(frozen=True)
class ChunkConfig:
    chunk_size: int
    """Tokens per chunk. The last chunk may be shorter when it does not divide the length."""

    mode: Mode = "seco"
    """"seco": every chunk is back-propagated; gradients equal a full-sequence backward.
    "spaco": only a random subset of chunks is back-propagated, with compensation."""

    budget: int | None = None
    """SpaCO: t, the number of chunks back-propagated per sequence (expected number for
    "bernoulli"). Required with mode="spaco"; t >= k means every chunk (plain SeCO)."""

    sampling: Sampling = "bernoulli"
    """SpaCO: "bernoulli" keeps each chunk independently with probability q = t/k and
    scales it by 1/q, an exactly unbiased estimate of the SeCO gradient. "fixed" is the
    paper's: exactly t of k chunks without replacement, factor k/t. It is biased: a
    gradient path through two chunks survives with probability t(t-1)/(k(k-1)), not
    (t/k)^2, so such paths are under-weighted."""

    max_compensation: float | None = None
    """SpaCO: cap on the per-chunk factor (the paper recommends 2.0 to reduce variance).
    Any cap below 1/q makes the estimate biased."""

    loss_slice: int = 1024
    """Tokens per slice of the output projection: logits exist for at most this many
    tokens at once (a 128K-vocabulary model's logits are ~0.5 MB per token in fp32)."""

    offload_kv: bool = False
    """Keep the per-chunk K/V checkpoints and their gradients in host memory (pinned
    when the model is on CUDA) and stream them to the compute device one block at a
    time while attention runs, prefetching the next block on a side stream. Device
    memory then no longer grows with the sequence; host memory does (2 x KV cache)."""

    layer_checkpointing: bool = False
    """Recompute each decoder layer during the chunk's backward instead of keeping its
    activations: one chunk's activations shrink to the layer inputs plus one layer's
    working set, which allows larger (faster) chunks in the same memory."""

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")
        if self.mode not in ("seco", "spaco"):
            raise ValueError(f"mode must be 'seco' or 'spaco', got {self.mode!r}")
        if self.sampling not in ("bernoulli", "fixed"):
            raise ValueError(f"sampling must be 'bernoulli' or 'fixed', got {self.sampling!r}")
        if self.mode == "spaco":
            if self.budget is None or not isinstance(self.budget, int) or self.budget < 1:
                raise ValueError(f"mode='spaco' needs budget >= 1 (chunks to back-propagate), got {self.budget!r}")
        elif self.budget is not None:
            raise ValueError("budget only applies to mode='spaco'")
        if self.max_compensation is not None and self.max_compensation < 1.0:
            raise ValueError(f"max_compensation must be >= 1.0, got {self.max_compensation!r}")
        if self.loss_slice < 1:
            raise ValueError(f"loss_slice must be a positive integer, got {self.loss_slice!r}")
