"""Attention for serving: a chunk of queries against the cached prompt, with no mask tensor.

With a transformers `DynamicCache`, a prefill chunk of c tokens after p cached ones is
attended by the model's own attention with an explicit c x (p + c) mask (a causal mask
aligned to the bottom right, which fused kernels cannot take as a flag), built per layer
call: its size grows with the prompt, and for a small model it is bigger than the KV
cache itself. `seco_prefill` instead splits the keys the cache returns into the cached
prefix (fully visible) and the chunk's own (causal) and hands them to `chunk_attention`
(attention.py), which runs a fused kernel per block and merges them by log-sum-exp, so
nothing of size c x p is ever built. A decode step is a chunk of one.

It is for one sequence without padding (what the serving engine runs): the attention
mask is not looked at. `use_prefill_attention` switches a model over when its
architecture is one chunk-wise attention is exact for (`seco_core.arch`), and leaves
any other model on its own attention (correct, with its mask).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from seco_core.arch import check_length, model_parts, unwrap
from seco_core.attention import chunk_attention, refuse_unsupported_options
from seco_core.errors import UnsupportedModelError
from seco_core.kv_store import DeviceStore, LayerPrefix

ATTENTION_NAME = "seco_prefill"


def _prefill_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, Hq, c, D) against key/value (B, Hkv, p + c, D)."""
    refuse_unsupported_options(module, dropout, kwargs)
    if kwargs.get("sliding_window") is not None:
        arch = type(module).__name__
        raise UnsupportedModelError(f"{arch}: sliding-window attention is not supported by {ATTENTION_NAME}")
    q_len = query.shape[-2]
    past = key.shape[-2] - q_len
    if past < 0:
        raise ValueError(f"{ATTENTION_NAME}: {key.shape[-2]} keys for {q_len} queries")
    store = DeviceStore()
    blocks = [store.put(key[:, :, :past], value[:, :, :past], False)] if past else []
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = chunk_attention(query, key[:, :, past:], value[:, :, past:], scale, LayerPrefix(store, blocks, 0))
    return out, None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """Causality is applied inside `chunk_attention`; no mask tensor is built."""
    return None


AttentionInterface.register(ATTENTION_NAME, _prefill_attention)
AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


def use_prefill_attention(model: nn.Module) -> bool:
    """Switch `model` (plain or peft-wrapped) to `seco_prefill` attention; False, unchanged, when
    its architecture is not one it is exact for (then it keeps its own attention and masks).

    Permanent for this model object: only for models that run one unpadded sequence at a time.
    """
    base = unwrap(model)
    try:
        model_parts(base)
        check_length(base, int(getattr(base.config, "max_position_embeddings", 0) or 0))
    except UnsupportedModelError:
        return False
    for module in base.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = ATTENTION_NAME
    return True
