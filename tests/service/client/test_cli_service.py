"""`seco` client commands against the real service: API subprocess, Valkey, a Celery worker and
the tiny demo model on CPU. Jobs run one after another on the module's single worker."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.client import cli
from service.client.http import Client
from service.client.sse import follow_events
from tests.service.client.proxy import DroppingProxy

SMALL = [
    "--epochs",
    "1",
    "--batch-size",
    "2",
    "--chunk-size",
    "16",
    "--max-length",
    "64",
    "--lora-r",
    "4",
    "--lora-alpha",
    "8",
]
Run = Callable[..., tuple[int, str, str]]


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = launch_service(redis_url, tmp_path_factory.mktemp("cli"), workers=1, SECO_CHECKPOINT_EVERY="2")
    yield s
    s.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli-data")
    train, valid, long = d / "train.jsonl", d / "valid.jsonl", d / "long.jsonl"
    train.write_text(
        "".join(json.dumps({"text": f"document {i}: " + "the quick brown fox jumps. " * 3}) + "\n" for i in range(8))
    )
    valid.write_text(json.dumps({"text": "the quick brown fox jumps over the lazy dog."}) + "\n")
    long.write_text("".join(json.dumps({"text": "lorem ipsum dolor sit amet " * 8}) + "\n" for _ in range(40)))
    return {"train": train, "valid": valid, "long": long}


@pytest.fixture
def run(svc: Any, capsys: pytest.CaptureFixture[str]) -> Run:
    """`seco ARGS...` in-process with this service's URL and key; returns (exit code, stdout, stderr)."""

    def _run(*argv: str, url: str | None = None, key: str | None = None) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = cli.main([*argv, "--url", url or svc.url, "--api-key", key or svc.key()])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return rc, out, err

    return _run


@pytest.fixture(scope="module")
def done_job(svc: Any, data: dict[str, Path]) -> dict[str, Any]:
    """Filled by the first test: the job that `seco submit --follow` ran to success."""
    return {}


def test_submit_and_follow_to_success(run: Run, data: dict[str, Path], done_job: dict[str, Any]) -> None:
    rc, out, err = run(
        "submit",
        str(data["train"]),
        "--model",
        "tiny",
        "--validation-file",
        str(data["valid"]),
        "--suffix",
        "cli",
        *SMALL,
        "--follow",
    )
    assert rc == 0, out + err
    job_id = out.splitlines()[0]
    assert re.fullmatch(r"ftjob-[0-9a-f]{24}", job_id)
    assert "Uploaded train.jsonl as file-" in err and "Uploaded valid.jsonl as file-" in err
    steps = re.findall(r"^step (\d+)/(\d+) .* loss \d+\.\d+( \(val \d+\.\d+\))? tok acc \d+\.\d%  peak \d", out, re.M)
    total = int(steps[-1][1])
    assert [int(s) for s, _, _ in steps] == list(range(1, total + 1)), out  # every step once, in order
    assert steps[-1][2], "the validation loss is shown once measured"
    assert "Fine-tuning job started" in out and "tok/s" in out
    assert f"Job {job_id} succeeded" in out
    assert re.search(rf": ft:tiny:org-[0-9a-f]{{16}}:cli:{job_id.removeprefix('ftjob-')}$", out, re.M), out
    assert f"seco download {job_id}" in out
    done_job.update(id=job_id, steps=total)


