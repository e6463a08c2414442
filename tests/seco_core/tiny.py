"""Tiny random causal LMs of every supported architecture, built from config classes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 97

memory_options = pytest.mark.parametrize(
    "options",
    [dict(offload_kv=True), dict(layer_checkpointing=True), dict(offload_kv=True, layer_checkpointing=True)],
    ids=["offload", "layer-ckpt", "both"],
)
"""The chunk options that move memory (KV offload, layer checkpointing, both): each must keep results exact."""
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
_GQA: dict[str, Any] = dict(num_key_value_heads=2)

CONFIGS: dict[str, PretrainedConfig] = {
    "llama": LlamaConfig(**_COMMON, **_GQA),
    "mistral": MistralConfig(**_COMMON, **_GQA, sliding_window=None),
    "qwen2": Qwen2Config(**_COMMON, **_GQA),
    "qwen3": Qwen3Config(**_COMMON, **_GQA, head_dim=8),
    "phi3": Phi3Config(**_COMMON, **_GQA, sliding_window=None),
    "gemma": GemmaConfig(**_COMMON, **_GQA, head_dim=8),
    "olmo2": Olmo2Config(**_COMMON, **_GQA),
    "gpt_neox": GPTNeoXConfig(**_COMMON),
}


def tiny_model(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch])
    return model.to(dtype).eval()
