"""plan_job: the library's memory-mode policy for one job on one device, called with the device
stated as plain numbers (worker/trainer.py supplies them; tests/worker/test_plan.py covers that)."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import LlamaConfig

from seco_core.job_config import JobConfig
from seco_core.memory_plan import DEFAULT_LENGTH, MEMORY_MODES, GiB, PlanRefused, plan_job
from tests.model_shapes import LLAMA3_8B


def on_a_24_gib_gpu(job: JobConfig, **kw: Any) -> Any:
    """A bf16 CUDA device with fused attention, 24 GiB, and 128 GiB of host memory to offload to."""
    args: dict[str, Any] = {
        "device_kind": "cuda",
        "dtype_bytes": 2,
        "fused_attention": True,
        "budget_bytes": 24 * GiB,
        "host_budget_bytes": 128 * GiB,
    }
    return plan_job(LLAMA3_8B, job, **{**args, **kw})


def test_modes_are_tried_fastest_first() -> None:
    assert MEMORY_MODES[0] == {"layer_checkpointing": False, "kv_offload": False}
    assert MEMORY_MODES[-1] == {"layer_checkpointing": True, "kv_offload": True}
    short = on_a_24_gib_gpu(JobConfig(max_length=16384))
    assert (short.max_length, short.layer_checkpointing, short.offload_kv) == (16384, False, False)
    long = on_a_24_gib_gpu(JobConfig(max_length=131072))
    assert (long.max_length, long.layer_checkpointing, long.offload_kv) == (131072, True, True)
    assert long.memory.fits and long.memory.estimate.total <= 24 * GiB
    assert long.chunk_size == long.memory.chunk_size <= 4096  # the CUDA kind's fastest chunk caps it


def test_without_a_host_budget_kv_offload_is_not_tried_and_the_refusal_says_what_fits() -> None:
    with pytest.raises(PlanRefused) as info:
        on_a_24_gib_gpu(JobConfig(max_length=131072), host_budget_bytes=None)
    refused = info.value.memory
    assert not refused.fits and refused.seq_len == 131072
    assert str(info.value) == refused.message and "What would fit" in refused.message
    assert "KV offload" not in refused.message  # nowhere to offload to


def test_an_unset_max_length_takes_the_data_length_within_the_context() -> None:
    assert on_a_24_gib_gpu(JobConfig(), length=3000).max_length == 3000
    assert on_a_24_gib_gpu(JobConfig(), length=10**6, budget_bytes=80 * GiB).max_length == 131072
    no_context = LlamaConfig(**{**LLAMA3_8B.to_dict(), "max_position_embeddings": 0})
    args = {"device_kind": "cuda", "dtype_bytes": 2, "fused_attention": True, "host_budget_bytes": 128 * GiB}
    assert plan_job(no_context, JobConfig(), budget_bytes=24 * GiB, **args).max_length == DEFAULT_LENGTH


def test_an_unset_max_length_that_does_not_fit_takes_the_longest_that_does() -> None:
    small_host = on_a_24_gib_gpu(JobConfig(), host_budget_bytes=8 * GiB)
    assert small_host.offload_kv and small_host.layer_checkpointing
    assert 0 < small_host.max_length < 131072
    assert small_host.max_length == small_host.memory.seq_len and small_host.memory.fits
    with pytest.raises(PlanRefused):
        on_a_24_gib_gpu(JobConfig(max_length=131072), host_budget_bytes=8 * GiB)  # set by the job: no shortening


def test_the_job_settings_reach_the_options() -> None:
    plain = on_a_24_gib_gpu(JobConfig(max_length=16384))
    nf4 = on_a_24_gib_gpu(JobConfig(max_length=16384, load_in_4bit=True))
    assert nf4.memory.estimate.weights < plain.memory.estimate.weights / 2  # embeddings and head stay bf16
    assert nf4.chunk_size > plain.chunk_size  # the memory 4-bit weights free buys larger (faster) chunks
    given = on_a_24_gib_gpu(JobConfig(max_length=16384, chunk_size=256))
    assert given.chunk_size == 256
