"""DPO jobs at the API (no worker): method objects through the official SDK, preference files
validated at upload by line, and a file of the wrong kind for the method refused at creation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import write_jsonl
from tests.preference_task import preference_records


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = launch_service(redis_url, tmp_path_factory.mktemp("dpo-api"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def files(svc: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("dpo-api-data")
    prefs = write_jsonl(d / "prefs.jsonl", preference_records(3, seed=0))
    text = write_jsonl(d / "text.jsonl", [{"text": "hello"}])
    c = svc.client()
    return {
        name: c.files.create(file=p.open("rb"), purpose="fine-tune").id
        for name, p in (("prefs", prefs), ("text", text))
    }


@pytest.fixture
def cancel_all(svc: Any) -> Iterator[None]:
    yield
    c = svc.client()
    for job in c.fine_tuning.jobs.list(limit=100):
        if job.status == "queued":
            c.fine_tuning.jobs.cancel(job.id)


def test_dpo_job_through_the_sdk(svc: Any, files: dict[str, str], cancel_all: None) -> None:
    client = svc.client()
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=files["prefs"],
        validation_file=files["prefs"],
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2, "batch_size": 4}}},
        extra_body={"seco": {"mode": "spaco", "budget": 2, "chunk_size": 64}},
    )
    assert job.status == "queued"
    assert job.method is not None and job.method.type == "dpo" and job.method.dpo is not None
    hp = job.method.dpo.hyperparameters
    assert hp is not None and (hp.beta, hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (0.25, 2, 4, "auto")
    assert job.hyperparameters.n_epochs == 2
    assert (job.model_extra or {})["seco"]["mode"] == "spaco"
    assert client.fine_tuning.jobs.retrieve(job.id).model_dump() == job.model_dump()
    # defaults: beta "auto" (0.1 in the worker); the older top-level hyperparameters apply too
    auto = client.fine_tuning.jobs.create(
        model="tiny", training_file=files["prefs"], method={"type": "dpo"}, hyperparameters={"n_epochs": 3}
    )
    assert auto.method and auto.method.dpo and auto.method.dpo.hyperparameters
    assert (auto.method.dpo.hyperparameters.beta, auto.method.dpo.hyperparameters.n_epochs) == ("auto", 3)
    # a supervised job still says so
    sft = client.fine_tuning.jobs.create(model="tiny", training_file=files["text"])
    assert sft.method is not None and sft.method.type == "supervised" and sft.method.dpo is None


@pytest.mark.parametrize(
    ("kwargs", "param", "fragment"),
    [
        (
            {"method": {"type": "dpo"}, "training_file": "text"},
            "training_file",
            "holds supervised records (text, chat or prompt/completion); a job with method type 'dpo' needs preference",
        ),
        ({"method": {"type": "dpo"}, "validation_file": "text"}, "validation_file", "holds supervised records"),
        (
            {"training_file": "prefs"},
            "training_file",
            'holds preference pairs; train on them with method={"type": "dpo"}',
        ),
        ({"method": {"type": "supervised"}, "training_file": "prefs"}, "training_file", "holds preference pairs"),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
            "method.dpo.hyperparameters.beta",
            "greater than 0",
        ),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 2.5}}}},
            "method.dpo.hyperparameters.beta",
            "less than or equal to 2",
        ),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 0}}}},
            "method.dpo.hyperparameters.n_epochs",
            "greater than or equal to 1",
        ),
        ({"method": {"type": "reinforcement"}}, "method.type", "'supervised' or 'dpo'"),
        (
            {"method": {"type": "dpo", "supervised": {}}},
            "method",
            "method.supervised does not apply to method.type 'dpo'",
        ),
        ({"method": {"type": "supervised", "dpo": {}}}, "method", "method.dpo does not apply"),
    ],
)
def test_wrong_method_or_file_kind_is_a_clear_400(
    svc: Any, files: dict[str, str], kwargs: dict[str, Any], param: str, fragment: str
) -> None:
    args: dict[str, Any] = {"model": "tiny", "training_file": files["prefs"], **kwargs}
    for key in ("training_file", "validation_file"):
        if args.get(key) in files:
            args[key] = files[args[key]]
    with pytest.raises(openai.BadRequestError) as e:
        svc.client().fine_tuning.jobs.create(**args)
    assert e.value.param == param, e.value.message
    assert fragment in e.value.message
    assert e.value.response.headers.get("x-should-retry") == "false"


@pytest.mark.parametrize(
    ("lines", "fragment"),
    [
        (
            [preference_records(1, 0)[0], {**preference_records(1, 1)[0], "preferred_output": []}],
            "line 2: 'preferred_output' must be a list with one assistant message",
        ),
        (
            [preference_records(1, 0)[0], {"text": "a document"}],
            "line 2: a supervised record in a file of preference records (line 1 is one)",
        ),
        (
            [{"prompt": "p", "completion": "c"}, preference_records(1, 0)[0]],
            "line 2: a preference record in a file of supervised records (line 1 is one)",
        ),
    ],
)
def test_preference_files_are_validated_at_upload_by_line(
    svc: Any, tmp_path: Path, lines: list[Any], fragment: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(openai.BadRequestError) as e:
        svc.client().files.create(file=path.open("rb"), purpose="fine-tune")
    assert e.value.param == "file" and fragment in e.value.message, e.value.message
