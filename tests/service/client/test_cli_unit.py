"""The CLI's pieces that need no server: light imports, parsing, SSE rules, safe extraction, formatting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.client import cli
from service.client.commands.submit import job_body
from service.client.format import ProgressLine, age, human_bytes, human_duration, table
from service.client.http import ClientError, base_url, resolve_api_key
from service.client.sse import SSEParser

ROOT = Path(__file__).resolve().parents[3]
HEAVY = ("torch", "fastapi", "celery", "starlette", "pydantic", "redis", "transformers", "peft", "seco_core", "worker")


def test_client_imports_only_stdlib_and_httpx() -> None:
    """A laptop has no torch/fastapi/celery: importing them is made to fail, and nothing else heavy loads."""
    code = (
        "import sys\n"
        "for m in ('torch', 'fastapi', 'celery', 'transformers', 'pydantic', 'redis'):\n"
        "    sys.modules[m] = None  # any import of these now raises ImportError\n"
        "import service.client.cli, service.client.commands\n"
        "service.client.cli.build_parser().parse_args(['jobs'])\n"
        "loaded = {name.split('.')[0] for name, mod in list(sys.modules.items()) if mod is not None}\n"
        f"print(sorted(loaded & set({HEAVY!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_client_command_is_registered() -> None:
    parser = cli.build_parser()
    for argv in (
        ["submit", "f.jsonl", "--model", "m"],
        ["jobs"],
        ["status", "j"],
        ["cancel", "j"],
        ["pause", "j"],
        ["resume", "j"],
        ["events", "j"],
        ["follow", "j"],
        ["download", "j", "-o", "d"],
    ):
        args = parser.parse_args(argv)
        assert callable(args.func), argv


def test_bench_passes_every_argument_through() -> None:
    """Options too: argparse's REMAINDER would reject `seco bench --lengths 1024`."""
    args = cli.build_parser().parse_args(["bench", "--lengths", "1024", "2048", "-h", "--out", "x"])
    assert args.args == ["--lengths", "1024", "2048", "-h", "--out", "x"]
    assert args.func.__name__ == "cmd_bench"


def test_submit_sends_only_the_options_given() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["submit", "t.jsonl", "--model", "tiny"])
    assert job_body(args, "file-1", None) == {"model": "tiny", "training_file": "file-1"}
    args = parser.parse_args(
        [
            "submit",
            "t.jsonl",
            "--model",
            "tiny",
            "--epochs",
            "2",
            "--batch-size",
            "auto",
            "--lr-multiplier",
            "0.5",
            "--suffix",
            "s",
            "--seed",
            "7",
            "--mode",
            "spaco",
            "--budget",
            "4",
            "--sampling",
            "fixed",
            "--chunk-size",
            "128",
            "--max-length",
            "4096",
            "--lora-r",
            "8",
            "--lora-target-modules",
            "q_proj, v_proj",
            "--metadata",
            "a=b=c",
        ]
    )
    assert job_body(args, "file-1", "file-2") == {
        "model": "tiny",
        "training_file": "file-1",
        "validation_file": "file-2",
        "hyperparameters": {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5},
        "suffix": "s",
        "seed": 7,
        "metadata": {"a": "b=c"},
        "seco": {
            "mode": "spaco",
            "chunk_size": 128,
            "max_length": 4096,
            "budget": 4,
            "sampling": "fixed",
            "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
        },
    }
    with pytest.raises(ClientError, match="KEY=VALUE"):
        job_body(parser.parse_args(["submit", "t", "--model", "m", "--metadata", "novalue"]), "file-1", None)


def test_url_and_key_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SECO_URL", raising=False)
    monkeypatch.delenv("SECO_API_KEY", raising=False)
    assert base_url(None) == "http://127.0.0.1:8000"
    assert base_url("http://gpu-box:9000/v1/") == "http://gpu-box:9000"
    monkeypatch.setenv("SECO_URL", "https://seco.example")
    assert base_url(None) == "https://seco.example"
    # the key `seco up` saved is used for a local server only, never sent elsewhere
    (tmp_path / "api_key").write_text("sk-local\n")
    monkeypatch.setenv("SECO_DATA_DIR", str(tmp_path))
    assert resolve_api_key(None, "http://127.0.0.1:8000") == "sk-local"
    assert resolve_api_key(None, "https://seco.example") is None
    monkeypatch.setenv("SECO_API_KEY", "sk-env")
    assert resolve_api_key(None, "https://seco.example") == "sk-env"
    assert resolve_api_key("sk-flag", "https://seco.example") == "sk-flag"


