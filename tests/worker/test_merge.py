"""The worker's merged model (`worker/merge.py`): the merge itself on the tiny demo Llama with a
real peft adapter, and the build against a real Redis and local storage: what it stores, what
the quota counts, and that nothing half-written stays when it cannot finish."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from service.record.outputs import delete_outputs
from service.record.settings import Settings
from service.record.storage import keys
from service.record.storage.local import LocalStorage
from service.record.store import Store
from tests.service.record.test_store import T1, fake_train, make_file, make_job, settings_for
from worker.merge import build_merged, merge_adapter
from worker.spec import TrainContext, TrainResult, TrainSpec
from worker.tasks import train_next_job

PROMPT = torch.tensor([[5, 17, 99, 3, 42, 250, 7, 7, 64, 1]])


@pytest.fixture(scope="module")
def adapter(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real peft adapter of the demo model whose LoRA weights are far from zero (a fresh one's
    B is zero: merging it would change nothing and prove nothing); packed as the trainer packs."""
    from transformers import AutoModelForCausalLM

    from seco_core.lora import attach_lora, pack_adapter, save_adapter

    torch.manual_seed(3)
    model = attach_lora(AutoModelForCausalLM.from_pretrained(demo_model), r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("adapter")
    save_adapter(model, out / "adapter", "tiny")
    return pack_adapter(out / "adapter", out / "adapter.tar.gz")


def base_plus_adapter_logits(base_dir: Path, adapter_dir: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir))
    with torch.no_grad():
        return model(input_ids=PROMPT).logits


def plain_logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=PROMPT).logits


