"""A cheap check, on the real model, that chunk-wise gradients match a plain backward.

Run it before a long job: a short random sequence, a plain full-sequence backward and
a SeCO backward over several chunks, compared parameter by parameter. It catches a
model whose code path differs from the tested architectures (custom attention, a
patched forward) before hours are spent training it wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seco_core.arch import unwrap
from seco_core.chunked import chunked_backward
from seco_core.config import ChunkConfig
from seco_core.errors import UnsupportedModelError

# Relative error accepted between the two gradients (all trainable parameters together),
# by the dtype the model *computes* in: the two computations sum the same terms in a
# different order, so agreement is limited by the rounding of activations, not by the
# dtype of the trainable weights (peft keeps LoRA weights in float32 under a bf16 model).
# Measured on CPU (tiny LoRA models of every supported architecture, 96 tokens in chunks of
# 32, three seeds): bf16 agrees to 0.3-2.4%, while a forward that mixes tokens outside
# attention (tests/seco_core/test_refusal.py) differs by 14-28%.
DEFAULT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 8e-2, torch.float16: 2e-2}


@dataclass
class SelfCheckReport:
    rel_error: float
    """|g_chunked - g_plain| / |g_plain| over every trainable parameter at once."""
    max_rel_error: float
    """The same per parameter, worst case (informative: small tensors are noisy in 16 bits)."""
    worst_parameter: str
    loss_plain: float
    loss_chunked: float
    tolerance: float
    compute_dtype: torch.dtype

    @property
    def ok(self) -> bool:
        return self.rel_error <= self.tolerance


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations are computed in: that of the input embeddings' weight."""
    base: Any = unwrap(model)
    weight = getattr(base.get_input_embeddings(), "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def self_check(
    model: nn.Module,
    *,
    seq_len: int = 96,
    chunk_size: int = 32,
    tolerance: float | None = None,
    seed: int = 0,
    raise_on_mismatch: bool = True,
) -> SelfCheckReport:
    """Compare SeCO with a plain backward on a random (1, seq_len) sequence.

    The model's existing `.grad`s are restored afterwards. Raises UnsupportedModelError
    naming the architecture when the gradients disagree beyond `tolerance`.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters")
    saved = {n: p.grad for n, p in params.items()}
    device = next(iter(params.values())).device
    config: Any = unwrap(model).config
    vocab = int(config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq_len), generator=gen).to(device)
    dtype = compute_dtype(model)
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(dtype, 1e-3)
    try:
        for p in params.values():
            p.grad = None
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            logits = model(input_ids=ids).logits
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
        plain = {n: p.grad.clone() if p.grad is not None else None for n, p in params.items()}
        for p in params.values():
            p.grad = None
        out = chunked_backward(model, ids, ids, ChunkConfig(chunk_size=chunk_size))
        worst, worst_name = 0.0, ""
        diff_sq = ref_sq = 0.0
        for name, p in params.items():
            ref, got = plain[name], p.grad
            if ref is None and got is None:
                continue
            if ref is None or got is None:
                worst, worst_name, diff_sq = float("inf"), name, float("inf")
                break
            ref64, got64 = ref.double(), got.double()
            diff, norm = (got64 - ref64).norm().item(), ref64.norm().item()
            diff_sq, ref_sq = diff_sq + diff**2, ref_sq + norm**2
            err = diff / max(norm, 1e-30)
            if err > worst:
                worst, worst_name = err, name
    finally:
        for name, p in params.items():
            p.grad = saved[name]
    overall = (diff_sq / max(ref_sq, 1e-60)) ** 0.5
    report = SelfCheckReport(overall, worst, worst_name, loss.item(), out.loss, tol, dtype)
    if raise_on_mismatch and not report.ok:
        raise UnsupportedModelError(
            f"{type(unwrap(model)).__name__}: chunk-wise gradients differ from a plain backward "
            f"(relative error {overall:.3g}, worst at {worst_name}; tolerance {tol:g} for {dtype}); "
            "refusing to train it"
        )
    return report