def test_jobs_status_and_events(run: Run, done_job: dict[str, Any]) -> None:
    job_id = done_job["id"]
    rc, out, _ = run("jobs")
    assert rc == 0
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "MODEL", "STATUS", "PROGRESS", "AGE"]
    row = next(r for r in rows if r.startswith(job_id))
    assert row.split()[1:4] == ["tiny", "succeeded", "100%"]

    rc, out, _ = run("status", job_id)
    assert rc == 0
    fields = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines())
    assert fields["status"] == "succeeded"
    assert re.fullmatch(rf"ft:tiny:org-[0-9a-f]{{16}}:cli:{job_id.removeprefix('ftjob-')}", fields["fine-tuned model"])
    assert fields["seco"].startswith("mode=seco chunk_size=16") and "r=4" in fields["lora"]
    assert int(fields["trained tokens"].replace(",", "")) > 0 and fields["peak memory"].endswith("iB")
    rc, out, _ = run("status", job_id, "--json")
    assert rc == 0 and json.loads(out)["id"] == job_id

    rc, out, _ = run("events", job_id)
    lines = out.splitlines()
    assert rc == 0 and "Validating training file" in out and len(lines) > done_job["steps"]
    assert lines[-1].endswith("The job has successfully completed")
    assert sum(f"Step {s}/{done_job['steps']}" in out for s in range(1, done_job["steps"] + 1)) == done_job["steps"]
    rc, out, _ = run("events", job_id, "--json", "--limit", "3")
    assert rc == 0 and [json.loads(line)["object"] for line in out.splitlines()] == ["fine_tuning.job.event"] * 3


def test_download_extracts_the_adapter(run: Run, done_job: dict[str, Any], tmp_path: Path) -> None:
    dest = tmp_path / "adapter"
    rc, out, err = run("download", done_job["id"], "-o", str(dest))
    assert rc == 0, err
    assert json.loads((dest / "adapter_config.json").read_text())["r"] == 4
    assert (dest / "adapter_model.safetensors").stat().st_size > 0
    assert sorted(p.name for p in dest.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert f'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "{dest}")' in out
    rc, _, err = run("download", done_job["id"], "-o", str(dest))  # refuses to mix into a non-empty directory
    assert rc == 1 and "is not empty" in err


def test_follow_resumes_after_dropped_connections(run: Run, svc: Any, data: dict[str, Path]) -> None:
    """Follow a live job through a proxy that cuts the stream every 3 events, mid-event."""
    rc, out, _ = run("submit", str(data["train"]), "--model", "tiny", *SMALL)
    job_id = out.strip()
    proxy = DroppingProxy(int(svc.url.rsplit(":", 1)[1]), events=3)
    try:
        rc, out, err = run("follow", job_id, url=proxy.url)
        assert rc == 0, out + err
        drops = proxy.drops
        assert drops >= 2
        assert out.count("(stream interrupted: connection lost") == drops
        with Client(svc.url, svc.key()) as client:
            expected = client.events(job_id, 1000)
        total = next(e["data"]["total_steps"] for e in expected if e["type"] == "metrics")
        steps = [int(s) for s in re.findall(r"^step (\d+)/", out, re.M)]
        assert steps == list(range(1, total + 1)), "each step shown once, none missing"
        for ev in expected:
            if ev["type"] != "metrics":
                assert out.count(ev["message"]) == 1, ev["message"]

        # the same through the library, replaying the finished job: the exact ids, in order
        with Client(proxy.url, svc.key()) as client:
            got = list(follow_events(client, job_id))
        assert got[-1] == ("end", {"status": "succeeded"})
        assert [e["id"] for _, e in got[:-1]] == [e["id"] for e in expected]
        assert proxy.drops > drops
    finally:
        proxy.close()


def test_cancel_and_follow_exit_code(
    run: Run, svc: Any, data: dict[str, Path], wait: Callable[..., Any], tmp_path: Path
) -> None:
    rc, out, _ = run(
        "submit",
        str(data["long"]),
        "--model",
        "tiny",
        "--epochs",
        "50",
        "--batch-size",
        "1",
        "--chunk-size",
        "16",
        "--max-length",
        "64",
    )
    job_id = out.strip()
    client = svc.client()
    wait(
        lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job_id, limit=50).data),
        timeout=240,
        interval=0.5,
        what="the first metrics event",
    )
    result: dict[str, Any] = {}
    follower = threading.Thread(
        target=lambda: result.update(zip(("rc", "out", "err"), run("follow", job_id), strict=True))
    )
    rc, out, err = run("cancel", job_id)
    assert rc == 0 and f"Cancellation requested: {job_id} stops after its current step" in out, err
    rc, out, _ = run("jobs")
    assert re.search(rf"^{job_id}\s+tiny\s+(running \(cancelling\)|cancelled)", out, re.M), out
    follower.start()
    follower.join(120)
    assert result["rc"] == 3, result
    assert "Cancellation requested" in result["out"] and f"Job {job_id} cancelled" in result["out"]

    rc, _, err = run("download", job_id, "-o", str(tmp_path / "adapter"))
    assert rc == 1 and err.strip() == (
        f"seco: error: Job {job_id} is cancelled; its adapter is available once it has succeeded"
    )
    assert list(tmp_path.iterdir()) == [], "a refused download leaves nothing behind"


