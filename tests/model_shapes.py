"""Real models' shapes (random weights are never built from them here): what the plan tests size."""

from __future__ import annotations

from transformers import LlamaConfig

LLAMA3_8B = LlamaConfig(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
)
"""Llama-3-8B with a 128K context: the product's reference model."""
