"""JobConfig: a job's settings stated once, with their defaults, bounds and rules."""

from __future__ import annotations

from typing import Any

import pytest

from seco_core.config import ChunkConfig
from seco_core.job_config import LIMITS, MAX_CHUNKS, JobConfig, JobLora, chunks_per_window


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"mode": "dense"}, "mode must be one of 'seco', 'spaco'"),
        ({"sampling": "magic"}, "sampling must be one of 'bernoulli', 'fixed'"),
        ({"chunk_size": 8}, "chunk_size must be greater than or equal to 16"),
        ({"chunk_size": 16.0}, "chunk_size must be an integer"),
        ({"chunk_size": True}, "chunk_size must be an integer"),
        ({"max_length": 1 << 23}, "max_length must be less than or equal to 4194304"),
        ({"max_compensation": 0.5}, "max_compensation must be greater than or equal to 1"),
        ({"max_compensation": float("nan")}, "max_compensation must be a finite number"),
        ({"load_in_4bit": "yes"}, "load_in_4bit must be true or false"),
        ({"mode": "spaco"}, "budget is required when mode is 'spaco'"),
        ({"budget": 2}, "budget only applies to mode 'spaco'"),
        ({"mode": "spaco", "budget": 5, "chunk_size": 16, "max_length": 64}, "more than the 4 chunks"),
        ({"lora": {"r": 0}}, "lora.r must be greater than or equal to 1"),
        ({"lora": {"alpha": 0}}, "lora.alpha must be greater than 0"),
        ({"lora": {"dropout": 1.0}}, "lora.dropout must be less than 1"),
        ({"lora": {"target_modules": "q_proj"}}, "lora.target_modules must be a list"),
        ({"lora": {"target_modules": [""]}}, "lora.target_modules must be names of 1-128 characters"),
        ({"lora": {"target_modules": ["m"] * 65}}, "at most 64 names"),
        ({"chunksize": 16}, "unknown seco setting(s) 'chunksize'"),
        ({"lora": {"rank": 4}}, "unknown lora setting(s) 'rank'"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(settings: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        JobConfig.from_dict(settings)
    assert fragment in str(info.value)


def test_a_record_round_trips_and_absent_keys_take_the_defaults() -> None:
    config = JobConfig.from_dict({"mode": "spaco", "budget": 3, "lora": {"r": 4, "target_modules": ["q_proj"]}})
    assert config.lora == JobLora(r=4, target_modules=("q_proj",)) and config.chunk_size is None
    assert JobConfig.from_dict(config.as_dict()) == config
    assert config.as_dict()["lora"]["target_modules"] == ["q_proj"]  # JSON, as the job object shows it
    assert JobConfig.from_dict({}) == JobConfig()


def test_a_whole_alpha_is_an_integer_for_the_adapter_config() -> None:
    assert type(JobLora(alpha=32.0).alpha) is int and JobLora(alpha=0.5).alpha == 0.5


def test_chunk_config_carries_spaco_settings_only_in_spaco_mode() -> None:
    spaco = JobConfig(mode="spaco", budget=2, sampling="fixed", max_compensation=2.0)
    assert spaco.chunk_config(64, offload_kv=True, layer_checkpointing=False) == ChunkConfig(
        chunk_size=64, mode="spaco", budget=2, sampling="fixed", max_compensation=2.0, offload_kv=True
    )
    exact = JobConfig(sampling="fixed", max_compensation=2.0)
    assert exact.chunk_config(32, offload_kv=False, layer_checkpointing=True) == ChunkConfig(
        chunk_size=32, layer_checkpointing=True
    )


def test_the_budget_bound_is_the_most_chunks_a_window_can_have() -> None:
    assert chunks_per_window(None, None) == MAX_CHUNKS == LIMITS["budget"]["le"]
    assert chunks_per_window(65, 16) == 5
    JobConfig(mode="spaco", budget=5, chunk_size=16, max_length=65)  # 5 chunks: allowed