def _feed(parser: SSEParser, text: str) -> list[Any]:
    out = []
    for line in text.split("\n"):
        msg = parser.feed(line)
        if msg is not None:
            out.append(msg)
    return out


def test_sse_parser_follows_the_eventsource_rules() -> None:
    p = SSEParser()
    msgs = _feed(
        p,
        'retry: 2000\n\n: keep-alive\n\nid: 1-0\ndata: {"a": 1}\n\nid: 2-0\ndata: x\ndata:y\n\n'
        "event: end\ndata: {}\n\n",
    )
    assert [(m.event, m.data, m.id) for m in msgs] == [
        ("message", '{"a": 1}', "1-0"),
        ("message", "x\ny", "2-0"),
        ("end", "{}", "2-0"),
    ]
    assert p.retry_ms == 2000
    # a message cut off by a dropped connection is never dispatched, and its id is not the resume point
    p = SSEParser("1-0")
    assert _feed(p, 'id: 2-0\ndata: {"half"') == []
    p.drop_partial()
    assert p.last_id == "1-0"
    assert [m.id for m in _feed(p, "data: whole\n\n")] == ["1-0"]


def test_formatting() -> None:
    assert human_bytes(512) == "512 B" and human_bytes(3 * 1024**3) == "3.0 GiB" and human_bytes(None) == "-"
    assert human_duration(75) == "1:15" and human_duration(3725) == "1:02:05" and human_duration(None) == "-"
    assert [age(1000 - d, now=1000) for d in (5, 120, 7200, 3 * 86400)] == ["5s", "2m", "2h", "3d"]
    assert table(["A", "BB"], [["xxx", "y"]]).splitlines() == ["A    BB", "xxx  y"]
    line = ProgressLine(unicode=False)
    line.update(
        {
            "step": 1,
            "total_steps": 4,
            "train_loss": 2.5,
            "valid_loss": 2.75,
            "peak_memory_bytes": 2**20,
            "tokens_per_second": 1234.0,
            "step_seconds": 2.0,
        }
    )
    line.update(
        {
            "step": 2,
            "total_steps": 4,
            "train_loss": 2.25,
            "peak_memory_bytes": 2**19,
            "step_seconds": 4.0,
            "train_mean_token_accuracy": 0.4321,
        }
    )
    text = line.render()
    assert text.startswith("step 2/4  ############------------  50%  ETA 0:06")  # (2 s + 4 s) / 2 * 2 steps left
    assert "1,234 tok/s" in text and "loss 2.2500 (val 2.7500) tok acc 43.2%" in text and "peak 1.0 MiB" in text
    assert json.dumps(text)  # one plain line


def test_submit_a_dpo_job() -> None:
    """A DPO job's hyperparameters travel in OpenAI's method object, beta included."""
    parser = cli.build_parser()
    args = parser.parse_args(
        ["submit", "p.jsonl", "--model", "tiny", "--method", "dpo", "--beta", "0.2", "--epochs", "2"]
    )
    assert job_body(args, "file-1", None) == {
        "model": "tiny",
        "training_file": "file-1",
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "beta": 0.2}}},
    }
    bare = job_body(parser.parse_args(["submit", "p.jsonl", "--model", "tiny", "--method", "dpo"]), "file-1", None)
    assert bare["method"] == {"type": "dpo", "dpo": {"hyperparameters": {}}}
    with pytest.raises(ClientError, match="--beta applies to --method dpo"):
        job_body(parser.parse_args(["submit", "p.jsonl", "--model", "tiny", "--beta", "0.2"]), "file-1", None)


def test_progress_line_of_a_dpo_job() -> None:
    line = ProgressLine(unicode=False)
    line.update(
        {
            "step": 3,
            "total_steps": 6,
            "train_loss": 0.5,
            "reward_margin": 0.75,
            "reward_accuracy": 0.875,
            "valid_loss": 0.6,
            "valid_reward_margin": 0.5,
        }
    )
    line.update({"step": 4, "total_steps": 6, "train_loss": 0.4, "reward_margin": 1.25, "reward_accuracy": 1.0})
    text = line.render()
    assert "loss 0.4000 (val 0.6000)" in text and "margin 1.250 (val 0.500) acc 100%" in text
