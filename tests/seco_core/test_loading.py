"""Models load with their own modules, whatever transformers' default for Hub kernels."""

from __future__ import annotations

from pathlib import Path

from seco_core.loading import load_causal_lm


def test_a_loaded_model_is_not_kernelized(demo_model: Path) -> None:
    # transformers >= 5.25 kernelizes on load unless asked not to (its default use_kernels
    # is True there; False in 5.17-5.24): the model's own modules are what SeCO is exact for
    model = load_causal_lm(demo_model)
    assert getattr(model, "use_kernels", False) is False
    assert type(model).__name__ == "LlamaForCausalLM"
