"""A real `seco serve` process on the demo model, and real peft adapters to load into it.

The process is started through the `seco` command line (`seco serve --port P`), as an
operator starts it, with its own data dir (the adapters put in storage live there). Two
base models are served: the demo model (`tiny`, with a chat template) and a copy of it
whose tokenizer has no chat template (`plain`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port, without_chat_template

JOB = "ftjob-" + "0" * 23 + "1"
TENANT = "0123456789abcdef"


def make_adapter(base_dir: Path, dest: Path, seed: int, targets: list[str], r: int) -> Path:
    """A LoRA adapter of the demo model with random, non-zero A and B (so it changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)  # well away from zero: the adapter must change greedy output
    model.save_pretrained(str(dest))
    return dest


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    data_dir: Path
    log: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def client(self) -> object:
        from openai import OpenAI

        return OpenAI(base_url=self.v1, api_key="x", max_retries=0, timeout=60)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def stats(self) -> dict[str, int]:
        return dict(httpx.get(self.url + "/stats", timeout=10).json())

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="session")
def adapter_dirs(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two different adapters: q/v rank 4, and all attention projections rank 8."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(demo_model, root / "a", 1, ["q_proj", "v_proj"], 4),
        "b": make_adapter(demo_model, root / "b", 2, ["q_proj", "k_proj", "v_proj", "o_proj"], 8),
    }


def start_server(demo_model: Path, tmp: Path, **env: str) -> Server:
    plain = without_chat_template(demo_model, tmp / "plain-model")
    data_dir = tmp / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = tmp / "serve.log"
    inherited = {k: v for k, v in os.environ.items() if k != "SECO_STORAGE_URL"}
    full_env = {
        **inherited,
        "PYTHONPATH": str(ROOT),
        "SECO_MODELS": f"tiny={demo_model},plain={plain}",
        "SECO_DEVICE": "cpu",
        "SECO_SERVE_PREFILL_CHUNK": "16",  # small, so test prompts take several prefill steps
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **env,
    }
    argv = [sys.executable, "-c", "from service.client.cli import main; raise SystemExit(main())"]
    argv += ["serve", "--port", str(port), "--data-dir", str(data_dir)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=out, stderr=out, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", proc, data_dir, log)
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"seco serve exited with {proc.returncode}:\n{server.logs()}")
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise TimeoutError(f"seco serve did not become healthy:\n{server.logs()}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)


@pytest.fixture(scope="module")
def server(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(demo_model, tmp_path_factory.mktemp("serve"))
    yield srv
    stop_server(srv)
