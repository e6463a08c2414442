"""Models that cannot be trained exactly are refused by name, never trained wrongly."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
)

from seco_core import ChunkConfig, UnsupportedModelError, chunked_backward
from seco_core.arch import unwrap
from seco_core.lora import attach_lora
from seco_core.selfcheck import self_check
from tests.seco_core.tiny import tiny_model

TINY = dict(vocab_size=64, n_layer=2, n_head=2, n_embd=16)


@pytest.mark.parametrize(
    ("model", "name"),
    [
        (GPT2LMHeadModel(GPT2Config(**TINY)), "GPT2LMHeadModel"),  # learned absolute positions
        # ALiBi position biases
        (BloomForCausalLM(BloomConfig(vocab_size=64, n_layer=2, n_head=2, hidden_size=16)), "BloomForCausalLM"),
    ],
)
def test_unsupported_architecture_is_refused(model: torch.nn.Module, name: str) -> None:
    ids = torch.randint(0, 64, (1, 20))
    with pytest.raises(UnsupportedModelError, match=name):
        chunked_backward(model, ids, ids, ChunkConfig(chunk_size=8))
    assert all(p.grad is None for p in model.parameters())


def test_sliding_window_longer_than_window_is_refused() -> None:
    config = MistralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=16,
    )
    model = MistralForCausalLM(config)
    ids = torch.randint(0, 64, (1, 40))
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        chunked_backward(model, ids, ids, ChunkConfig(chunk_size=8))
    chunked_backward(model, ids[:, :16], ids[:, :16], ChunkConfig(chunk_size=8))  # within the window: fine


def test_bad_inputs_name_the_problem() -> None:
    model = tiny_model("llama")
    ids = torch.randint(3, 97, (2, 20))
    with pytest.raises(ValueError, match="batch, length"):
        chunked_backward(model, ids[0], ids[0], ChunkConfig(chunk_size=8))
    with pytest.raises(ValueError, match="no target tokens"):
        chunked_backward(model, ids, torch.full_like(ids, -100), ChunkConfig(chunk_size=8))
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkConfig(chunk_size=0)
    with pytest.raises(ValueError, match="budget"):
        ChunkConfig(chunk_size=8, mode="spaco")


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt_neox"])
def test_self_check_passes_on_supported_models(arch: str) -> None:
    model = attach_lora(tiny_model(arch, dtype=torch.float32), r=4, alpha=8)
    report = self_check(model, seq_len=40, chunk_size=16)
    assert report.ok
    assert report.max_rel_error < 1e-4
    assert report.loss_chunked == pytest.approx(report.loss_plain, rel=1e-5)
    assert all(p.grad is None for p in model.parameters())  # grads restored


def leak_tokens_outside_attention(model: torch.nn.Module) -> None:
    """Patch the first attention layer to mix in the mean over the positions the call
    sees: a whole-sequence call and a chunk see different means."""
    attn = unwrap(model).model.layers[0].self_attn
    original = attn.forward

    def leaky_forward(hidden_states: torch.Tensor, *args: object, **kwargs: object) -> object:
        return original(hidden_states + hidden_states.mean(dim=1, keepdim=True), *args, **kwargs)

    attn.forward = leaky_forward


def test_self_check_catches_a_patched_forward() -> None:
    """A model whose attention does something the chunked path does not see is refused."""
    model = tiny_model("llama", dtype=torch.float32)
    leak_tokens_outside_attention(model)
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        self_check(model, seq_len=40, chunk_size=16)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "olmo2"])
def test_self_check_judges_a_bf16_model_by_its_compute_dtype(arch: str) -> None:
    """peft keeps LoRA weights in float32 while the model computes in bf16: the tolerance
    follows the bf16 activations (a float32 tolerance refused every bf16 job)."""
    model = attach_lora(tiny_model(arch, dtype=torch.bfloat16), r=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    report = self_check(model)
    assert report.compute_dtype == torch.bfloat16
    assert report.ok and report.rel_error > 1e-4  # bf16 rounding is visible, and accepted
    if arch == "llama":
        leak_tokens_outside_attention(model)
        with pytest.raises(UnsupportedModelError, match=r"tolerance 0\.08 for torch\.bfloat16"):
            self_check(model)
