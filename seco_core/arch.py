"""Which models chunk-wise training handles exactly, and how to split them.

Exactness needs three things of a decoder: its attention goes through the transformers
Cache API and the attention-function registry (so a chunk sees its prefix), its
positions come from `position_ids` (rotary embeddings: a chunk at offset s is encoded
exactly as inside the full sequence), and nothing else mixes tokens across positions.
Models with learned absolute positions that ignore the cache, ALiBi biases, recurrent
state, attention soft-capping or sinks break one of these, so only architectures with a
parity test are accepted; anything else is refused by name rather than trained wrongly.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

from seco_core.errors import UnsupportedModelError

# model_type values covered by tests/seco_core/test_parity.py.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo2", "gpt_neox"})


@dataclass
class ModelParts:
    """The pieces chunked_backward drives directly."""

    decoder: nn.Module  # embeddings + layers + final norm: input_ids -> (B, T, H) hidden states
    head: nn.Module  # output projection: (B, T, H) -> (B, T, V) logits
    layers: nn.ModuleList  # the decoder layers, for checkpointing inside a chunk
    num_layers: int
    model_type: str
    architecture: str
    cache_keyword: str  # the decoder's keyword for a Cache: "cache" or "past_key_values", see `cache_keyword`


# The names transformers 5.x decoders take a Cache under, newest first: 5.17 takes only
# `past_key_values`; later releases rename it `cache` and keep the old name as a deprecated
# alias (a FutureWarning, to be removed).
CACHE_KEYWORDS = ("cache", "past_key_values")


def cache_keyword(decoder: nn.Module, architecture: str) -> str:
    """The keyword `decoder.forward` takes its Cache under, read from its signature.

    Why not one fixed name: a decoder swallows an unknown keyword in `**kwargs`, builds a
    cache of its own and never touches ours, and the old name warns on newer releases and
    will go; asking the signature works on every release and fails loudly on a decoder
    that takes neither.
    """
    parameters = inspect.signature(decoder.forward).parameters
    for name in CACHE_KEYWORDS:
        if name in parameters:
            return name
    raise UnsupportedModelError(
        f"{architecture}: its decoder's forward takes no KV cache argument (none of {', '.join(CACHE_KEYWORDS)})"
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_parts(model: nn.Module) -> ModelParts:
    """Split a causal LM into decoder and head, or refuse it with its architecture named."""
    base: Any = unwrap(model)
    config = getattr(base, "config", None)
    architecture = type(base).__name__
    model_type = getattr(config, "model_type", None)
    if config is None or model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{architecture} (model_type {model_type!r}) is not supported for exact chunk-wise training; "
            f"supported model types: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    for attr in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, attr, None):
            raise UnsupportedModelError(f"{architecture}: {attr} is not supported")
    decoder = base.get_decoder()
    head = base.get_output_embeddings()
    layers = getattr(decoder, "layers", None)
    if head is None or decoder is base or not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{architecture}: expected a causal LM with decoder layers and an output head")
    return ModelParts(
        decoder=decoder,
        head=head,
        layers=layers,
        num_layers=config.num_hidden_layers,
        model_type=model_type,
        architecture=architecture,
        cache_keyword=cache_keyword(decoder, architecture),
    )


def check_length(model: nn.Module, seq_len: int) -> None:
    """Refuse sequences a sliding-window model would attend to differently."""
    config = unwrap(model).config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    uses_window = window is not None and (
        "sliding_attention" in layer_types or (not layer_types and getattr(config, "use_sliding_window", True))
    )
    if uses_window and window is not None and seq_len > window:
        raise UnsupportedModelError(
            f"{type(unwrap(model)).__name__}: sliding-window attention (window {window}) is not supported "
            f"for sequences longer than the window ({seq_len} tokens)"
        )
