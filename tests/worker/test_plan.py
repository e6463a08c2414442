"""The worker's memory plan picks the fastest configuration that fits, or says what would."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

import worker.trainer as trainer
from worker.spec import SecoSpec, TrainingError, TrainSpec

GiB = 2**30
LLAMA3_8B = LlamaConfig(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
)  # fmt: skip


def spec_for(max_length: int | None, budget: int = 24 * GiB) -> TrainSpec:
    return TrainSpec(
        job_id="ftjob-plan", model_name="llama3-8b", model_path=Path("."), training_file=Path("."),
        validation_file=None, output_dir=Path("."), device="cuda:0", memory_budget_bytes=budget,
        seco=SecoSpec(max_length=max_length),
    )  # fmt: skip


@pytest.fixture(autouse=True)
def host_with_128_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed host budget, so the choice does not depend on this machine's free RAM."""
    monkeypatch.setattr(trainer, "device_budget_bytes", lambda device: 128 * GiB)


def test_short_sequences_use_the_fastest_mode() -> None:
    plan = trainer._plan_memory(spec_for(16384), LLAMA3_8B, torch.bfloat16)
    assert (plan.max_length, plan.layer_checkpointing, plan.offload_kv) == (16384, False, False)
    assert plan.memory.estimate.total <= 24 * GiB


def test_long_sequences_offload_the_kv_cache() -> None:
    plan = trainer._plan_memory(spec_for(131072), LLAMA3_8B, torch.bfloat16)
    assert (plan.layer_checkpointing, plan.offload_kv) == (True, True)
    assert plan.memory.estimate.total <= 24 * GiB
    assert plan.memory.estimate.host_total > 16 * GiB  # KV cache and its gradients at 128K: 2 x 16 GiB


def test_unset_max_length_takes_the_model_context_when_it_fits() -> None:
    plan = trainer._plan_memory(spec_for(None, budget=80 * GiB), LLAMA3_8B, torch.bfloat16)
    assert plan.max_length == 131072


def test_impossible_job_is_refused_with_alternatives(monkeypatch: pytest.MonkeyPatch) -> None:
    """With offload the device holds O(chunk); the host (2 x 16 GiB of KV at 128K) binds."""
    monkeypatch.setattr(trainer, "device_budget_bytes", lambda device: 20 * GiB)
    with pytest.raises(TrainingError, match=r"host memory.*What would fit: .*max_length<=\d+") as info:
        trainer._plan_memory(spec_for(131072), LLAMA3_8B, torch.bfloat16)
    assert info.value.code == "does_not_fit"
