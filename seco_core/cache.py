"""The KV cache that chunk-wise training threads through a Hugging Face model.

Each layer keeps the per-chunk key/value checkpoints of stage 1 as a list of blocks
(`KVBlock`, one per earlier chunk, never concatenated; kept by a store on the device or
in host memory, see kv_store.py) and the key/value states the model just computed for
the current chunk. The cache hands the current chunk's states back to the model
unchanged; the `seco_chunked` attention function (registered with transformers below)
finds the cache through the attention module it is called with and attends to the
layer's blocks with `chunk_attention`. Reporting the prefix length through
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

from seco_core.attention import chunk_attention, refuse_unsupported_options
from seco_core.errors import UnsupportedModelError
from seco_core.kv_store import DeviceStore, KVBlock, KVStore, LayerPrefix

ATTENTION_NAME = "seco_chunked"


class ChunkLayer(CacheLayerMixin):
    """One layer's prefix blocks (stage-1 leaves) and the current chunk's fresh K/V."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.prefix: list[KVBlock] = []  # the earlier chunks' blocks, in order
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
        return sum(b.length for b in self.prefix)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.prefix_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.prefix_length()

    def get_max_length(self) -> int:
        return -1


class ChunkCache(Cache):
    """A transformers `Cache` whose layers are `ChunkLayer`s, their blocks kept by `store`."""

    def __init__(self, num_layers: int, store: KVStore | None = None) -> None:
        super().__init__(layers=[ChunkLayer() for _ in range(num_layers)])
        self.store: KVStore = store if store is not None else DeviceStore()
        self.store.attach([layer.prefix for layer in self.chunk_layers])

    @property
    def chunk_layers(self) -> list[ChunkLayer]:
        return self.layers  # type: ignore[return-value]

    def push_current(self, needs_grad: bool) -> None:
        """Stage 1: turn the chunk just computed into a block m'_j per layer.

        `needs_grad`: a later chunk's backward will relay into it, so the store keeps
        gradient sums for it.
        """
        for layer, keys, values in self.written():
            layer.prefix.append(self.store.put(keys, values, needs_grad))
            layer.new_keys = layer.new_values = None

    def written(self) -> list[tuple[ChunkLayer, torch.Tensor, torch.Tensor]]:
        """Per layer, the layer and the K/V the model just wrote; a clear error when it wrote none.

        A decoder that was handed this cache under a keyword it does not know builds a cache
        of its own and never writes here: say so instead of failing on a bare assertion.
        """
        out = []
        for i, layer in enumerate(self.chunk_layers):
            if layer.new_keys is None or layer.new_values is None:
                raise UnsupportedModelError(
                    f"the model did not write layer {i}'s keys/values into the chunk cache: its decoder "
                    "ignored the cache it was given (an unknown cache keyword, or attention that bypasses "
                    "the transformers Cache API)"
                )
            out.append((layer, layer.new_keys, layer.new_values))
        return out

    def pop_last(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Stage 2: remove the last chunk's blocks (they are no longer anyone's prefix) and
        return, per layer, the gradients later chunks relayed into them (None: none were kept)."""
        grads = []
        for layer in self.chunk_layers:
            block = layer.prefix.pop()
            grads.append(self.store.take_grads(block))
            self.store.release(block)
        return grads

    def set_aside_last(self) -> list[KVBlock]:
        """Remove the last chunk's blocks without releasing them, to `restore` later: a prefix
        tree runs each branch on the shared prefix alone, then brings the branch back in stage 2."""
        return [layer.prefix.pop() for layer in self.chunk_layers]

    def restore(self, blocks: list[KVBlock]) -> None:
        """Put back blocks that `set_aside_last` removed."""
        for layer, block in zip(self.chunk_layers, blocks, strict=True):
            layer.prefix.append(block)

    def current(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The K/V states the model computed for the current chunk, per layer."""
        return [(keys, values) for _, keys, values in self.written()]

    def prefix(self, layer_idx: int) -> LayerPrefix:
        """What layer `layer_idx`'s attention reads before the current chunk."""
        return LayerPrefix(self.store, self.chunk_layers[layer_idx].prefix, layer_idx)

    def close(self) -> None:
        """Wait for the store's outstanding work, then give back every remaining block."""
        try:
            self.store.close()
        finally:
            for layer in self.chunk_layers:
                while layer.prefix:
                    self.store.release(layer.prefix.pop())


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
    refuse_unsupported_options(module, dropout, kwargs)
    arch = type(module).__name__
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
    out = chunk_attention(query, key, value, scaling, cache.prefix(module.layer_idx))  # type: ignore[arg-type]
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
