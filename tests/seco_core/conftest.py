from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64_norms(monkeypatch: pytest.MonkeyPatch) -> None:
    """RMSNorm of Llama and Gemma in the input's dtype instead of float32.

    Both compute the norm in float32 even inside a float64 model (`.to(torch.float32)`,
    `x.float()`), so gradients that are combined in different proportions (chunk sums,
    SpaCO's weighted draws) agree only to float32 rounding (~1e-8). With the same formula
    in float64 the chunk-wise algorithm's own exactness (~1e-15) is what is measured;
    test_parity.py::test_gemma_as_shipped covers an unpatched model.
    """
    from transformers.models.gemma import modeling_gemma
    from transformers.models.llama import modeling_llama

    def gemma_forward(self: modeling_gemma.GemmaRMSNorm, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x) * (1.0 + self.weight.to(x.dtype))

    def llama_forward(self: modeling_llama.LlamaRMSNorm, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight.to(x.dtype) * (x * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(modeling_gemma.GemmaRMSNorm, "forward", gemma_forward)
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", llama_forward)
