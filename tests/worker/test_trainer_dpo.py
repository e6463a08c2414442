"""A DPO job through the training loop, called directly (the Celery path is in tests/service)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from seco_core.job_config import JobConfig, JobLora
from tests.conftest import write_jsonl
from tests.preference_task import preference_records
from tests.worker.test_trainer import Recorder
from worker.preference import DPO_FIELDS
from worker.spec import JobCancelled, TrainingError, TrainSpec
from worker.trainer import METRIC_FIELDS, train


def dpo_spec(tmp_path: Path, model: Path, **overrides: object) -> TrainSpec:
    train_file = write_jsonl(tmp_path / "train.jsonl", preference_records(24, seed=1))
    valid_file = write_jsonl(tmp_path / "valid.jsonl", preference_records(8, seed=2))
    spec = TrainSpec(
        job_id="ftjob-dpo",
        model_name="tiny",
        model_path=model,
        training_file=train_file,
        validation_file=valid_file,
        output_dir=tmp_path / "job",
        n_epochs=2,
        batch_size=4,
        learning_rate_multiplier=10.0,
        seed=1,
        seco=JobConfig(chunk_size=16, lora=JobLora(r=8, alpha=16)),
        checkpoint_every=3,
        method="dpo",
        beta=0.5,
    )
    for key, value in overrides.items():
        setattr(spec, key, value)
    return spec


def test_dpo_job_learns_the_preference(tmp_path: Path, demo_model: Path) -> None:
    rec = Recorder()
    result = train(dpo_spec(tmp_path, demo_model), rec)
    steps = rec.steps
    assert [m["step"] for m in steps] == list(range(1, 13))  # 24 pairs / 4 per step x 2 epochs
    for m in steps:
        for key in ("train_loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"):
            assert isinstance(m[key], float), key
        assert m["reward_margin"] == pytest.approx(m["reward_chosen"] - m["reward_rejected"])
        assert 0.0 <= m["reward_accuracy"] <= 1.0 and m["chunks_backpropagated"] >= 8
    # the policy starts as the reference (LoRA B = 0): margin 0, loss log 2
    assert steps[0]["reward_margin"] == 0.0 and steps[0]["train_loss"] == pytest.approx(0.6931, abs=1e-4)
    assert steps[-1]["reward_margin"] > 0.5 and steps[-1]["reward_accuracy"] == 1.0
    assert steps[-1]["train_loss"] < 0.4
    valid = [m for m in steps if "valid_loss" in m]
    assert len(valid) == 4  # every 3 steps
    assert valid[-1]["valid_reward_margin"] > valid[0]["valid_reward_margin"] > 0
    assert valid[-1]["valid_reward_accuracy"] == 1.0 and valid[-1]["valid_loss"] < valid[0]["valid_loss"]
    assert any("24 preference pairs" in m for m in rec.messages)
    assert any("batches of 4 pairs (DPO, beta 0.5)" in m for m in rec.messages)
    assert rec.resolved == [{"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 10.0, "beta": 0.5}]
    assert "train_mean_token_accuracy" not in steps[0]  # DPO's accuracy is its reward accuracy
    assert steps[-1]["full_valid_loss"] == steps[-1]["valid_loss"]

    with result.metrics_csv.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == METRIC_FIELDS + DPO_FIELDS
    assert len(rows) == 12 and float(rows[-1]["reward_accuracy"]) == 1.0 and rows[2]["valid_reward_margin"]
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_auto_hyperparameters_resolve_to_the_values_used(tmp_path: Path, demo_model: Path) -> None:
    rec = Recorder(cancel_at=1)
    with pytest.raises(JobCancelled):
        train(
            dpo_spec(tmp_path, demo_model, n_epochs=None, batch_size=None, learning_rate_multiplier=None, beta=None),
            rec,
        )
    assert rec.resolved == [{"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.0, "beta": 0.1}]
    assert rec.steps[0]["total_steps"] == 3 * 24  # 24 pairs, one per step, 3 epochs


def test_a_pair_longer_than_max_length_fails_the_job_naming_its_line(tmp_path: Path, demo_model: Path) -> None:
    spec = dpo_spec(tmp_path, demo_model)
    spec.seco = JobConfig(chunk_size=16, max_length=40)
    with pytest.raises(TrainingError) as info:
        train(spec, Recorder())
    assert (info.value.code, info.value.param) == ("invalid_file", "training_file")
    assert str(info.value).startswith("training_file line ")
    assert "longer than max_length 40 (set by the job)" in str(info.value)


def test_supervised_data_in_a_dpo_job_fails_clearly(tmp_path: Path, demo_model: Path) -> None:
    spec = dpo_spec(tmp_path, demo_model, training_file=write_jsonl(tmp_path / "text.jsonl", [{"text": "hi"}]))
    with pytest.raises(TrainingError, match="training_file line 1: a text record: a job with method 'dpo'"):
        train(spec, Recorder())
