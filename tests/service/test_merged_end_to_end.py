"""`GET /v1/fine_tuning/jobs/{id}/merged` through the real path: the API (uvicorn), Redis, a real
Celery worker that trains the tiny demo Llama and then merges its adapter, on both storage
back-ends (local directory, S3). The archive a client downloads is a plain Hugging Face
directory whose logits are those of base + adapter; the quota counts it, a full quota refuses
it up front, another tenant cannot see it, and deleting the job gives its bytes back; a failed
build is reported, then built again."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from service.archives import safe_extract
from service.record.storage import keys
from tests.conftest import flush_db

QUOTA = 4_000_000
"""Bytes per tenant: a few times the demo model's weights (~430 KB), far above a job's outputs."""
SECO = {"chunk_size": 16, "max_length": 64, "lora": {"r": 4, "alpha": 8}}
HYPER = {"n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 30}  # high: the adapter moves far
PROMPT = torch.tensor([[5, 17, 99, 3, 42, 250, 7, 7, 64, 1]])


@pytest.fixture(scope="module")
def svc(
    launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory, storage_backend: str
) -> Iterator[Any]:
    flush_db(redis_url)
    s = launch_service(
        redis_url,
        tmp_path_factory.mktemp(f"merged-{storage_backend}"),
        workers=1,
        storage=storage_backend,
        SECO_MAX_FILE_BYTES=str(QUOTA),
    )
    s.backend = storage_backend
    yield s
    s.close()


def train(svc: Any, tenant: str, tmp: Path, wait: Callable[..., Any]) -> str:
    """A succeeded job of `tenant` on the demo model."""
    data = tmp / f"train-{tenant}.jsonl"
    data.write_text("".join(json.dumps({"text": f"doc {i}: the quick brown fox jumps. " * 3}) + "\n" for i in range(6)))
    client = svc.client(tenant)
    fid = client.files.create(file=data.open("rb"), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=fid, hyperparameters=HYPER, extra_body={"seco": SECO}
    )
    done = wait(
        lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed", "cancelled") and j,
        timeout=300,
        interval=0.5,
        what=f"job {job.id} to finish",
    )
    assert done.status == "succeeded", (done.error, svc.logs())
    return str(job.id)


def get_merged(http: httpx.Client, job_id: str, wait: Callable[..., Any]) -> httpx.Response:
    """Ask until the archive comes (each answer before it a 202 with Retry-After)."""

    def ask() -> httpx.Response | None:
        r = http.get(f"/v1/fine_tuning/jobs/{job_id}/merged")
        if r.status_code == 202:
            assert int(r.headers["retry-after"]) > 0 and r.json()["status"] == "building"
            return None
        return r

    return wait(ask, timeout=180, interval=0.5, what="the merged model")


def test_the_merged_model_downloads_as_a_plain_model_with_the_adapters_logits(
    svc: Any, tmp_path: Path, wait: Callable[..., Any], demo_model: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job = train(svc, "a", tmp_path, wait)
    store, tenant = svc.store(), svc.tenant("a")
    with svc.http("a") as http, svc.http("b") as other:
        assert other.get(f"/v1/fine_tuning/jobs/{job}/merged").status_code == 404, "tenant b cannot see it"
        first = http.get(f"/v1/fine_tuning/jobs/{job}/merged")
        assert first.status_code == 202, first.text
        assert first.json()["fine_tuning_job_id"] == job and int(first.headers["retry-after"]) > 0
        second = http.get(f"/v1/fine_tuning/jobs/{job}/merged")
        assert second.status_code in (200, 202)
        r = get_merged(http, job, wait)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/gzip"
        assert f'filename="{job}-merged.tar.gz"' in r.headers["content-disposition"]
        adapter = http.get(f"/v1/fine_tuning/jobs/{job}/adapter").content
        assert http.get(f"/v1/fine_tuning/jobs/{job}/merged").content == r.content, "served again, not rebuilt"
    requested = [e.message for e in svc.client("a").fine_tuning.jobs.list_events(job, limit=100)]
    assert sum("Merged model requested" in m for m in requested) == 1, "one build for all those requests"

    # the archive: a Hugging Face directory at its root, loaded by plain transformers
    (tmp_path / "merged.tar.gz").write_bytes(r.content)
    names = safe_extract(tmp_path / "merged.tar.gz", tmp_path / "merged")
    assert "config.json" in names and "model.safetensors" in names and "tokenizer.json" in names, names
    with tarfile.open(fileobj=io.BytesIO(adapter), mode="r:gz") as tar:
        tar.extractall(tmp_path / "adapter", filter="data")
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=PROMPT).logits
        base = AutoModelForCausalLM.from_pretrained(demo_model)
        plain = base(input_ids=PROMPT).logits
        tuned = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))(input_ids=PROMPT).logits
    assert (tuned - plain).abs().max() > 1e-2, "training moved the model: the comparison means something"
    torch.testing.assert_close(merged, tuned, atol=1e-4, rtol=1e-4)

    # counted against the quota while it is kept, and freed with the job
    stored = svc.objects(keys.job_prefix(tenant, job))
    merged_keys = [k for k in stored if k.rsplit("/", 1)[-1].startswith("merged-")]
    assert len(merged_keys) == 1 and stored[merged_keys[0]] == len(r.content)
    assert store.r.hget(f"seco:job:{job}", "output_bytes") == str(sum(stored.values())), "the job's outputs"
    assert store.tenant_output_bytes(tenant) >= len(r.content)
    with svc.http("a") as http:
        assert http.delete(f"/v1/fine_tuning/jobs/{job}").status_code == 200
    assert svc.objects(keys.job_prefix(tenant, job)) == {}
    assert store.tenant_output_bytes(tenant) == 0, "deleting the job gave the quota back"


def test_a_full_quota_refuses_the_merged_model_before_building(
    svc: Any, tmp_path: Path, wait: Callable[..., Any]
) -> None:
    if svc.backend != "local":
        pytest.skip("the API's and the worker's rules, the same on either back-end: run once")
    job = train(svc, "b", tmp_path, wait)
    store, tenant = svc.store(), svc.tenant("b")
    used = store.tenant_storage_bytes(tenant)
    filler = tmp_path / "filler.jsonl"  # leaves less room than the merged model needs (~430 KB)
    line = json.dumps({"text": "x" * 9_000}) + "\n"
    filler.write_text(line * ((QUOTA - used - 200_000) // len(line)))
    client = svc.client("b")
    filler_id = client.files.create(file=filler.open("rb"), purpose="fine-tune").id
    with svc.http("b") as http:
        r = http.get(f"/v1/fine_tuning/jobs/{job}/merged")
        assert r.status_code == 429, r.text
        error = r.json()["error"]
        assert error["code"] == "quota_exceeded" and str(QUOTA) in error["message"], error
        assert not [k for k in svc.objects(keys.job_prefix(tenant, job)) if "merged" in k], "nothing written"
        assert store.merges.get(job) is None, "no build recorded"
        client.files.delete(filler_id)

        # with room again it builds; on a worker that cannot load the base model, the build fails:
        # the next request reports why, and the one after builds again
        (good,) = svc.workers
        svc.stop_worker(good)
        broken_models = tmp_path / "no-model"
        broken_models.mkdir()
        broken = svc.start_worker(SECO_MODELS=f"tiny={broken_models}", HF_HUB_OFFLINE="1")
        assert http.get(f"/v1/fine_tuning/jobs/{job}/merged").status_code == 202
        failed = get_merged(http, job, wait)
        assert failed.status_code == 500, failed.text
        error = failed.json()["error"]
        assert error["code"] == "merge_failed" and "ask again to retry" in error["message"], error
        assert str(broken_models) not in error["message"], "no server path in the message"
        svc.stop_worker(broken)
        svc.start_worker()
        assert get_merged(http, job, wait).status_code == 200
