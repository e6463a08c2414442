"""Which chunks SpaCO back-propagates, and with what compensation factor.

A gradient path that passes through p back-propagated chunks is multiplied by the
product of their factors. With independent Bernoulli(q) selection and factor 1/q the
path survives with probability q^p and is scaled by q^-p: its expectation is exactly
the SeCO gradient. The paper's fixed-size draw (t of k without replacement, factor k/t)
keeps a path through p distinct chunks with probability t(t-1)...(t-p+1)/(k(k-1)...
(k-p+1)) < (t/k)^p, so multi-chunk paths are under-weighted: it is biased, but has no
run with zero chunks and a fixed cost per step.
"""

from __future__ import annotations

import torch

from seco_core.config import ChunkConfig


def chunk_factors(num_chunks: int, config: ChunkConfig, generator: torch.Generator | None = None) -> list[float]:
    """Per-chunk loss/relay factor; 0.0 means the chunk is not back-propagated."""
    if config.mode == "seco":
        return [1.0] * num_chunks
    assert config.budget is not None
    budget = min(config.budget, num_chunks)
    if budget == num_chunks:
        return [1.0] * num_chunks
    keep_prob = budget / num_chunks
    factor = 1.0 / keep_prob
    if config.max_compensation is not None:
        factor = min(factor, config.max_compensation)
    if config.sampling == "bernoulli":
        selected = torch.rand(num_chunks, generator=generator) < keep_prob
    else:
        selected = torch.zeros(num_chunks, dtype=torch.bool)
        selected[torch.randperm(num_chunks, generator=generator)[:budget]] = True
    return [factor if bool(s) else 0.0 for s in selected]
