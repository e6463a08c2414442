"""A DPO job through the real service: openai SDK -> API -> Redis -> Celery worker -> trainer.

The task (tests/preference_task.py): preferred answers end with " !!", rejected ones with
" ??". After training, the reward margin and accuracy on held-out pairs have gone up,
as the job reports them and as the downloaded adapter shows when it is loaded with peft
and scored here with plain full forward passes.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import ROOT, write_jsonl
from tests.preference_task import preference_records
from worker.data import load_preferences

BETA = 0.5


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = launch_service(redis_url, tmp_path_factory.mktemp("dpo-e2e"), workers=1, SECO_CHECKPOINT_EVERY="3")
    yield s
    s.close()


def answer_logp(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> float:
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return float(F.log_softmax(logits.double(), -1).gather(-1, torch.tensor(answer).unsqueeze(-1)).sum())


def test_a_dpo_job_learns_the_preference(svc: Any, tmp_path: Path, demo_model: Path) -> None:
    client = svc.client()
    upload = {
        name: write_jsonl(tmp_path / f"{name}.jsonl", preference_records(n, seed))
        for name, n, seed in (("train", 24, 1), ("valid", 8, 2), ("heldout", 16, 3))
    }
    train = client.files.create(file=upload["train"].open("rb"), purpose="fine-tune").id
    valid = client.files.create(file=upload["valid"].open("rb"), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train,
        validation_file=valid,
        seed=1,
        method={
            "type": "dpo",
            "dpo": {"hyperparameters": {"beta": BETA, "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 10}},
        },
        extra_body={"seco": {"chunk_size": 16, "lora": {"r": 8, "alpha": 16}}},
    )

    # seco follow, the CLI, watches it to the end and shows the rewards
    env = {**os.environ, "SECO_URL": svc.url, "SECO_API_KEY": svc.key(), "PYTHONPATH": str(ROOT)}
    follow = subprocess.run(
        [sys.executable, "-m", "service.client.cli", "follow", job.id],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert follow.returncode == 0, follow.stdout + follow.stderr + svc.logs()
    assert "margin " in follow.stdout and " acc 100%" in follow.stdout and "(val " in follow.stdout

    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded" and done.method and done.method.type == "dpo"
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=200))
    metrics = [e.data for e in reversed(events) if e.type == "metrics"]
    assert ", reward margin=" in next(e.message for e in events if e.type == "metrics")
    assert [m["step"] for m in metrics] == list(range(1, 13))  # type: ignore[index]
    first, last = metrics[0], metrics[-1]
    assert first["reward_margin"] == 0.0 and last["reward_margin"] > 0.5 and last["reward_accuracy"] == 1.0  # type: ignore[index]
    valid_steps = [m for m in metrics if "valid_reward_margin" in m]  # type: ignore[operator]
    assert valid_steps[-1]["valid_reward_margin"] > valid_steps[0]["valid_reward_margin"] > 0  # type: ignore[index]
    assert valid_steps[-1]["valid_reward_accuracy"] == 1.0  # type: ignore[index]
    rows = list(csv.DictReader(io.StringIO(client.files.content(done.result_files[0]).read().decode())))
    assert len(rows) == 12 and float(rows[-1]["reward_margin"]) == pytest.approx(last["reward_margin"])  # type: ignore[index]
    checkpoint = client.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    assert "reward_accuracy" in checkpoint.metrics.model_dump()

    # The downloaded adapter, scored on held-out pairs the job never saw: reference = the base model.
    with tarfile.open(fileobj=io.BytesIO(client.files.content(done.result_files[1]).read()), mode="r:gz") as tar:
        tar.extractall(tmp_path / "adapter", filter="data")
    base = AutoModelForCausalLM.from_pretrained(demo_model).eval()
    pairs = load_preferences(upload["heldout"], AutoTokenizer.from_pretrained(demo_model)).pairs
    reference = [(answer_logp(base, p.prompt, p.chosen), answer_logp(base, p.prompt, p.rejected)) for p in pairs]
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    policy = [(answer_logp(tuned, p.prompt, p.chosen), answer_logp(tuned, p.prompt, p.rejected)) for p in pairs]
    margins = [BETA * ((pw - rw) - (pl - rl)) for (pw, pl), (rw, rl) in zip(policy, reference, strict=True)]
    accuracy = sum(m > 0 for m in margins) / len(margins)
    assert sum(margins) / len(margins) > 0.5 and accuracy == 1.0  # both are 0 for the base model (policy = reference)
    assert sum(pw > pl for pw, pl in policy) == len(pairs)  # the tuned model itself prefers every chosen answer
