"""Chunk-wise exact (SeCO) and sparse (SpaCO) training of Hugging Face causal LMs.

Li et al., "Training Long-Context LLMs Efficiently via Chunk-wise Optimization"
(Findings of ACL 2025). This package imports only torch, transformers, peft (and psutil,
which peft requires) and the standard library; the benchmarks and the demo model are in
benchmarks/.

The names below load on first use: `seco_core.job_config` (a job's settings, their
defaults and validation) must be importable by the API process, which has no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from seco_core.chunked import ChunkedOutput, chunked_backward, chunked_evaluate, chunked_loss
    from seco_core.config import ChunkConfig
    from seco_core.errors import UnsupportedModelError
    from seco_core.prefix import Continuation, PrefixTreeOutput, prefix_tree_backward, prefix_tree_loss

_HOMES = {
    "ChunkConfig": "seco_core.config",
    "ChunkedOutput": "seco_core.chunked",
    "Continuation": "seco_core.prefix",
    "PrefixTreeOutput": "seco_core.prefix",
    "UnsupportedModelError": "seco_core.errors",
    "chunked_backward": "seco_core.chunked",
    "chunked_evaluate": "seco_core.chunked",
    "chunked_loss": "seco_core.chunked",
    "prefix_tree_backward": "seco_core.prefix",
    "prefix_tree_loss": "seco_core.prefix",
}

__all__ = [
    "ChunkConfig",
    "ChunkedOutput",
    "Continuation",
    "PrefixTreeOutput",
    "UnsupportedModelError",
    "chunked_backward",
    "chunked_evaluate",
    "chunked_loss",
    "prefix_tree_backward",
    "prefix_tree_loss",
]


def __getattr__(name: str) -> Any:
    """Import the module that defines `name` when it is first asked for (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'seco_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
