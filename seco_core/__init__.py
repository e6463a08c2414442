"""Chunk-wise exact (SeCO) and sparse (SpaCO) training of Hugging Face causal LMs.

Li et al., "Training Long-Context LLMs Efficiently via Chunk-wise Optimization"
(Findings of ACL 2025). This package imports only torch, transformers, peft and the
standard library.
"""

from seco_core.chunked import ChunkedOutput, chunked_backward, chunked_evaluate, chunked_loss
from seco_core.config import ChunkConfig
from seco_core.errors import UnsupportedModelError
from seco_core.prefix import Continuation, PrefixTreeOutput, prefix_tree_backward, prefix_tree_loss

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
