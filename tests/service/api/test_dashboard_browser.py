"""The dashboard in a real headless Chromium against the real service (API, Valkey, worker).

Needs Debian's `chromium` (apt-get install -y chromium) and the `playwright` Python
package as the driver; playwright's own browser download is never used. Set
SECO_DASHBOARD_SCREENSHOT=docs/dashboard.png to refresh the README's screenshot.
Waits use CSS selectors, not JS predicates: the page's CSP forbids eval, which
playwright's string predicates need.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service.client.proxy import DroppingProxy

ROOT = Path(__file__).resolve().parents[3]
CHROMIUM = Path(os.environ.get("SECO_CHROMIUM", "/usr/bin/chromium"))
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

playwright_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium with playwright")
pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: apt-get install -y chromium"),
]


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = launch_service(
        redis_url,
        tmp_path_factory.mktemp("ui"),
        workers=1,
        inference=True,  # the playground asks the models
        SECO_CHECKPOINT_EVERY="10",
        SECO_API_DOCS="true",
    )
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        yield b
        b.close()


def _files(svc: Any, d: Path) -> tuple[str, str]:
    train, valid = d / "train.jsonl", d / "valid.jsonl"
    train.write_text(
        "".join(json.dumps({"text": f"lorem ipsum dolor sit amet {i % 3} " * 8}) + "\n" for i in range(24))
    )
    valid.write_text(json.dumps({"text": "lorem ipsum dolor sit amet 1 " * 8}) + "\n")
    c = svc.client()
    return (
        c.files.create(file=train.open("rb"), purpose="fine-tune").id,
        c.files.create(file=valid.open("rb"), purpose="fine-tune").id,
    )


def test_dashboard_follows_a_job_live_and_downloads_its_adapter(svc: Any, browser: Any, tmp_path: Path) -> None:
    page = browser.new_page(viewport={"width": 1440, "height": 1080}, accept_downloads=True)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)

    page.goto(svc.url + "/")
    assert page.url == svc.url + "/ui"
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", "sk-not-a-key")
    page.click("#key-save")
    page.wait_for_selector("#key-error:not([hidden])")
    assert "Incorrect API key provided" in page.text_content("#key-error")
    problems.clear()  # Chromium logs that 401 as a console error: expected here, nowhere else
    page.fill("#key-input", svc.key())
    page.click("#key-save")
    page.wait_for_selector("#key-dialog", state="hidden")
    assert page.evaluate("sessionStorage.getItem('seco.apiKey')") == svc.key()
    assert page.evaluate("localStorage.getItem('seco.apiKey')") is None, "kept for the tab only"

    train, valid = _files(svc, tmp_path)
    client = svc.client()
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train,
        validation_file=valid,
        hyperparameters={"n_epochs": 2, "batch_size": 1, "learning_rate_multiplier": 20},
        extra_body={"seco": {"chunk_size": 16, "max_length": 64, "lora": {"r": 8, "alpha": 16}}},
    )
    row = page.wait_for_selector(f"tr[data-job-id='{job.id}']", timeout=15_000)  # the list refreshes itself
    row.click()
    assert page.url.endswith(f"#{job.id}")

    # The loss chart gains points while the job is running (samples: points, then the job's status).
    samples: list[tuple[int, str]] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        points = int(page.get_attribute("#loss-chart", "data-points") or 0)
        status = client.fine_tuning.jobs.retrieve(job.id).status
        samples.append((points, status))
        if status in ("succeeded", "failed", "cancelled"):
            break
        page.wait_for_timeout(300)
    running = [p for p, s in samples if s == "running" and p > 0]
    assert len(set(running)) >= 2 and running == sorted(running), f"no live growth seen: {samples}"
    assert samples[-1][1] == "succeeded", svc.logs()

    page.wait_for_selector("#download:not([hidden])", timeout=15_000)
    total = client.fine_tuning.jobs.retrieve(job.id).model_extra["total_steps"]
    page.wait_for_selector(f"#loss-chart[data-points='{total + 1}']")  # step 0: the starting model's validation
    assert page.get_attribute("#mem-chart", "data-points") == str(total)
    assert page.text_content("#job-status") == "succeeded"
    assert "The job has successfully completed" in page.text_content("#events")
    page.wait_for_selector("#checkpoints tbody tr")
    assert page.text_content("#progress-text") == "100%"
    assert not problems, problems

    # loss by position: the starting model (step 0) and the latest validation (the last step), one
    # bucket for this short validation document; the legend shows both values under the cursor
    page.wait_for_selector(f"#position-chart[data-latest-step='{total}']")
    assert page.get_attribute("#position-chart", "data-buckets") == "1"
    assert f"starting model (step 0) and step {total}" in page.text_content("#position-figure")
    by_step = {
        e.data["step"]: e.data["valid_loss_by_position"]
        for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)
        if e.type == "metrics" and "valid_loss_by_position" in e.data
    }
    page.hover("#position-chart .u-over")  # its middle: the only bucket
    legend = page.text_content("#position-chart .u-legend")
    assert "0-1K" in legend and "starting model" in legend and "latest" in legend, legend
    assert f"{by_step[0]['0-1K']:.3f}" in legend and f"{by_step[total]['0-1K']:.3f}" in legend, (legend, by_step)

    # The playground: one question to the fine-tuned and the base model, both answers streamed in.
    fine_tuned = client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model
    page.wait_for_selector("#playground:not([hidden])")
    assert page.text_content("#answer-tuned-model") == fine_tuned and page.text_content("#answer-base-model") == "tiny"
    question = "lorem ipsum dolor sit"
    page.fill("#playground-input", question)
    page.fill("#playground-max-tokens", "24")
    page.click("#playground-ask")
    page.wait_for_selector("#answer-tuned[data-state='done']", timeout=60_000)
    page.wait_for_selector("#answer-base[data-state='done']", timeout=60_000)
    for model, box in ((fine_tuned, "#answer-tuned"), ("tiny", "#answer-base")):
        expected = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24
        )
        assert page.text_content(box) == (expected.choices[0].message.content or "(an empty answer)"), model
    assert page.text_content("#answer-tuned") != page.text_content("#answer-base"), "the adapter changed the answer"
    assert not problems, problems

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    if target := os.environ.get("SECO_DASHBOARD_SCREENSHOT"):
        shutil.copyfile(shot, ROOT / target)

    with page.expect_download() as info:
        page.click("#download")
    download = info.value
    assert download.suggested_filename == f"{job.id}-adapter.tar.gz"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    assert saved.stat().st_size > 0
    with tarfile.open(saved, "r:gz") as tar:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(tar.getnames())

    # A reload keeps the key and the selected job, and replays the whole history into the charts.
    page.reload()
    page.wait_for_selector(f"#loss-chart[data-points='{total + 1}']")
    page.wait_for_selector(f"#position-chart[data-latest-step='{total}']")
    assert page.is_hidden("#key-dialog") and page.text_content("#job-id") == job.id
    assert not problems, problems
    page.close()

    # Through a proxy that cuts the event stream every 40 events: the page resumes with
    # Last-Event-ID, and ends with every event exactly once.
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=1000))
    proxy = DroppingProxy(int(svc.url.rsplit(":", 1)[1]), events=40)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.goto(f"{proxy.url}/ui#{job.id}")  # another origin: the key is asked for again
        page.fill("#key-input", svc.key())
        page.click("#key-save")
        page.wait_for_selector(f"#loss-chart[data-points='{total + 1}']", timeout=30_000)
        page.wait_for_selector("#events li >> text=The job has successfully completed")
        shown = page.eval_on_selector_all("#events li span", "els => els.map(e => e.textContent)")
        assert shown == [e.message for e in events], "every event once, newest first"
        assert proxy.drops >= len(events) // 40 - 1
        assert not problems, problems
        page.close()
    finally:
        proxy.close()


def test_dashboard_charts_a_dpo_jobs_rewards(svc: Any, browser: Any, tmp_path: Path) -> None:
    from tests.conftest import write_jsonl
    from tests.preference_task import preference_records

    client = svc.client()
    train = client.files.create(
        file=write_jsonl(tmp_path / "p.jsonl", preference_records(12, 1)).open("rb"), purpose="fine-tune"
    ).id
    valid = client.files.create(
        file=write_jsonl(tmp_path / "v.jsonl", preference_records(4, 2)).open("rb"), purpose="fine-tune"
    ).id
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train,
        validation_file=valid,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.5, "n_epochs": 1, "batch_size": 4}}},
        extra_body={"seco": {"chunk_size": 16, "lora": {"r": 8, "alpha": 16}}},
    )
    page = browser.new_page(viewport={"width": 1440, "height": 1080})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(f"{svc.url}/ui#{job.id}")
    page.fill("#key-input", svc.key())
    page.click("#key-save")
    page.wait_for_selector("#reward-figure:not([hidden])", timeout=15_000)
    assert "DPO (β 0.5)" in page.text_content("#facts")
    page.wait_for_selector("#reward-chart[data-points='3']", timeout=240_000)  # 12 pairs / 4 per step
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status in ("running", "succeeded"), svc.logs()
    legend = page.text_content("#reward-figure")
    assert "reward margin" in legend and "reward accuracy" in legend and "validation margin" in legend
    assert not problems, problems


def test_dashboard_pauses_and_resumes_a_job(svc: Any, browser: Any, tmp_path: Path) -> None:
    train, _ = _files(svc, tmp_path)
    client = svc.client()
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=train,
        hyperparameters={"n_epochs": 30, "batch_size": 1},
        extra_body={"seco": {"chunk_size": 16, "max_length": 64, "lora": {"r": 4}}},
    )
    page = browser.new_page(viewport={"width": 1440, "height": 1080})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: problems.append(f"dialog: {d.message}"))
    page.goto(f"{svc.url}/ui#{job.id}")
    page.fill("#key-input", svc.key())
    page.click("#key-save")
    page.wait_for_selector("#loss-chart:not([data-points='0'])", timeout=240_000)  # it is running
    assert page.is_hidden("#resume")
    page.click("#pause")
    page.wait_for_selector("#job-status.paused", timeout=120_000)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    assert page.text_content("#job-status") == "paused" and page.is_hidden("#pause")
    page.click("#resume")
    page.wait_for_selector("#job-status:not(.paused)", timeout=15_000)
    assert client.fine_tuning.jobs.retrieve(job.id).status in ("queued", "running")
    assert page.is_visible("#pause") and page.is_hidden("#resume")
    client.fine_tuning.jobs.cancel(job.id)
    assert not problems, problems


def test_the_key_is_kept_for_the_tab_unless_remembered(svc: Any, browser: Any) -> None:
    context = browser.new_context()
    try:
        first = context.new_page()
        first.goto(svc.url + "/ui")
        first.fill("#key-input", svc.key())
        first.click("#key-save")
        first.wait_for_selector("#key-dialog", state="hidden")
        second = context.new_page()  # another tab of the same browser: asks again
        second.goto(svc.url + "/ui")
        second.wait_for_selector("#key-dialog[open]")
        second.fill("#key-input", svc.key())
        second.check("#key-remember")
        second.click("#key-save")
        second.wait_for_selector("#key-dialog", state="hidden")
        assert second.evaluate("localStorage.getItem('seco.apiKey')") == svc.key()
        third = context.new_page()  # remembered: a new tab needs no key
        third.goto(svc.url + "/ui")
        third.wait_for_selector("#conn.ok")
        assert third.is_hidden("#key-dialog")
        third.click("#change-key")
        third.click("#key-forget")
        assert third.evaluate("localStorage.getItem('seco.apiKey')") is None
        assert third.evaluate("sessionStorage.getItem('seco.apiKey')") is None
    finally:
        context.close()


def test_api_reference_is_self_hosted_under_the_dashboards_csp(svc: Any, browser: Any) -> None:
    """/docs (SECO_API_DOCS=true) loads nothing from another origin and runs under the CSP."""
    page = browser.new_page()
    requests: list[str] = []
    problems: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
    response = page.goto(svc.url + "/docs")
    assert response is not None and response.status == 200
    assert "script-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_selector(".opblock-summary-path[data-path='/v1/fine_tuning/jobs/{fine_tuning_job_id}/events/stream']")
    assert requests and all(u.startswith(svc.url) or u.startswith("data:") for u in requests), requests
    assert not problems, problems
    assert page.request.get(svc.url + "/redoc").status == 404, "ReDoc is not offered"
    page.close()
