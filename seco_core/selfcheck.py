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

# Relative gradient error accepted per parameter dtype: the two computations sum the
# same terms in a different order, so agreement is limited by the dtype's rounding.
DEFAULT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


@dataclass
class SelfCheckReport:
    max_rel_error: float
    worst_parameter: str
    loss_plain: float
    loss_chunked: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_rel_error <= self.tolerance


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
    dtype = next(iter(params.values())).dtype
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
        for name, p in params.items():
            ref, got = plain[name], p.grad
            if ref is None and got is None:
                continue
            if ref is None or got is None:
                worst, worst_name = float("inf"), name
                break
            err = ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
            if err > worst:
                worst, worst_name = err, name
    finally:
        for name, p in params.items():
            p.grad = saved[name]
    report = SelfCheckReport(worst, worst_name, loss.item(), out.loss, tol)
    if raise_on_mismatch and not report.ok:
        raise UnsupportedModelError(
            f"{type(unwrap(model)).__name__}: chunk-wise gradients differ from a plain backward "
            f"(relative error {worst:.3g} at {worst_name}, tolerance {tol:g}); refusing to train it"
        )
    return report
