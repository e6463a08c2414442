"""Tenant isolation on a *finished* job, with real checkpoints, an adapter and result files.

tests/service/api/test_jobs_api.py checks the job verbs on a queued job and the files API on
an uploaded file; here tenant B tries every resource and verb on everything tenant A's
trained job produced. Each answer must be exactly the answer for an id that does not
exist (a 404, never a 403 or a different message that would confirm the id is real).
Also: keys are compared in constant time, and no key is ever logged, even at DEBUG level.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from service.api.auth import match_key
from tests.conftest import flush_db
from tests.reliability.helpers import create_job, docs, events, finished, upload

WRONG_KEY = "sk-wrong-key-that-must-not-be-logged-42"


@pytest.fixture(scope="module")
def svc(
    launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory, storage_backend: str
) -> Iterator[Any]:
    flush_db(redis_url)
    s = launch_service(
        redis_url,
        tmp_path_factory.mktemp(f"isolation-{storage_backend}"),
        storage=storage_backend,
        workers=1,
        SECO_CHECKPOINT_EVERY="2",
        SECO_LOG_LEVEL="DEBUG",
    )
    yield s
    s.close()


@pytest.fixture(scope="module")
def trained(svc: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A job of tenant A that ran to an adapter."""
    from tests.conftest import wait_for

    file_id = upload(svc, tmp_path_factory.mktemp("isolation-data"), docs(4))
    job_id = create_job(svc, file_id)
    done = wait_for(lambda: finished(svc, job_id), timeout=180, interval=0.5, what="the job")
    assert done.status == "succeeded", (done.error, svc.logs())
    return done


def _same_as_missing(http: Any, method: str, path: str, real: str, fake: str, **kw: Any) -> None:
    """B's answer for A's id equals the answer for an id nobody has (with the id swapped)."""
    theirs = http.request(method, path.replace("{id}", real), **kw)
    missing = http.request(method, path.replace("{id}", fake), **kw)
    assert theirs.status_code == missing.status_code, (method, path, theirs.status_code, missing.status_code)
    assert theirs.text.replace(real, fake) == missing.text, (method, path, theirs.text, missing.text)
    assert theirs.status_code in (400, 404), (method, path, theirs.status_code)


def test_another_tenant_sees_nothing_of_a_finished_job(svc: Any, trained: Any) -> None:
    job_id = trained.id
    a = svc.client("a")
    checkpoints = a.fine_tuning.jobs.checkpoints.list(job_id).data
    evs = events(svc, job_id)
    assert checkpoints and len(trained.result_files) == 2 and evs
    fake_job, fake_file = "ftjob-" + "0" * 24, "file-" + "0" * 24
    job_routes = [
        ("GET", "/v1/fine_tuning/jobs/{id}"),
        ("POST", "/v1/fine_tuning/jobs/{id}/cancel"),
        ("GET", "/v1/fine_tuning/jobs/{id}/events"),
        ("GET", "/v1/fine_tuning/jobs/{id}/events/stream"),
        ("GET", "/v1/fine_tuning/jobs/{id}/checkpoints"),
        ("GET", "/v1/fine_tuning/jobs/{id}/adapter"),
        ("GET", "/v1/fine_tuning/jobs/{id}/merged"),
        ("GET", "/v1/fine_tuning/jobs?after={id}"),
    ]
    file_routes = [
        ("GET", "/v1/files/{id}"),
        ("GET", "/v1/files/{id}/content"),
        ("DELETE", "/v1/files/{id}"),
        ("GET", "/v1/files?after={id}"),
    ]
    with svc.http("b") as http:
        for method, path in job_routes:
            _same_as_missing(http, method, path, job_id, fake_job)
            assert http.request(method, path.replace("{id}", job_id)).status_code != 403
        # paging and resuming with A's event ids, against A's job, is the same 404
        for headers, params in (({"Last-Event-ID": evs[0].id}, {}), ({}, {"after": evs[-1].id})):
            r = http.get(f"/v1/fine_tuning/jobs/{job_id}/events/stream", headers=headers, params=params)
            assert r.status_code == 404
        for file_id in [*trained.result_files, trained.training_file]:
            for method, path in file_routes:
                _same_as_missing(http, method, path, file_id, fake_file)
        model = trained.fine_tuned_model
        r = http.get(f"/v1/models/{model}")
        assert r.status_code == 404 and model not in [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert job_id not in http.get("/v1/fine_tuning/jobs").text
        assert not set(trained.result_files) & {f["id"] for f in http.get("/v1/files").json()["data"]}

    # everything is untouched and still A's: B's cancel and deletes did nothing
    assert a.fine_tuning.jobs.retrieve(job_id).status == "succeeded"
    assert {f.id for f in a.files.list()} >= {*trained.result_files, trained.training_file}
    with svc.http("a") as http:
        assert http.get(f"/v1/fine_tuning/jobs/{job_id}/adapter").status_code == 200
        r = http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
        assert r.status_code == 400 and "already succeeded" in r.json()["error"]["message"], "the owner learns more"


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configured key is compared with hmac.compare_digest, whichever matches (or none)."""
    keys = {f"sk-key-{i}": f"tenant-{i}" for i in range(5)}
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented, tenant in (("sk-key-0", "tenant-0"), ("sk-key-4", "tenant-4"), ("sk-nope", None), ("", None)):
        calls.clear()
        assert match_key(presented, keys) == tenant
        assert len(calls) == len(keys), "no early exit on a match: timing does not reveal which key matched"


def test_no_key_is_ever_logged(svc: Any, trained: Any) -> None:
    """After a whole job, bad-key requests and errors, at DEBUG level, no log holds a key."""
    with svc.http(None) as http:
        for header in (f"Bearer {WRONG_KEY}", WRONG_KEY, f"Basic {WRONG_KEY}", f"Bearer {svc.key('a')}x"):
            assert http.get("/v1/files", headers={"Authorization": header}).status_code == 401
    svc.client("b").fine_tuning.jobs.list()
    logs = "".join(p.read_text(errors="replace") for p in svc.log_dir.glob("*.log"))
    assert "job started" in logs, "the logs really are being captured"
    for secret in (svc.key("a"), svc.key("b"), WRONG_KEY):
        assert secret not in logs, f"a key appears in the logs: {secret[:6]}..."


def test_a_tenant_key_is_not_the_tenant_id(svc: Any, trained: Any) -> None:
    """The organisation id shown to clients is derived from the key, never the key itself."""
    org = svc.client("a").fine_tuning.jobs.retrieve(trained.id).organization_id
    assert svc.key("a") not in org and org.startswith("org-")
