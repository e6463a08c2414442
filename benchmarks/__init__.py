"""Benchmarks and the demo model: tools on top of seco_core, outside the library.

- bench.py: plain backward vs gradient checkpointing vs SeCO vs SpaCO (`python -m benchmarks.bench`).
- bench_dpo.py: one exact DPO step, shared prompt vs two full sequences (`python -m benchmarks.bench_dpo`).
- bench_memory.py: SeCO's memory growth against its K/V floor, and plain / SeCO (`python -m benchmarks.bench_memory`).
- demo.py: a tiny random Llama with a byte-level tokenizer, built offline (`seco up`'s model when
  none is configured, and the tests' model directory).

They may use what the library must not (matplotlib, subprocess, tokenizers); tests/test_layout.py
keeps seco_core to torch, transformers, peft and the standard library.
"""
