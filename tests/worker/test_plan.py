"""The worker's memory plan picks the fastest configuration that fits, or says what would."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig

import worker.trainer as trainer
from seco_core.job_config import JobConfig
from seco_core.memory_plan import plan as plan_one_mode
from tests.model_shapes import LLAMA3_8B
from worker.spec import TrainingError, TrainSpec

GiB = 2**30
TINY_LLAMA = LlamaConfig(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=65536,
)  # the benchmark's CPU preset


def spec_for(max_length: int | None, budget: int = 24 * GiB, device: str = "cuda:0", **seco: Any) -> TrainSpec:
    return TrainSpec(
        job_id="ftjob-plan",
        model_name="llama3-8b",
        model_path=Path("."),
        training_file=Path("."),
        validation_file=None,
        output_dir=Path("."),
        device=device,
        memory_budget_bytes=budget,
        seco=JobConfig(max_length=max_length, **seco),
    )


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


def test_the_chunk_is_the_fastest_that_fits_not_the_largest() -> None:
    """A 32K-token window on a CPU worker with plenty of memory: chunk 2048 (the CPU's
    fastest), not 16384; the fused CPU kernel holds no c x c scores, so the attention term
    is the merged output's few floats per token, not gigabytes."""
    cpu = trainer._plan_memory(spec_for(32768, budget=64 * GiB, device="cpu"), TINY_LLAMA, torch.float32)
    assert cpu.chunk_size == 2048
    assert cpu.memory.estimate.attention_scores == 2048 * 4 * 64 * 4 * 4  # c x heads x head_dim x fp32 x 4
    gpu = trainer._plan_memory(spec_for(32768, budget=80 * GiB), LLAMA3_8B, torch.bfloat16)
    assert gpu.chunk_size == 4096  # the GPU default, although larger chunks fit in 80 GiB
    assert gpu.memory.estimate.total + 4 * GiB < plan_one_mode(LLAMA3_8B, 32768, 80 * GiB, 32768).estimate.total
    fp32_gpu = trainer._plan_memory(spec_for(8192, budget=80 * GiB), LLAMA3_8B, torch.float32)
    assert not fp32_gpu.memory.estimate.attention_scores < 4096 * 4096 * 32 * 4  # the matmul kernel's scores


def test_nf4_jobs_plan_with_4bit_weights() -> None:
    plain = trainer._plan_memory(spec_for(16384), LLAMA3_8B, torch.bfloat16)
    nf4 = trainer._plan_memory(spec_for(16384, load_in_4bit=True), LLAMA3_8B, torch.bfloat16)
    assert nf4.memory.estimate.weights < 0.4 * plain.memory.estimate.weights


def test_host_budget_is_the_workers_share() -> None:
    """SECO_HOST_MEMORY_BUDGET bounds KV offload, e.g. for several workers on one host."""
    spec = replace(spec_for(131072), host_memory_budget_bytes=40 * GiB)
    with pytest.raises(TrainingError, match=r"host budget 40\.00 GiB") as info:
        trainer._plan_memory(spec, LLAMA3_8B, torch.bfloat16)
    # The refusal says which budget would do: at the GPU's chunk of 4096, 32 blocks x 32 layers
    # of K and V (8 MiB each) and the float32 sums of all but the last block (16 MiB each).
    needed = 32 * 32 * 2 * 8 * 2**20 + 31 * 32 * 2 * 16 * 2**20
    assert needed == 47 * GiB
    hint = "(SECO_HOST_MEMORY_BUDGET) of at least 47.00 GiB (4032 pinned buffers) with chunk_size=4096"
    assert hint in str(info.value)
    enough = trainer._plan_memory(replace(spec, host_memory_budget_bytes=needed), LLAMA3_8B, torch.bfloat16)
    assert (enough.offload_kv, enough.chunk_size, enough.memory.estimate.host_total) == (True, 4096, needed)
    assert trainer._plan_memory(replace(spec, host_memory_budget_bytes=60 * GiB), LLAMA3_8B, torch.bfloat16).offload_kv


KV_PER_TOKEN = 32 * 2 * 8 * 128 * 2  # Llama-3-8B, bf16: 128 KiB (their gradient sums: float32, twice that)


