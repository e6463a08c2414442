"""`seco chat` through the real path: the CLI as a subprocess, the API (uvicorn), Redis, a real
worker that trains the tiny demo Llama, and the real inference process (`seco serve`). Greedy
decoding makes every answer reproducible, so what the CLI streams is checked against the
same request made without streaming through the openai SDK."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import flush_db

ROOT = Path(__file__).resolve().parents[3]
GREEDY = ["--temperature", "0", "--max-tokens", "12"]


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    flush_db(redis_url)
    s = launch_service(redis_url, tmp_path_factory.mktemp("chat"), workers=1, inference=True)
    yield s
    s.close()


@pytest.fixture(scope="module")
def fine_tuned(svc: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The name of a fine-tuned model of tenant a (a short job, high learning rate)."""
    data = tmp_path_factory.mktemp("chat-data") / "train.jsonl"
    data.write_text("".join(json.dumps({"text": "the answer is forty-two. " * 4}) + "\n" for _ in range(6)))
    client = svc.client()
    fid = client.files.create(file=data.open("rb"), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=fid,
        hyperparameters={"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 30},
        extra_body={"seco": {"chunk_size": 16, "max_length": 64, "lora": {"r": 4, "alpha": 8}}},
    )
    deadline = time.monotonic() + 300
    while (done := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, svc.logs()
        time.sleep(0.5)
    assert done.status == "succeeded", (done.error, svc.logs())
    return str(done.fine_tuned_model)


def seco_chat(svc: Any, *argv: str, stdin: str = "", tenant: str = "a") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SECO_URL": svc.url, "SECO_API_KEY": svc.key(tenant)}
    code = "from service.client.cli import main; raise SystemExit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, "chat", *argv],
        input=stdin,
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def sdk_answer(svc: Any, model: str, messages: list[dict[str, str]]) -> str:
    resp = svc.client().chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12)
    return str(resp.choices[0].message.content)


def test_one_question_streams_the_answer_of_the_fine_tuned_model(svc: Any, fine_tuned: str) -> None:
    out = seco_chat(svc, fine_tuned, "-m", "what is the answer?", "--system", "Be brief.", *GREEDY)
    assert out.returncode == 0, out.stderr + svc.logs()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is the answer?"}]
    expected = sdk_answer(svc, fine_tuned, messages)
    assert expected and out.stdout == expected + "\n"
    assert expected != sdk_answer(svc, "tiny", messages), "the adapter answers, not the base model"


def test_a_conversation_sends_its_history_each_turn(svc: Any) -> None:
    out = seco_chat(svc, "tiny", *GREEDY, stdin="hello there\n\nand then?\n/exit\nnot sent\n")
    assert out.returncode == 0, out.stderr
    first = sdk_answer(svc, "tiny", [{"role": "user", "content": "hello there"}])
    second = sdk_answer(
        svc,
        "tiny",
        [
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "and then?"},
        ],
    )
    assert out.stdout == f"{first}\n{second}\n"


def test_api_errors_print_the_message_and_exit_non_zero(svc: Any, fine_tuned: str) -> None:
    other = seco_chat(svc, fine_tuned, "-m", "hi", tenant="b")  # tenant b cannot use a's model
    assert other.returncode == 1 and other.stdout == ""
    assert other.stderr.startswith("seco: error: ") and fine_tuned in other.stderr, other.stderr
    too_long = seco_chat(svc, "tiny", "-m", "x" * 9000, *GREEDY)  # the demo model takes 8192 positions
    assert too_long.returncode == 1
    assert "maximum context length is 8192 tokens" in too_long.stderr, too_long.stderr
    repl = seco_chat(svc, "nope", stdin="hi\n")
    assert repl.returncode == 1 and "nope" in repl.stderr, repl.stderr


def test_on_a_terminal_it_prompts_and_ends_at_ctrl_d(svc: Any) -> None:
    """The conversation on a pseudo-terminal: a prompt per turn, the answer streamed after it,
    Ctrl-D (end of input) ends it with exit 0."""
    import pty
    import select

    expected = sdk_answer(svc, "tiny", [{"role": "user", "content": "hello there"}])
    controller, terminal = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SECO_URL": svc.url, "SECO_API_KEY": svc.key("a")}
    code = "from service.client.cli import main; raise SystemExit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "chat", "tiny", *GREEDY],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
        cwd=ROOT,
        close_fds=True,
    )
    os.close(terminal)
    seen = b""

    def read_until(text: bytes, timeout: float = 60) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while text not in seen:
            assert time.monotonic() < deadline, seen
            if select.select([controller], [], [], 0.5)[0]:
                seen += os.read(controller, 4096)

    try:
        read_until(b"> ")
        os.write(controller, b"hello there\n")
        read_until(expected.encode().replace(b"\n", b"\r\n") + b"\r\n> ")
        os.write(controller, b"\x04")  # Ctrl-D
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(controller)
