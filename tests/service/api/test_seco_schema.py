"""The API's `seco` request schema is built from seco_core's JobConfig (tests/seco_core/test_job_config.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from seco_core.job_config import LIMITS, LORA_LIMITS, JobConfig, JobLora
from service.api.schemas import LoraSettings, SecoSettings


def _schema_bounds(model: type[Any], name: str) -> dict[str, float]:
    """The ge/gt/le/lt pydantic checks on field `name` (from its metadata)."""
    found: dict[str, float] = {}
    for item in model.model_fields[name].metadata:
        for op in ("ge", "gt", "le", "lt"):
            if getattr(item, op, None) is not None:
                found[op] = getattr(item, op)
    return found


def test_the_api_schema_has_the_library_defaults_and_bounds() -> None:
    """The `seco` request schema is built from JobConfig: same fields, same defaults, same bounds."""
    assert set(SecoSettings.model_fields) == {f.name for f in dataclasses.fields(JobConfig)}
    assert set(LoraSettings.model_fields) == {f.name for f in dataclasses.fields(JobLora)}
    assert SecoSettings().job_config() == JobConfig()
    for name, limits in LIMITS.items():
        assert _schema_bounds(SecoSettings, name) == limits, name
    for name, limits in LORA_LIMITS.items():
        assert _schema_bounds(LoraSettings, name) == limits, name


def test_the_api_schema_applies_the_library_rules() -> None:
    with pytest.raises(ValueError, match="budget is required when mode is 'spaco'"):
        SecoSettings(mode="spaco")
    settings = SecoSettings(mode="spaco", budget=2, chunk_size=64, lora=LoraSettings(r=4))
    assert settings.job_config() == JobConfig(mode="spaco", budget=2, chunk_size=64, lora=JobLora(r=4))