def test_merge_adapter_gives_the_logits_of_base_plus_adapter(demo_model: Path, adapter: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from service.archives import safe_extract

    safe_extract(adapter, tmp_path / "adapter")
    out = merge_adapter(demo_model, tmp_path / "adapter", tmp_path / "merged")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names, names
    assert not any(n.startswith("adapter_") for n in names), "a plain model directory, no adapter files"
    merged, expected = plain_logits(out), base_plus_adapter_logits(demo_model, tmp_path / "adapter")
    assert not torch.allclose(expected, plain_logits(demo_model), atol=1e-3), "the adapter changes the model"
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    text = "the merged model's tokenizer"
    tokens = [AutoTokenizer.from_pretrained(d)(text).input_ids for d in (out, demo_model)]
    assert tokens[0] == tokens[1]


@pytest.fixture
def store(redis_url: str) -> Store:
    s = Store.from_url(redis_url)
    s.r.flushdb()
    return s


@pytest.fixture
def data(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "data")


def succeeded_job(store: Store, data: LocalStorage, settings: Settings, adapter: Path) -> str:
    """A job the real worker path settled as succeeded, its adapter archive the real one above."""

    def train(spec: TrainSpec, ctx: TrainContext) -> TrainResult:
        result = fake_train(spec, ctx)
        shutil.copyfile(adapter, result.adapter_archive)
        return result

    job = make_job(store, make_file(store, data).id)
    assert train_next_job(settings, store, worker_id="w", train=train) == "succeeded"
    return job


def test_a_build_stores_the_archive_counts_it_and_deletion_frees_it(
    store: Store, data: LocalStorage, demo_model: Path, adapter: Path, tmp_path: Path
) -> None:
    settings = settings_for(store, data, demo_model)
    job = succeeded_job(store, data, settings, adapter)
    before = store.tenant_output_bytes(T1)
    found = store.merges.request(job)
    assert found.build and found.state is not None and found.state.status == "building"
    assert not store.merges.request(job).build, "a second request while it builds starts no second build"
    token = found.state.token

    assert build_merged(settings, store, job, token) == "ready"
    state = store.merges.get(job)
    assert state is not None and state.status == "ready" and state.token == token
    key = keys.merged_key(T1, job, token)
    assert data.size(key) == state.bytes and state.bytes
    assert store.tenant_output_bytes(T1) == before + state.bytes, "the quota counts the merged model"
    assert not list((data.root / "scratch").rglob(f"{job}*")), "scratch space cleaned"
    with tarfile.open(data.local_path(key), "r:gz") as tar:
        tar.extractall(tmp_path / "merged", filter="data")
    torch.testing.assert_close(
        plain_logits(tmp_path / "merged"),
        base_plus_adapter_logits(demo_model, _extracted(adapter, tmp_path / "adapter")),
        atol=1e-5,
        rtol=1e-5,
    )
    assert build_merged(settings, store, job, token) == "stale", "a redelivered message builds nothing"

    rec = store.get_job(job)
    assert rec is not None
    delete_outputs(store, data, rec)
    assert not data.exists(key) and store.merges.get(job) is None
    assert store.tenant_output_bytes(T1) == 0, "deleting the outputs gives the quota back"


def _extracted(archive: Path, dest: Path) -> Path:
    from service.archives import safe_extract

    safe_extract(archive, dest)
    return dest


def test_a_build_the_quota_cannot_hold_is_not_stored_and_is_reported_once(
    store: Store, data: LocalStorage, demo_model: Path, adapter: Path
) -> None:
    settings = settings_for(store, data, demo_model)
    job = succeeded_job(store, data, settings, adapter)
    used = store.tenant_storage_bytes(T1)
    tight = settings.model_copy(update={"max_file_bytes": used + 1000})
    found = store.merges.request(job)
    assert found.state is not None
    assert build_merged(tight, store, job, found.state.token) == "failed"
    assert not [o for o in data.list_under(keys.job_prefix(T1, job)) if "merged" in o.key], "nothing written"
    assert store.tenant_storage_bytes(T1) == used
    reported = store.merges.request(job)
    assert reported.state is not None and reported.state.status == "failed" and not reported.build
    assert reported.state.error is not None and reported.state.error["code"] == "quota_exceeded"
    assert str(used + 1000) in reported.state.error["message"], "the message names the quota"
    again = store.merges.request(job)
    assert again.build, "after the failure was reported, the next request builds again"
    assert build_merged(settings, store, job, again.state.token) == "ready"  # type: ignore[union-attr]


def test_a_build_whose_job_is_deleted_meanwhile_leaves_nothing(
    store: Store, data: LocalStorage, demo_model: Path, adapter: Path
) -> None:
    settings = settings_for(store, data, demo_model)
    job = succeeded_job(store, data, settings, adapter)
    found = store.merges.request(job)
    assert found.state is not None

    def merge_then_delete(base: Path, adapter_dir: Path, out: Path) -> Path:
        merge_adapter(base, adapter_dir, out)
        rec = store.get_job(job)
        assert rec is not None
        delete_outputs(store, data, rec)  # the model is deleted while the worker packs its archive
        return out

    assert build_merged(settings, store, job, found.state.token, merge=merge_then_delete) == "discarded"
    assert data.list_under(keys.job_prefix(T1, job)) == [], "the late archive is removed again"
    assert store.tenant_output_bytes(T1) == 0 and store.merges.get(job) is None


def test_a_merge_that_crashes_is_reported_without_server_paths(
    store: Store, data: LocalStorage, demo_model: Path, adapter: Path
) -> None:
    settings = settings_for(store, data, demo_model)
    job = succeeded_job(store, data, settings, adapter)
    found = store.merges.request(job)
    assert found.state is not None

    def broken(base: Path, adapter_dir: Path, out: Path) -> Path:
        raise RuntimeError(f"cannot read {base}/model.safetensors")

    assert build_merged(settings, store, job, found.state.token, merge=broken) == "failed"
    state = store.merges.get(job)
    assert state is not None and state.error is not None and state.error["code"] == "merge_failed"
    assert "RuntimeError" in state.error["message"] and str(demo_model) not in state.error["message"]
    assert "<model tiny>" in state.error["message"]
    assert not [o for o in data.list_under(keys.job_prefix(T1, job)) if "merged" in o.key]
