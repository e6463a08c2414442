"""Loading a Hugging Face causal LM with the model's own modules.

From transformers 5.25 on, `from_pretrained` kernelizes a model by default (`use_kernels`:
layers swapped for kernels from the Hugging Face Hub when it can reach it, validated per
device, so a model loaded onto the meta device is refused). Chunk-wise training, its
self-check against a plain backward and serving's prefill attention are exact for the
model's own modules; a kernel chosen at load time, differently on a machine with or
without Hub access, would make a job's numerics depend on where it runs. Every load of
the library's users asks for the model's own modules; transformers 5.17 takes the same
keyword (there `False` is the default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM


def load_causal_lm(path: str | Path, **kwargs: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)` without Hub kernels."""
    return AutoModelForCausalLM.from_pretrained(str(path), use_kernels=False, **kwargs)