def test_a_dpo_step_keeps_the_second_answer_beside_the_prompt() -> None:
    """A preference pair of a 16K prompt and two 512-token answers: the plan counts the shorter
    answer's K/V (and their gradient sums) on top of prompt + longer answer."""
    supervised = trainer._plan_memory(spec_for(16896, budget=26 * GiB), LLAMA3_8B, torch.bfloat16)
    dpo = trainer._plan_memory(spec_for(16896, budget=26 * GiB), LLAMA3_8B, torch.bfloat16, branch_tokens=512)
    assert (dpo.chunk_size, dpo.offload_kv) == (supervised.chunk_size, supervised.offload_kv)
    assert not dpo.offload_kv
    assert dpo.memory.estimate.kv_cache - supervised.memory.estimate.kv_cache == 512 * KV_PER_TOKEN
    assert dpo.memory.estimate.kv_grad - supervised.memory.estimate.kv_grad == 512 * 2 * KV_PER_TOKEN


def test_long_answers_move_a_dpo_step_to_offload_or_refuse_it() -> None:
    two_long = trainer._plan_memory(spec_for(16896), LLAMA3_8B, torch.bfloat16, branch_tokens=16384)
    assert (two_long.layer_checkpointing, two_long.offload_kv) == (True, True)
    spec = replace(spec_for(16896), host_memory_budget_bytes=16 * GiB)
    trainer._plan_memory(spec, LLAMA3_8B, torch.bfloat16)  # one sequence fits
    with pytest.raises(TrainingError, match="host memory") as info:
        trainer._plan_memory(spec, LLAMA3_8B, torch.bfloat16, branch_tokens=65536)
    assert info.value.code == "does_not_fit"


def test_dpo_plans_for_its_longest_pair_when_max_length_is_unset() -> None:
    plan = trainer._plan_memory(spec_for(None), LLAMA3_8B, torch.bfloat16, branch_tokens=300, length=5000)
    assert plan.max_length == 5000 and plan.memory.estimate.kv_cache == 5300 * KV_PER_TOKEN


def test_serving_on_the_same_device_takes_its_share_off_the_budget() -> None:
    """SECO_SERVE_MEMORY_BYTES is kept for `seco serve` when it runs on the worker's device
    (SECO_SERVE_DEVICE, unset: SECO_DEVICE), so a long step never plans into serving's memory."""
    alone = trainer._plan_memory(spec_for(65536), LLAMA3_8B, torch.bfloat16)
    shared = replace(spec_for(65536), serve_memory_bytes=6 * GiB)  # serve_device unset: the worker's
    beside = trainer._plan_memory(shared, LLAMA3_8B, torch.bfloat16)
    assert (alone.memory.budget_bytes, beside.memory.budget_bytes) == (24 * GiB, 18 * GiB)
    assert beside.memory.estimate.total <= 18 * GiB < alone.memory.estimate.total, "it plans a smaller step"
    assert trainer.serving_reserve_bytes(replace(shared, serve_device="cuda")) == 6 * GiB, "bare cuda is cuda:0"
    elsewhere = replace(shared, serve_device="cuda:1")
    assert trainer.serving_reserve_bytes(elsewhere) == 0
    assert trainer._plan_memory(elsewhere, LLAMA3_8B, torch.bfloat16).memory.budget_bytes == 24 * GiB
    cpu = spec_for(4096, budget=8 * GiB, device="cpu")
    assert trainer.serving_reserve_bytes(replace(cpu, serve_memory_bytes=GiB, serve_device="cpu")) == GiB
    assert trainer.serving_reserve_bytes(replace(cpu, serve_memory_bytes=GiB, serve_device="cuda:0")) == 0


def test_a_serving_share_that_leaves_nothing_is_refused_clearly() -> None:
    spec = replace(spec_for(16384), serve_memory_bytes=30 * GiB)
    with pytest.raises(
        TrainingError, match=r"no memory left to train on cuda:0: SECO_SERVE_MEMORY_BYTES keeps 30"
    ) as e:
        trainer._plan_memory(spec, LLAMA3_8B, torch.bfloat16)
    assert e.value.code == "does_not_fit"
    # fits alone (the first test), not beside 20 GiB of serving: the plan's own refusal, with 4 GiB
    with pytest.raises(TrainingError, match=r"but the device budget is 4\.00 GiB"):
        trainer._plan_memory(replace(spec, serve_memory_bytes=20 * GiB), LLAMA3_8B, torch.bfloat16)
