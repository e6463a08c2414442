"""The training loop, called directly with a recording context (the Celery path is in tests/service)."""

from __future__ import annotations

import csv
import json
import math
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.demo import build_demo_model
from seco_core.job_config import JobConfig, JobLora
from seco_core.lora import load_adapter
from worker.spec import JobCancelled, JobPaused, TrainingError, TrainSpec
from worker.trainer import train


@dataclass
class Recorder:
    """A TrainContext that keeps everything in lists; `cancel_at`/`die_at` simulate users and crashes."""

    cancel_at: int | None = None
    die_at: int | None = None
    pause_at: int | None = None
    messages: list[str] = field(default_factory=list)
    message_data: list[dict[str, Any] | None] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    progress_calls: list[tuple[int, int, int]] = field(default_factory=list)
    resolved: list[dict[str, Any]] = field(default_factory=list)

    def message(self, text: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.messages.append(text)
        self.message_data.append(data)

    def metrics(self, data: dict[str, Any]) -> None:
        self.steps.append(data)
        if self.die_at is not None and data["step"] == self.die_at:
            raise KeyboardInterrupt("simulated worker death")

    def progress(self, step: int, total_steps: int, trained_tokens: int, eta_seconds: float | None) -> None:
        self.progress_calls.append((step, total_steps, trained_tokens))

    def hyperparameters(self, resolved: dict[str, Any]) -> None:
        assert not self.steps, "resolved before the first step"
        self.resolved.append(resolved)

    def checkpoint_saved(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        self.checkpoints.append(step)

    def cancelled(self) -> bool:
        return self.cancel_at is not None and len(self.steps) >= self.cancel_at

    def pause_requested(self) -> bool:
        return self.pause_at is not None and len(self.steps) >= self.pause_at


TEXT = "The quick brown fox jumps over the lazy dog. " * 6


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("models") / "tiny")


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_spec(tmp_path: Path, model: Path, **overrides: Any) -> TrainSpec:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": TEXT + str(i)} for i in range(4)])
    spec = TrainSpec(
        job_id="ftjob-test",
        model_name="tiny",
        model_path=model,
        training_file=data,
        validation_file=None,
        output_dir=tmp_path / "job",
        n_epochs=2,
        batch_size=2,
        learning_rate_multiplier=50.0,
        seed=3,
        seco=JobConfig(chunk_size=64, max_length=128),
        checkpoint_every=1,
    )
    return replace(spec, **overrides)


def adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_text_job_trains_and_the_adapter_lowers_the_loss(tmp_path: Path, demo_model: Path) -> None:
    spec = make_spec(tmp_path, demo_model, n_epochs=3)
    rec = Recorder()
    result = train(spec, rec)
    # 4 documents of ~277 tokens -> 3 windows of <= 128 each; 12 windows / batch 2 = 6 steps x 3 epochs
    assert [m["step"] for m in rec.steps] == list(range(1, 19))
    assert rec.steps[-1]["train_loss"] < rec.steps[0]["train_loss"]
    for m in rec.steps:
        assert m["total_steps"] == 18
        assert m["peak_memory_bytes"] > 0 and m["tokens_per_second"] > 0
        assert m["chunks_backpropagated"] >= 2
        assert 0 <= m["train_mean_token_accuracy"] <= 1
        assert "full_valid_loss" not in m  # no validation file
    assert rec.steps[-1]["train_mean_token_accuracy"] > rec.steps[0]["train_mean_token_accuracy"]
    assert result.steps == 18
    with result.metrics_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:5] == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert [float(r["train_accuracy"]) for r in rows] == pytest.approx(
        [m["train_mean_token_accuracy"] for m in rec.steps], rel=1e-12
    )
    assert all(r["valid_loss"] == "" and r["valid_mean_token_accuracy"] == "" for r in rows)
    with tarfile.open(result.adapter_archive) as tar:
        assert sorted(tar.getnames()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"

    # The downloaded adapter, loaded with peft, lowers the loss on its training text.
    tok = AutoTokenizer.from_pretrained(demo_model)
    ids = torch.tensor([tok(TEXT)["input_ids"][:128]])
    base = AutoModelForCausalLM.from_pretrained(demo_model).eval()
    with torch.no_grad():
        before = base(input_ids=ids, labels=ids).loss.item()
        tuned = load_adapter(base, result.adapter_dir)
        after = tuned(input_ids=ids, labels=ids).loss.item()
    assert after < before - 0.3, (before, after)  # measured: 5.58 -> 5.13


def test_auto_hyperparameters_resolve_to_the_values_used(tmp_path: Path, demo_model: Path) -> None:
    rec = Recorder(cancel_at=1)
    with pytest.raises(JobCancelled):
        train(make_spec(tmp_path, demo_model, n_epochs=None, batch_size=None, learning_rate_multiplier=None), rec)
    assert rec.resolved == [{"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.0}]
    assert rec.steps[0]["total_steps"] == 3 * 12  # 12 windows, one per step, 3 epochs
    assert rec.steps[0]["learning_rate"] <= 2e-4  # the base rate, times 1.0, in warm-up


def test_same_seed_same_losses(tmp_path: Path, demo_model: Path) -> None:
    first = Recorder()
    train(make_spec(tmp_path / "a", demo_model, n_epochs=1), first)
    second = Recorder()
    train(make_spec(tmp_path / "b", demo_model, n_epochs=1), second)
    assert [m["train_loss"] for m in first.steps] == [m["train_loss"] for m in second.steps]


def test_resume_after_death_matches_an_uninterrupted_run(tmp_path: Path, demo_model: Path) -> None:
    spec = make_spec(
        tmp_path / "resumed", demo_model, seco=JobConfig(chunk_size=32, max_length=128, mode="spaco", budget=2)
    )
    dying = Recorder(die_at=4)
    with pytest.raises(KeyboardInterrupt):
        train(spec, dying)
    assert dying.checkpoints == [1, 2, 3]  # step 4's checkpoint was never written
    survivor = Recorder()
    resumed = train(spec, survivor)
    assert any("resumed from checkpoint at step 3" in m for m in survivor.messages)
    assert survivor.steps[0]["step"] == 4

    clean = Recorder()
    uninterrupted = train(replace(spec, output_dir=tmp_path / "clean" / "job"), clean)
    assert [m["train_loss"] for m in dying.steps[:3] + survivor.steps] == [m["train_loss"] for m in clean.steps]
    a, b = adapter_weights(resumed.adapter_dir), adapter_weights(uninterrupted.adapter_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (spec.output_dir / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, resumed.steps + 1))


def test_pause_checkpoints_the_step_and_resuming_matches_an_uninterrupted_run(tmp_path: Path, demo_model: Path) -> None:
    """A pause stops after the step it was seen at, with that step checkpointed even between
    regular checkpoints; training again from there is the crash-resume path, bit for bit."""
    spec = make_spec(tmp_path / "paused", demo_model, n_epochs=1, checkpoint_every=100)
    pausing = Recorder(pause_at=2)  # asked once step 2 is reported: seen at the end of step 3
    with pytest.raises(JobPaused) as info:
        train(spec, pausing)
    assert info.value.step == 3 and pausing.checkpoints == [3] and [m["step"] for m in pausing.steps] == [1, 2, 3]
    resumed_rec = Recorder()
    resumed = train(spec, resumed_rec)
    assert any("resumed from checkpoint at step 3" in m for m in resumed_rec.messages)
    assert [m["step"] for m in resumed_rec.steps] == list(range(4, resumed.steps + 1))

    clean = Recorder()
    uninterrupted = train(replace(spec, output_dir=tmp_path / "clean" / "job"), clean)
    assert [m["train_loss"] for m in pausing.steps + resumed_rec.steps] == [m["train_loss"] for m in clean.steps]
    a, b = adapter_weights(resumed.adapter_dir), adapter_weights(uninterrupted.adapter_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_pause_after_the_last_step_lets_the_job_finish(tmp_path: Path, demo_model: Path) -> None:
    rec = Recorder(pause_at=5)  # seen at the end of step 6, the last: nothing is left to pause before
    result = train(make_spec(tmp_path, demo_model, n_epochs=1), rec)
    assert rec.pause_requested() and result.steps == 6 and rec.checkpoints == list(range(1, 7))


def test_a_job_on_top_of_a_fine_tuned_model_continues_its_adapter(tmp_path: Path, demo_model: Path) -> None:
    parent = train(make_spec(tmp_path / "parent", demo_model, n_epochs=1), Recorder())
    child_rec = Recorder()
    child = train(
        make_spec(
            tmp_path / "child", demo_model, n_epochs=1, learning_rate_multiplier=1e-9, init_adapter=parent.adapter_dir
        ),
        child_rec,
    )
    a, b = adapter_weights(parent.adapter_dir), adapter_weights(child.adapter_dir)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), "it started from it"
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k), "a fresh adapter would have zero lora_B"
    fresh = train(make_spec(tmp_path / "fresh", demo_model, n_epochs=1, learning_rate_multiplier=1e-9), Recorder())
    c = adapter_weights(fresh.adapter_dir)
    assert all(c[k].abs().max() < 1e-6 for k in c if "lora_B" in k)

    other_shape = make_spec(
        tmp_path / "bad",
        demo_model,
        n_epochs=1,
        init_adapter=parent.adapter_dir,
        seco=JobConfig(chunk_size=64, max_length=128, lora=JobLora(r=2)),
    )
    with pytest.raises(TrainingError) as info:
        train(other_shape, Recorder())
    assert info.value.code == "invalid_lora"


class _Planted:
    """What a planted state file could carry: unpickling it would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_checkpoint_carrying_code_is_refused_not_run(tmp_path: Path, demo_model: Path) -> None:
    """State files are loaded with weights_only=True: a pickled object in one (a file planted in
    shared storage) fails the resume with `invalid_checkpoint`, and its code never runs."""
    spec = make_spec(tmp_path / "job", demo_model, n_epochs=1)
    with pytest.raises(KeyboardInterrupt):
        train(spec, Recorder(die_at=2))
    state_file = spec.output_dir / "checkpoints" / "step-000001" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)  # what the trainer wrote loads as it is
    marker = tmp_path / "code-ran"
    torch.save({**state, "extra": _Planted(marker)}, state_file)
    with pytest.raises(TrainingError) as e:
        train(spec, Recorder())
    assert e.value.code == "invalid_checkpoint" and "step-000001" in str(e.value)
    assert not marker.exists(), "the planted object's code ran"


def test_cancel_is_honoured_within_a_step(tmp_path: Path, demo_model: Path) -> None:
    rec = Recorder(cancel_at=2)
    with pytest.raises(JobCancelled):
        train(make_spec(tmp_path, demo_model), rec)
    assert len(rec.steps) == 2


def test_validation_loss_is_reported(tmp_path: Path, demo_model: Path) -> None:
    valid = write_jsonl(tmp_path / "valid.jsonl", [{"prompt": "fox? ", "completion": TEXT[:60]}])
    rec = Recorder()
    train(make_spec(tmp_path, demo_model, validation_file=valid, n_epochs=1, checkpoint_every=3), rec)
    with_valid = [m for m in rec.steps if "valid_loss" in m]
    assert [m["step"] for m in with_valid] == [0, 3, 6], "step 0: the starting model, before training"
    assert "train_loss" not in rec.steps[0] and rec.steps[0]["total_steps"] == 6
    assert with_valid[-1]["valid_loss"] < with_valid[0]["valid_loss"]
    assert all(0 <= m["valid_mean_token_accuracy"] <= 1 for m in with_valid)
    # the last step reports the whole validation file under OpenAI's full_valid_* names too
    last = rec.steps[-1]
    assert last["full_valid_loss"] == last["valid_loss"]
    assert last["full_valid_mean_token_accuracy"] == last["valid_mean_token_accuracy"]
    assert not any("full_valid_loss" in m for m in rec.steps[:-1])


LONG_VALID = "The lazy dog sleeps while the quick brown fox jumps. " * 21
"""1113 bytes: one validation window (byte-level tokens) with targets in 0-1K and 1K-4K."""


def plain_losses_by_position(model_dir: Path, text: str, adapter: Path | None = None) -> dict[str, float]:
    """A full forward of the model on the whole text and its end-of-text token (as the job
    tokenises a text record), per-token CE grouped by the target's position: 1..1023 is
    "0-1K", 1024.. "1K-4K"."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([[*tok(text)["input_ids"], tok.eos_token_id]])
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter is not None:
        model = load_adapter(model, adapter)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")  # ce[p - 1]: target at p
    return {"0-1K": ce[:1023].mean().item(), "1K-4K": ce[1023:].mean().item()}


def test_validation_reports_the_loss_by_position_from_the_starting_model(tmp_path: Path, demo_model: Path) -> None:
    """Step 0 validates the starting model; each later validation reports the buckets in its
    event and CSV row, and an event compares them with step 0, also after a pause and resume."""
    from worker.trainer import METRIC_FIELDS

    valid = write_jsonl(tmp_path / "valid.jsonl", [{"text": LONG_VALID}])
    spec = make_spec(
        tmp_path,
        demo_model,
        validation_file=valid,
        n_epochs=1,
        batch_size=1,
        checkpoint_every=2,
        seco=JobConfig(chunk_size=64, max_length=1200),
    )
    pausing = Recorder(pause_at=3)  # steps 0..2 reported: paused at the end of step 3
    with pytest.raises(JobPaused):
        train(spec, pausing)
    resumed = Recorder()
    result = train(spec, resumed)
    steps = pausing.steps + resumed.steps
    assert [m["step"] for m in steps] == [0, 1, 2, 3, 4], "no second step 0 after the resume"

    validated = [m for m in steps if "valid_loss_by_position" in m]
    assert [m["step"] for m in validated] == [0, 2, 4]
    start = validated[0]["valid_loss_by_position"]
    assert list(start) == ["0-1K", "1K-4K"]
    assert start == pytest.approx(plain_losses_by_position(demo_model, LONG_VALID), rel=1e-4)
    final = validated[-1]["valid_loss_by_position"]
    assert final == pytest.approx(plain_losses_by_position(demo_model, LONG_VALID, result.adapter_dir), rel=1e-4)
    assert all(final[b] < start[b] for b in start), (start, final)
    # the buckets' mean, weighted by their 1023 and the remaining targets, is valid_loss
    n = len(LONG_VALID)  # one target per byte after the first, and the end-of-text token
    for m in validated:
        by = m["valid_loss_by_position"]
        assert (by["0-1K"] * 1023 + by["1K-4K"] * (n - 1023)) / n == pytest.approx(m["valid_loss"], rel=1e-9)

    # events: starting model -> now at step 2; after the resume, -> final with step 0's values from the CSV
    compared = [
        (text, data)
        for rec in (pausing, resumed)
        for text, data in zip(rec.messages, rec.message_data, strict=True)
        if text.startswith("validation loss by position")
    ]
    assert [d["step"] for _, d in compared] == [2, 4]  # type: ignore[index]
    (at_2, data_2), (at_end, data_end) = compared
    assert at_2.startswith("validation loss by position at step 2, starting model -> now: loss at 0-1K: ")
    assert at_end.startswith("validation loss by position after training, starting model -> final: loss at 0-1K: ")
    assert f"loss at 1K-4K: {start['1K-4K']:.2f} -> {final['1K-4K']:.2f}" in at_end
    assert data_2["starting_valid_loss_by_position"] == data_end["starting_valid_loss_by_position"] == start  # type: ignore[index]
    assert data_end["valid_loss_by_position"] == final  # type: ignore[index]

    # the CSV: one column per bucket present, after the common ones; step 0 is the starting model
    with result.metrics_csv.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == [*METRIC_FIELDS, "valid_loss_0_1k", "valid_loss_1k_4k"]
    assert [int(r["step"]) for r in rows] == list(range(5))
    assert rows[0]["train_loss"] == "" and float(rows[0]["valid_loss_1k_4k"]) == start["1K-4K"]
    assert float(rows[4]["valid_loss_0_1k"]) == final["0-1K"] and rows[3]["valid_loss_0_1k"] == ""


def test_the_starting_model_of_a_continued_job_is_the_fine_tuned_one(tmp_path: Path, demo_model: Path) -> None:
    """A job on top of a fine-tuned model validates that model at step 0, not the base model."""
    valid = write_jsonl(tmp_path / "valid.jsonl", [{"text": TEXT}])
    parent_rec = Recorder()
    parent = train(make_spec(tmp_path / "parent", demo_model, n_epochs=1, validation_file=valid), parent_rec)
    child_rec = Recorder()
    train(
        make_spec(tmp_path / "child", demo_model, n_epochs=1, validation_file=valid, init_adapter=parent.adapter_dir),
        child_rec,
    )
    assert parent_rec.steps[0]["step"] == child_rec.steps[0]["step"] == 0
    assert child_rec.steps[0]["valid_loss"] == pytest.approx(parent_rec.steps[-1]["valid_loss"], rel=1e-5)
    assert child_rec.steps[0]["valid_loss"] < parent_rec.steps[0]["valid_loss"] - 0.1


def test_validation_runs_with_the_training_chunk_configuration(
    tmp_path: Path, demo_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At lengths that need KV offload to train, validation must offload too (it held the
    whole K/V cache on the device before, out of memory at the first validation)."""
    import worker.trainer as trainer

    planned = trainer._plan_memory

    def offloading_plan(*args: Any, **kwargs: Any) -> Any:
        return replace(planned(*args, **kwargs), offload_kv=True, layer_checkpointing=True)

    seen: list[Any] = []
    original = trainer.chunked_evaluate

    def recording_evaluate(model: Any, ids: Any, labels: Any, config: Any, **kwargs: Any) -> Any:
        seen.append(config)
        return original(model, ids, labels, config, **kwargs)

    monkeypatch.setattr(trainer, "_plan_memory", offloading_plan)
    monkeypatch.setattr(trainer, "chunked_evaluate", recording_evaluate)
    valid = write_jsonl(tmp_path / "valid.jsonl", [{"text": TEXT}])
    rec = Recorder()
    train(make_spec(tmp_path, demo_model, validation_file=valid, n_epochs=1, checkpoint_every=2), rec)
    assert seen and all(c.offload_kv and c.layer_checkpointing for c in seen)
    assert any("KV offload on" in m for m in rec.messages)


def test_memory_plan_refuses_an_impossible_job(tmp_path: Path, demo_model: Path) -> None:
    spec = make_spec(tmp_path, demo_model, memory_budget_bytes=int(2.5 * 2**30), seco=JobConfig(max_length=1_000_000))
    with pytest.raises(TrainingError, match=r"What would fit: .*max_length<=\d+") as info:
        train(spec, Recorder())
    assert info.value.code == "does_not_fit"


def test_bad_record_fails_with_file_and_line(tmp_path: Path, demo_model: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no completion"}\n')
    with pytest.raises(TrainingError, match="training_file line 2") as info:
        train(make_spec(tmp_path, demo_model, training_file=bad), Recorder())
    assert info.value.code == "invalid_file"


def test_4bit_weights_need_cuda_and_bitsandbytes(tmp_path: Path, demo_model: Path) -> None:
    spec = make_spec(tmp_path, demo_model, seco=JobConfig(max_length=128, load_in_4bit=True))
    with pytest.raises(TrainingError, match="needs a CUDA worker with bitsandbytes") as info:
        train(spec, Recorder())
    assert info.value.param == "seco.load_in_4bit"


@pytest.mark.parametrize(
    ("records", "trained_text"),
    [
        ([{"prompt": "Q: what jumps? A:", "completion": " the quick brown fox"}] * 2, " the quick brown fox"),
        (
            [
                {
                    "messages": [
                        {"role": "user", "content": "what jumps?"},
                        {"role": "assistant", "content": "the fox", "weight": 0},
                        {"role": "user", "content": "and then?"},
                        {"role": "assistant", "content": "the dog sleeps"},
                    ]
                }
            ]
            * 2,
            "the dog sleeps",
        ),
    ],
    ids=["prompt-completion", "chat"],
)
def test_each_format_trains_only_its_targets(
    tmp_path: Path, demo_model: Path, records: list[dict[str, Any]], trained_text: str
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", records)
    rec = Recorder()
    result = train(make_spec(tmp_path, demo_model, training_file=data, n_epochs=1, batch_size=1), rec)
    assert result.steps == 2
    # Byte-level tokenizer: one token per byte, plus the end-of-turn / end-of-text token.
    targets_per_record = len(trained_text.encode()) + 1
    summary = next(m for m in rec.messages if m.startswith("training data:"))
    assert f"{2 * targets_per_record} trained" in summary, summary


def _poisoned_steps(monkeypatch: pytest.MonkeyPatch, at: int, *, loss: bool) -> list[bool]:
    """Make step `at` non-finite (its loss, or its gradient: a NaN in one LoRA weight's grad),
    and record, for every optimizer step the job applies, whether all its gradients were finite."""
    import worker.trainer as trainer

    original = trainer._optimizer_step

    def poisoned(model: torch.nn.Module, *args: Any) -> tuple[float, float, int]:
        value, accuracy, chunks = original(model, *args)
        if args[3] == at:  # the step number
            if loss:
                return math.inf, accuracy, chunks
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = math.nan  # type: ignore[union-attr]
        return value, accuracy, chunks

    applied: list[bool] = []
    step = torch.optim.AdamW.step

    def recording_step(self: torch.optim.AdamW, *args: Any, **kwargs: Any) -> Any:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        applied.append(all(bool(torch.isfinite(g).all()) for g in grads))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(trainer, "_optimizer_step", poisoned)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    return applied


@pytest.mark.parametrize("what", ["gradient", "loss"])
def test_a_non_finite_step_fails_the_job_before_the_optimizer_applies_it(
    tmp_path: Path, demo_model: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    applied = _poisoned_steps(monkeypatch, at=3, loss=what == "loss")
    rec = Recorder()
    spec = make_spec(tmp_path, demo_model, n_epochs=1)
    with pytest.raises(TrainingError) as e:
        train(spec, rec)
    assert e.value.code == "training_diverged"
    message = str(e.value)
    last = rec.steps[-1]
    assert f"Training diverged at step 3: the {what} is not finite" in message
    assert f"the last finite training loss was {last['train_loss']:.6g} at step 2" in message
    assert "the last good checkpoint (step 2) is kept" in message
    assert applied == [True, True], "steps 1 and 2 applied, step 3 never reached the optimizer"
    assert [m["step"] for m in rec.steps] == [1, 2] and rec.checkpoints == [1, 2]
    # the kept checkpoint is a good adapter
    weights = adapter_weights(spec.output_dir / "checkpoints" / "step-000002" / "adapter")
    assert weights and all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_the_model_is_loaded_straight_onto_the_device(
    tmp_path: Path, demo_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading then `.to(device)` builds the whole model in host memory first (16 GB for an 8B
    model). The meta device stands in for a GPU here: what the loader returns is already
    there, in the job's dtype (the loader placed each tensor as it read it), where loading
    and then moving returned the whole model in host memory."""
    import transformers

    import worker.trainer as trainer

    real = transformers.AutoModelForCausalLM.from_pretrained
    returned: list[set[tuple[str, torch.dtype]]] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        model = real(*args, **kwargs)
        returned.append({(p.device.type, p.dtype) for p in model.parameters()})
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recording)
    model = trainer._load_model(make_spec(tmp_path, demo_model), torch.bfloat16, torch.device("meta"))
    assert returned == [{("meta", torch.bfloat16)}]
    assert {p.device.type for p in model.parameters()} == {"meta"}  # the LoRA weights joined it there
    assert trainer._device_map(torch.device("cuda:1")) == {"": torch.device("cuda:1")}


def test_4bit_weights_on_a_cuda_worker_without_bitsandbytes_are_refused(
    tmp_path: Path, demo_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check of the CUDA path itself (the test above is refused for being on the CPU)."""
    import importlib.util

    import worker.trainer as trainer

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    spec = make_spec(tmp_path, demo_model, device="cuda:0", seco=JobConfig(max_length=128, load_in_4bit=True))
    with pytest.raises(
        TrainingError, match=r"bitsandbytes installed \(this worker: device cuda:0, bitsandbytes not installed\)"
    ) as info:
        trainer._load_model(spec, torch.bfloat16, torch.device("cuda:0"))
    assert (info.value.code, info.value.param) == ("unsupported_option", "seco.load_in_4bit")
