from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64_norms(monkeypatch: pytest.MonkeyPatch) -> None:
    """RMSNorm of every supported RMSNorm architecture in the input's dtype instead of float32.

    They compute the norm in float32 even inside a float64 model (`.to(torch.float32)`,
    `x.float()`), so gradients that are combined in different proportions (chunk sums,
    SpaCO's weighted draws, a prefix tree's signed weights) agree only to float32
    rounding (~1e-8). With the same formula in float64 the chunk-wise algorithm's own
    exactness (~1e-15) is what is measured; test_parity.py::test_gemma_as_shipped covers
    an unpatched model. GPT-NeoX uses LayerNorm, which computes in the input's dtype.
    """
    from transformers.models.gemma import modeling_gemma
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.olmo2 import modeling_olmo2
    from transformers.models.phi3 import modeling_phi3
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3

    def gemma_forward(self: modeling_gemma.GemmaRMSNorm, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x) * (1.0 + self.weight.to(x.dtype))

    def llama_forward(self: modeling_llama.LlamaRMSNorm, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight.to(x.dtype) * (x * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(modeling_gemma.GemmaRMSNorm, "forward", gemma_forward)
    # Llama's formula: the others are copies of it (OLMo-2 multiplies before casting back).
    for norm in (
        modeling_llama.LlamaRMSNorm,
        modeling_mistral.MistralRMSNorm,
        modeling_qwen2.Qwen2RMSNorm,
        modeling_qwen3.Qwen3RMSNorm,
        modeling_phi3.Phi3RMSNorm,
        modeling_olmo2.Olmo2RMSNorm,
    ):
        monkeypatch.setattr(norm, "forward", llama_forward)
