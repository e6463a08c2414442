"""ModelShape: the dimensions of a decoder-only transformer that memory depends on, read from
a Hugging Face config, and the parameters of each projection LoRA may adapt."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
