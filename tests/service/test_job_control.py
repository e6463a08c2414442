"""Pause, resume, model names and model deletion through the real service, a real Celery
worker and the official `openai` SDK."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from openai.types.fine_tuning import FineTuningJob

from service.record.storage import keys


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = launch_service(redis_url, tmp_path_factory.mktemp("control"), workers=1, SECO_CHECKPOINT_EVERY="1000")
    yield s
    s.close()


def adapter_file(job: FineTuningJob) -> str:
    """The result file holding the adapter archive (`result_files[0]` is the metrics CSV)."""
    return str((job.model_extra or {})["adapter_file"])


def adapter_tensors(archive: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        member = tar.extractfile("adapter_model.safetensors")
        assert member is not None
        return load(member.read())


SECO = {"chunk_size": 16, "max_length": 48, "lora": {"r": 4}}


def create(client: Any, fid: str, n_epochs: int = 3, lr: float = 1.0, **kw: Any) -> Any:
    return client.fine_tuning.jobs.create(
        model=kw.pop("model", "tiny"),
        training_file=fid,
        seed=11,
        hyperparameters={"n_epochs": n_epochs, "batch_size": 1, "learning_rate_multiplier": lr},
        extra_body={"seco": kw.pop("seco", SECO)},
        **kw,
    )


def first_loss(client: Any, job_id: str) -> float:
    events = client.fine_tuning.jobs.list_events(job_id, limit=1000).data
    return float(next(e.data["train_loss"] for e in events if e.type == "metrics" and e.data["step"] == 1))


def finished(client: Any, job_id: str, wait: Callable[..., Any], timeout: float = 300) -> Any:
    return wait(
        lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in ("succeeded", "failed", "cancelled") and j,
        timeout=timeout,
        interval=0.3,
        what=f"job {job_id} to finish",
    )


def test_pause_frees_the_worker_and_resume_continues_bit_for_bit(
    svc: Any, tmp_path: Path, wait: Callable[..., Any]
) -> None:
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps({"text": f"record {i} " + "abc def ghi " * 4}) + "\n" for i in range(30)))
    client = svc.client()
    fid = client.files.create(file=p.open("rb"), purpose="fine-tune").id
    paused_job = create(client, fid, suffix="pz")
    wait(
        lambda: ((client.fine_tuning.jobs.retrieve(paused_job.id).model_extra or {}).get("step") or 0) >= 2,
        timeout=240,
        interval=0.1,
        what="the job to run two steps",
    )
    other = create(client, fid)  # the same job, never paused: queued behind the first
    asked = client.fine_tuning.jobs.pause(paused_job.id)
    assert asked.id == paused_job.id and asked.status in ("running", "paused")
    assert asked.status == "paused" or (asked.model_extra or {})["pause_requested"] is True
    paused = wait(
        lambda: (j := client.fine_tuning.jobs.retrieve(paused_job.id)).status == "paused" and j,
        timeout=120,
        interval=0.2,
        what="the job to pause",
    )
    extra = paused.model_extra or {}
    assert 2 <= extra["step"] < extra["total_steps"] and extra["pause_requested"] is False
    paused_at = extra["step"]
    assert client.fine_tuning.jobs.pause(paused_job.id).status == "paused", "pausing a paused job returns it"

    # the worker is free: the other job starts and finishes while the first stays paused
    assert finished(client, other.id, wait).status == "succeeded", svc.logs()
    assert client.fine_tuning.jobs.retrieve(paused_job.id).status == "paused"
    ckpts = client.fine_tuning.jobs.checkpoints.list(paused_job.id).data
    assert paused_at in [c.step_number for c in ckpts], "the pause wrote a checkpoint of its step"

    resumed = client.fine_tuning.jobs.resume(paused_job.id)
    assert resumed.id == paused_job.id and resumed.status in ("queued", "running", "succeeded")
    done = finished(client, paused_job.id, wait)
    assert done.status == "succeeded", (done.error, svc.logs())
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.resume(paused_job.id)
    assert "not paused" in e.value.message and e.value.code == "invalid_state"
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.pause(paused_job.id)
    assert "already succeeded" in e.value.message

    events = list(reversed(list(client.fine_tuning.jobs.list_events(paused_job.id, limit=1000))))
    messages = [ev.message for ev in events]
    assert "Pause requested; the job stops after its current step, with a checkpoint" in messages
    assert f"Fine-tuning job paused at step {paused_at}; resume continues from its checkpoint" in messages
    assert any(m.startswith("Fine-tuning job resumed") for m in messages)
    assert any(m.startswith(f"resumed from checkpoint at step {paused_at} ") for m in messages), messages
    steps = [ev.data["step"] for ev in events if ev.type == "metrics"]  # type: ignore[index]
    assert steps == list(range(1, extra["total_steps"] + 1)), "every step once"

    a = adapter_tensors(client.files.content(adapter_file(done)).read())
    b = adapter_tensors(client.files.content(adapter_file(client.fine_tuning.jobs.retrieve(other.id))).read())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "paused + resumed == uninterrupted"


def test_model_names_resolve_for_their_owner_and_a_model_can_be_deleted(
    svc: Any, tmp_path: Path, wait: Callable[..., Any]
) -> None:
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps({"text": f"record {i} " + "abc def " * 3}) + "\n" for i in range(3)))
    client = svc.client()
    fid = client.files.create(file=p.open("rb"), purpose="fine-tune").id
    job = create(client, fid, n_epochs=2, lr=20.0, suffix="named")
    done = finished(client, job.id, wait)
    assert done.status == "succeeded", (done.error, svc.logs())
    name = done.fine_tuned_model
    assert name == f"ft:tiny:{done.organization_id}:named:{job.id.removeprefix('ftjob-')}"
    ckpt = client.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    assert ckpt.fine_tuned_model_checkpoint == f"{name}:ckpt-step-{ckpt.step_number}"
    for model in (name, ckpt.fine_tuned_model_checkpoint):
        assert client.models.retrieve(model).owned_by == done.organization_id
        with pytest.raises(openai.NotFoundError):
            svc.client("b").models.retrieve(model)
    assert name in [m.id for m in client.models.list()]

    # fine-tuning on top: the job continues the named adapter (final or checkpoint) on its base model
    with pytest.raises(openai.BadRequestError) as e:
        create(svc.client("b"), svc.client("b").files.create(file=p.open("rb"), purpose="fine-tune").id, model=name)
    assert e.value.code == "model_not_available" and "not one of your fine-tuned models" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        create(client, fid, model=name, seco={**SECO, "lora": {"r": 8}})
    assert e.value.code == "invalid_lora" and "'r': 4" in e.value.message
    on_top = create(client, fid, n_epochs=1, model=name, seco={"chunk_size": 16, "max_length": 48}, suffix="child")
    from_ckpt = create(client, fid, n_epochs=1, model=ckpt.fine_tuned_model_checkpoint)
    assert on_top.model == name and (on_top.model_extra or {})["seco"]["lora"]["r"] == 4
    for child in (on_top, from_ckpt):
        child_done = finished(client, child.id, wait)
        assert child_done.status == "succeeded", (child_done.error, svc.logs())
        assert child_done.fine_tuned_model.startswith(f"ft:tiny:{done.organization_id}:")
        assert first_loss(client, child.id) < first_loss(client, job.id) - 0.05, "it started from the trained adapter"
    assert finished(client, on_top.id, wait).fine_tuned_model.endswith(f":child:{on_top.id.removeprefix('ftjob-')}")

    with pytest.raises(openai.NotFoundError):
        svc.client("b").models.delete(name)
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.models.delete("tiny")
    assert "base model" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.models.delete(ckpt.fine_tuned_model_checkpoint)
    assert "is a checkpoint" in e.value.message
    prefix = keys.job_prefix(svc.tenant("a"), job.id)
    assert svc.objects(prefix), "the adapter, metrics and checkpoints are stored"

    deleted = client.models.delete(name)
    assert deleted.id == name and deleted.deleted is True and deleted.object == "model"
    assert svc.objects(prefix) == {}, "adapter, checkpoints and result files are gone from storage"
    assert name not in [m.id for m in client.models.list()]
    for model in (name, ckpt.fine_tuned_model_checkpoint):
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(model)
    with pytest.raises(openai.NotFoundError):
        client.models.delete(name)
    after = client.fine_tuning.jobs.retrieve(job.id)
    assert after.status == "succeeded" and after.fine_tuned_model is None and after.result_files == []
    assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(adapter_file(done))
    assert svc.store().tenant_output_bytes(svc.tenant("a")) == sum(
        svc.objects(f"tenants/{svc.tenant('a')}/jobs").values()
    )
