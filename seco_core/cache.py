"""The KV cache that chunk-wise training threads through a Hugging Face model.

Each layer keeps the per-chunk key/value checkpoints of stage 1 as a list of blocks
(one tensor pair per earlier chunk, never concatenated) and the key/value states the
model just computed for the current chunk. The cache hands the current chunk's states
back to the model unchanged; the `seco_chunked` attention function (registered with
transformers below) fetches the prefix blocks from the active cache by layer index and
attends to them with `chunk_attention`. Reporting the prefix length through
`get_seq_length` is what makes the model place the chunk at the right positions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface

from seco_core.attention import chunk_attention
from seco_core.errors import UnsupportedModelError

ATTENTION_NAME = "seco_chunked"


class ChunkLayer(CacheLayerMixin):
    """One layer's prefix blocks (stage-1 leaves) and the current chunk's fresh K/V."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.prefix_keys: list[torch.Tensor] = []  # each (B, Hkv, n_i, D)
        self.prefix_values: list[torch.Tensor] = []
        self.new_keys: torch.Tensor | None = None  # (B, Hkv, c, D), part of the graph in stage 2
        self.new_values: torch.Tensor | None = None
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.new_keys, self.new_values = key_states, value_states
        return key_states, value_states

    def prefix_length(self) -> int:
        return sum(k.shape[-2] for k in self.prefix_keys)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.prefix_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.prefix_length()

    def get_max_length(self) -> int:
        return -1


class ChunkCache(Cache):
    """A transformers `Cache` whose layers are `ChunkLayer`s."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[ChunkLayer() for _ in range(num_layers)])

    @property
    def chunk_layers(self) -> list[ChunkLayer]:
        return self.layers  # type: ignore[return-value]

    def push_current(
        self, requires_grad: bool, store_device: torch.device | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Stage 1: turn the chunk just computed into detached prefix leaves m'_j.

        With `store_device` (KV offload) the leaves live there (pinned host memory when
        the chunk was computed on CUDA, so later copies to the device can overlap).
        """
        leaves = []
        for layer in self.chunk_layers:
            assert layer.new_keys is not None and layer.new_values is not None
            k = _stored(layer.new_keys, store_device).requires_grad_(requires_grad)
            v = _stored(layer.new_values, store_device).requires_grad_(requires_grad)
            layer.prefix_keys.append(k)
            layer.prefix_values.append(v)
            layer.new_keys = layer.new_values = None
            leaves.append((k, v))
        return leaves

    def pop_last(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Stage 2: remove and return the last chunk's leaves (it no longer is anyone's prefix)."""
        return [(layer.prefix_keys.pop(), layer.prefix_values.pop()) for layer in self.chunk_layers]

    def current(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The K/V states the model computed for the current chunk, per layer."""
        out = []
        for layer in self.chunk_layers:
            assert layer.new_keys is not None and layer.new_values is not None
            out.append((layer.new_keys, layer.new_values))
        return out


def _stored(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """A detached copy of `t` on `device` (pinned if it comes from CUDA), or `t` detached."""
    t = t.detach()
    if device is None or device == t.device:
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=t.is_cuda and device.type == "cpu")
    return out.copy_(t)


CACHE_ATTRIBUTE = "_seco_chunk_cache"
"""Set on every layer-indexed module of the model while `activate` is on. The attention
function finds the cache through the module it is called with, not through thread or
context state: on CUDA, autograd runs backward (and so a checkpointed layer's
recomputation) on its own device thread, where the caller's context variables are unset."""


def _seco_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: the chunk attends to the cached prefix and itself."""
    cache: ChunkCache | None = getattr(module, CACHE_ATTRIBUTE, None)
    if cache is None:
        raise RuntimeError("seco_chunked attention used outside chunked_backward")
    arch = type(module).__name__
    if dropout:
        raise UnsupportedModelError(f"{arch}: attention dropout ({dropout}) is not supported; set it to 0")
    if kwargs.get("softcap") is not None:
        raise UnsupportedModelError(f"{arch}: attention logit soft-capping is not supported")
    if kwargs.get("s_aux") is not None:
        raise UnsupportedModelError(f"{arch}: attention sinks are not supported")
    layer = cache.chunk_layers[module.layer_idx]  # type: ignore[index]
    window = kwargs.get("sliding_window")
    total = layer.prefix_length() + query.shape[-2]
    if window is not None and total > window:
        raise UnsupportedModelError(
            f"{arch}: sliding-window attention (window {window}) over {total} tokens is not supported; "
            f"train with max_length <= {window}"
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = chunk_attention(query, [*layer.prefix_keys, key], [*layer.prefix_values, value], scaling)
    return out, None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """Causality is applied inside `chunk_attention`; no mask tensor is ever built."""
    return None


AttentionInterface.register(ATTENTION_NAME, _seco_attention)
AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


@contextlib.contextmanager
def activate(model: nn.Module, cache: ChunkCache) -> Iterator[None]:
    """Route the model's attention through `seco_chunked` with `cache`, then restore it.

    Hugging Face gradient checkpointing drops the cache under grad, so it is paused here
    (chunk-wise training already keeps only one chunk's activations).
    """
    configs: dict[int, Any] = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    saved_impl = {key: cfg._attn_implementation for key, cfg in configs.items()}
    ckpt_modules: list[Any] = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    layered = [m for m in model.modules() if hasattr(m, "layer_idx")]
    try:
        for m in layered:
            m.__dict__[CACHE_ATTRIBUTE] = cache  # plain attribute: nn.Module's __setattr__ is not involved
        for cfg in configs.values():
            cfg._attn_implementation = ATTENTION_NAME
        for m in ckpt_modules:
            m.gradient_checkpointing = False
        yield
    finally:
        for m in layered:
            m.__dict__.pop(CACHE_ATTRIBUTE, None)
        for key, cfg in configs.items():
            cfg._attn_implementation = saved_impl[key]
        for m in ckpt_modules:
            m.gradient_checkpointing = True