def test_errors_print_the_server_message(run: Run, svc: Any, data: dict[str, Path], tmp_path: Path) -> None:
    files_before = {f.id for f in svc.client().files.list()}
    rc, out, err = run("submit", str(data["valid"]), "--model", "no-such-model")
    assert rc == 1 and out == ""
    assert err.splitlines()[-1] == (
        "seco: error: Model 'no-such-model' is not offered by this server; choose one of: tiny"
    )
    assert {f.id for f in svc.client().files.list()} == files_before, "the file uploaded for it is deleted"
    rc, _, err = run("status", "ftjob-000000000000000000000000")
    assert rc == 1 and err.strip() == "seco: error: No such fine-tuning job: 'ftjob-000000000000000000000000'"
    rc, _, err = run("jobs", key="sk-wrong")
    assert rc == 1 and "Incorrect API key provided" in err and "SECO_API_KEY" in err
    rc, _, err = run("submit", str(tmp_path / "missing.jsonl"), "--model", "tiny")
    assert rc == 1 and "no such file" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    rc, _, err = run("submit", str(bad), "--model", "tiny")
    assert rc == 1 and err.startswith("seco: error: Invalid training file:")
    rc, _, err = run("jobs", url="http://127.0.0.1:9")  # nothing listens on the discard port
    assert rc == 1 and "cannot reach the seco server at http://127.0.0.1:9" in err
    rc, _, err = run("follow", "ftjob-000000000000000000000000", url="http://127.0.0.1:9")
    assert rc == 1 and "cannot reach" in err


def test_pause_and_resume(run: Run, svc: Any, data: dict[str, Path], wait: Callable[..., Any]) -> None:
    rc, out, _ = run(
        "submit",
        str(data["long"]),
        "--model",
        "tiny",
        "--epochs",
        "50",
        "--batch-size",
        "1",
        "--chunk-size",
        "16",
        "--max-length",
        "64",
    )
    job_id = out.strip()
    client = svc.client()
    wait(
        lambda: any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job_id, limit=50).data),
        timeout=240,
        interval=0.5,
        what="the first metrics event",
    )
    rc, out, err = run("pause", job_id)
    assert rc == 0 and (
        f"Pause requested: {job_id} stops after its current step" in out or f"Paused {job_id}" in out
    ), err
    wait(lambda: client.fine_tuning.jobs.retrieve(job_id).status == "paused", timeout=120, what="the pause")
    rc, out, _ = run("jobs")
    assert re.search(rf"^{job_id}\s+tiny\s+paused", out, re.M), out
    rc, out, err = run("resume", job_id)
    assert rc == 0 and f"Resumed {job_id}: " in out, err
    rc, out, err = run("resume", job_id)
    assert rc == 1 and "not paused; only a paused job can be resumed" in err, (out, err)
    assert run("cancel", job_id)[0] == 0
    wait(lambda: client.fine_tuning.jobs.retrieve(job_id).status == "cancelled", timeout=120, what="the cancel")
