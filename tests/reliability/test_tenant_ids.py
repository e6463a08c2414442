"""Tenant ids on the real service, on both storage back-ends.

A tenant id (shown as `organization_id`, used in Redis and storage keys) is an HMAC of the
key under the service's secret, no longer `sha256(key)[:16]`, which anyone seeing it could
test candidate keys against offline. Data left under the old ids by an earlier version
is moved when the API starts: here a tenant's trained job and files, and another tenant's
file, are put back the way the old version laid them out (independently of the code that
moves them), the API is restarted, and everything is found again under the new ids.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from service.record.tenants import legacy_tenant_of, tenant_of
from tests.conftest import flush_db, wait_for
from tests.record_reads import list_checkpoints
from tests.reliability.helpers import create_job, docs, finished, restart_api, upload


@pytest.fixture(scope="module")
def svc(
    launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory, storage_backend: str
) -> Iterator[Any]:
    flush_db(redis_url)
    s = launch_service(
        redis_url,
        tmp_path_factory.mktemp(f"tenant-ids-{storage_backend}"),
        storage=storage_backend,
        workers=1,
        SECO_CHECKPOINT_EVERY="2",
    )
    yield s
    s.close()


def _as_the_old_version_left_it(svc: Any, new: str, old: str) -> None:
    """Records and objects of tenant `new` moved under its old id `old`, as an earlier version wrote them."""
    r = redis.Redis.from_url(svc.redis_url, decode_responses=True)
    svc.storage().move_under(f"tenants/{new}", f"tenants/{old}")
    for file_id in r.zrange(f"seco:tenant:{new}:files", 0, -1):
        path = r.hget(f"seco:file:{file_id}", "path")
        r.hset(
            f"seco:file:{file_id}", mapping={"tenant": old, "path": path.replace(f"tenants/{new}/", f"tenants/{old}/")}
        )
    for job_id in r.zrange(f"seco:tenant:{new}:jobs", 0, -1):
        r.hset(f"seco:job:{job_id}", "tenant", old)
        for step, raw in r.hgetall(f"seco:job:{job_id}:checkpoints").items():
            r.hset(f"seco:job:{job_id}:checkpoints", step, raw.replace(f"tenants/{new}/", f"tenants/{old}/"))
    for suffix in ("files", "file_bytes", "jobs", "active", "output_bytes"):
        if r.exists(f"seco:tenant:{new}:{suffix}"):
            r.rename(f"seco:tenant:{new}:{suffix}", f"seco:tenant:{old}:{suffix}")
    r.close()


def test_old_tenant_ids_are_moved_to_the_new_ones_when_the_api_starts(svc: Any, tmp_path: Path) -> None:
    a = svc.client("a")
    secret = svc.store().tenant_secret()
    new_a, new_b = tenant_of(svc.key("a"), secret), tenant_of(svc.key("b"), secret)
    old_a, old_b = legacy_tenant_of(svc.key("a")), legacy_tenant_of(svc.key("b"))
    train_file = upload(svc, tmp_path, docs(4))
    job_id = create_job(svc, train_file)
    job = wait_for(lambda: finished(svc, job_id), 180, interval=0.5, what="the job")
    assert job.status == "succeeded", (job.error, svc.logs())
    assert job.organization_id == f"org-{new_a}" != f"org-{old_a}", "the id shown needs the secret"
    b_file = upload(svc, tmp_path, [{"text": "tenant b's own"}], tenant="b")
    checkpoints = [c.step_number for c in a.fine_tuning.jobs.checkpoints.list(job_id).data]
    content = a.files.content(train_file).read()
    before = {t: svc.objects(f"tenants/{t}") for t in (new_a, new_b)}
    assert before[new_a] and before[new_b]
    quota_a = svc.store().tenant_storage_bytes(new_a)

    for w in list(svc.workers):  # the move runs with workers stopped
        svc.stop_worker(w)
    _as_the_old_version_left_it(svc, new_a, old_a)
    _as_the_old_version_left_it(svc, new_b, old_b)
    assert svc.objects(f"tenants/{new_a}") == {} and svc.objects(f"tenants/{old_a}")

    restart_api(svc)  # a new API process: it finds the data under the old ids and moves it
    moved = {t: svc.objects(f"tenants/{t}") for t in (new_a, new_b)}
    assert {k.split("/", 2)[2]: n for k, n in moved[new_a].items()} == {
        k.split("/", 2)[2]: n for k, n in before[new_a].items()
    }, "every object is back under the new id"
    assert svc.objects(f"tenants/{old_a}") == {} and svc.objects(f"tenants/{old_b}") == {}
    r = redis.Redis.from_url(svc.redis_url)
    assert not r.keys(f"seco:tenant:{old_a}:*") and not r.keys(f"seco:tenant:{old_b}:*")
    assert svc.store().tenant_storage_bytes(new_a) == quota_a, "quota accounting moved too"

    # tenant A finds its file, job, checkpoints and adapter; B its file; neither sees the other's
    assert a.files.content(train_file).read() == content
    assert a.fine_tuning.jobs.retrieve(job_id).organization_id == f"org-{new_a}"
    assert [c.step_number for c in a.fine_tuning.jobs.checkpoints.list(job_id).data] == checkpoints
    for c in list_checkpoints(svc.store(), job_id, after=None, limit=100)[0]:
        assert svc.storage().exists(f"{c.path}/checkpoint.json"), c.path
    with svc.http() as http:
        adapter = http.get(f"/v1/fine_tuning/jobs/{job_id}/adapter")
    assert adapter.status_code == 200
    (tmp_path / "adapter.tar.gz").write_bytes(adapter.content)
    with tarfile.open(tmp_path / "adapter.tar.gz") as tar:
        assert "adapter_model.safetensors" in tar.getnames()
    assert svc.client("b").files.retrieve(b_file).id == b_file
    with pytest.raises(openai.NotFoundError):
        svc.client("b").files.retrieve(train_file)
    assert "moved a tenant's data to its new id" in (svc.log_dir / "api.log").read_text()
