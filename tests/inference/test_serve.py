"""`seco serve` through the real path: a uvicorn process, real peft adapters, the official openai SDK.

Greedy outputs are compared with plain transformers + peft run in this process on the same
model and adapter files; the adapters have random non-zero B, so each changes the output.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.inference.conftest import JOB, TENANT, Server, start_server, stop_server

PROMPT = "Once upon a time, in a land far away,"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def loaded(server: Server, adapter_dirs: dict[str, Path]) -> dict[str, Path]:
    """`ad-a` from a local directory, `ad-b` from an archive in the service's storage."""
    from seco_core.lora import pack_adapter
    from service.record.storage import LocalStorage

    key = f"tenants/{TENANT}/jobs/{JOB}/adapter.tar.gz"
    archive = pack_adapter(adapter_dirs["b"], server.data_dir / "upload.tar.gz")
    LocalStorage(server.data_dir).put_file(key, archive)
    with server.http() as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "ad-a", "lora_path": str(adapter_dirs["a"])})
        assert r.status_code == 200, r.text
        r = http.post(
            "/v1/load_lora_adapter",
            json={"lora_name": "ad-b", "lora_path": f"seco-storage:archive:{key}", "base_model": "tiny"},
        )
        assert r.status_code == 200, r.text
    return adapter_dirs


class Reference:
    """Plain transformers (+ peft) in this process: what the server must reproduce."""

    def __init__(self, demo_model: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(demo_model))
        self.demo_model = demo_model
        self.base = AutoModelForCausalLM.from_pretrained(str(demo_model), dtype=torch.float32).eval()

    def model(self, adapter: Path | None) -> Any:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if adapter is None:
            return self.base
        fresh = AutoModelForCausalLM.from_pretrained(str(self.demo_model), dtype=self.torch.float32)
        return PeftModel.from_pretrained(fresh, str(adapter)).eval()

    def greedy(self, adapter: Path | None, ids: list[int], n: int) -> str:
        model = self.model(adapter)
        x = self.torch.tensor([ids])
        out = model.generate(input_ids=x, attention_mask=self.torch.ones_like(x), do_sample=False, max_new_tokens=n)
        new = [t for t in out[0, len(ids) :].tolist() if t != self.tokenizer.eos_token_id]
        return str(self.tokenizer.decode(new, skip_special_tokens=True))

    def prompt_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def reference(demo_model: Path) -> Reference:
    return Reference(demo_model)


def test_health_and_models(server: Server, loaded: dict[str, Path]) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    cards = {m.id: m for m in server.client().models.list().data}  # type: ignore[attr-defined]
    assert set(cards) == {"tiny", "plain", "ad-a", "ad-b"}
    assert (cards["tiny"].root, cards["tiny"].parent) == ("tiny", None)  # type: ignore[attr-defined]
    assert (cards["ad-b"].root, cards["ad-b"].parent) == ("tiny", "tiny")  # type: ignore[attr-defined]


def test_greedy_equals_transformers_and_peft(server: Server, loaded: dict[str, Path], reference: Reference) -> None:
    client: Any = server.client()
    texts = {}
    for name, adapter in (("tiny", None), ("ad-a", loaded["a"]), ("ad-b", loaded["b"])):
        out = client.completions.create(model=name, prompt=PROMPT, max_tokens=24, temperature=0)
        expected = reference.greedy(adapter, reference.prompt_ids(PROMPT), 24)
        assert out.choices[0].text == expected, name
        assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == name
        assert out.usage.prompt_tokens == len(reference.prompt_ids(PROMPT))
        chat = client.chat.completions.create(model=name, messages=CHAT, max_tokens=24, temperature=0)
        assert chat.choices[0].message.content == reference.greedy(adapter, reference.chat_ids(CHAT), 24), name
        assert chat.id.startswith("chatcmpl-") and chat.choices[0].message.role == "assistant"
        texts[name] = out.choices[0].text
    assert len(set(texts.values())) == 3, "each adapter must change the output"


def test_streaming_with_usage(server: Server, loaded: dict[str, Path]) -> None:
    client: Any = server.client()
    whole = client.chat.completions.create(model="ad-a", messages=CHAT, max_tokens=20, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="ad-a",
            messages=CHAT,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert len({c.id for c in chunks}) == 1

    plain = client.completions.create(model="ad-b", prompt=PROMPT, max_tokens=20, temperature=0)
    streamed = list(
        client.completions.create(
            model="ad-b",
            prompt=PROMPT,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == plain.choices[0].text
    assert streamed[-1].usage.completion_tokens == plain.usage.completion_tokens
    with server.http() as http:  # the wire format itself: data lines, then [DONE]
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "stream": True})
        lines = [line for line in r.text.splitlines() if line]
        assert r.headers["content-type"].startswith("text/event-stream")
        assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_seeded_sampling_stop_and_length(server: Server, loaded: dict[str, Path]) -> None:
    client: Any = server.client()

    def sample(seed: int) -> str:
        out = client.completions.create(
            model="ad-a", prompt=PROMPT, max_tokens=30, temperature=1.0, top_p=0.9, seed=seed
        )
        return str(out.choices[0].text)

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1
    full = client.completions.create(model="ad-b", prompt=PROMPT, max_tokens=30, temperature=0)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 30
    text = full.choices[0].text
    stop = text[10:13]
    cut = client.completions.create(model="ad-b", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "\u2603"])
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="ad-b", prompt=PROMPT, max_tokens=30, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def _error(call: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value.status_code, info.value.response.json()["error"]


def test_errors_name_the_param(server: Server, loaded: dict[str, Path]) -> None:
    client: Any = server.client()
    chat = client.chat.completions.create
    cases = [
        (lambda: chat(model="tiny", messages=CHAT, temperature=3), 400, "temperature"),
        (lambda: chat(model="tiny", messages=CHAT, n=2), 400, "n"),
        (lambda: chat(model="tiny", messages=CHAT, top_p=1.5), 400, "top_p"),
        (lambda: chat(model="tiny", messages=CHAT, stop=["a", "b", "c", "d", "e"]), 400, "stop"),
        (lambda: chat(model="tiny", messages=CHAT, max_tokens=0), 400, "max_tokens"),
        (
            lambda: chat(model="tiny", messages=CHAT, tools=[{"type": "function", "function": {"name": "f"}}]),
            400,
            "tools",
        ),
        (lambda: chat(model="tiny", messages=CHAT, extra_body={"repetition_penalty": 1.2}), 400, "repetition_penalty"),
        (lambda: chat(model="tiny", messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role"),
        (lambda: client.completions.create(model="tiny", prompt=PROMPT, echo=True), 400, "echo"),
        (lambda: chat(model="plain", messages=CHAT), 400, "messages"),
    ]
    for call, status, param in cases:
        got_status, error = _error(call)
        assert (got_status, error["param"], error["type"]) == (status, param, "invalid_request_error"), error
    status, error = _error(lambda: chat(model="nope", messages=CHAT))
    assert (status, error["code"], error["param"]) == (404, "model_not_found", "model")
    status, error = _error(lambda: chat(model="tiny", messages=CHAT, max_tokens=9000))
    assert (status, error["code"], error["param"]) == (400, "context_length_exceeded", "messages")
    assert error["message"].startswith("This model's maximum context length is 8192 tokens. However, you requested")
    assert "in the messages, 9000 in the completion" in error["message"]
    status, error = _error(lambda: client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8190))
    assert (status, error["code"], error["param"]) == (400, "context_length_exceeded", "prompt")
    assert "chat template" in _error(lambda: chat(model="plain", messages=CHAT))[1]["message"]
    # harmless values the SDK or clients send are accepted; the plain model still completes
    ok = client.completions.create(model="plain", prompt=PROMPT, max_tokens=3, user="u", n=1, presence_penalty=0)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_adapter_loading_rules(server: Server, loaded: dict[str, Path]) -> None:
    from service.record.storage import LocalStorage

    prefix = f"tenants/{TENANT}/jobs/{JOB}/checkpoints/step-000002"  # a checkpoint: the adapter in adapter/
    storage = LocalStorage(server.data_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        storage.put_file(f"{prefix}/adapter/{name}", loaded["a"] / name)
    storage.put_bytes(f"{prefix}/optimizer.pt", b"not fetched")
    with server.http() as http:
        same = http.post("/v1/load_lora_adapter", json={"lora_name": "ad-a", "lora_path": str(loaded["a"])})
        assert same.status_code == 200  # idempotent
        other = http.post("/v1/load_lora_adapter", json={"lora_name": "ad-a", "lora_path": str(loaded["b"])})
        assert other.status_code == 400 and other.json()["error"]["param"] == "lora_name"
        for body, param in (
            ({"lora_name": "x", "lora_path": "/no/such/dir"}, "lora_path"),
            ({"lora_name": "x", "lora_path": "seco-storage:dir:tenants/none/here"}, "lora_path"),
            ({"lora_name": "x", "lora_path": "seco-storage:dir:../etc"}, "lora_path"),
            ({"lora_name": "tiny", "lora_path": str(loaded["a"])}, "lora_name"),
            ({"lora_name": "x", "lora_path": str(loaded["a"]), "rank": 4}, "rank"),
        ):
            r = http.post("/v1/load_lora_adapter", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        r = http.post(
            "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(loaded["a"]), "base_model": "zz"}
        )
        assert r.status_code == 404 and r.json()["error"]["param"] == "base_model"
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "ckpt", "lora_path": f"seco-storage:dir:{prefix}"})
        assert r.status_code == 200, r.text
    client: Any = server.client()
    a = client.completions.create(model="ad-a", prompt=PROMPT, max_tokens=12, temperature=0)
    ck = client.completions.create(model="ckpt", prompt=PROMPT, max_tokens=12, temperature=0)
    assert ck.choices[0].text == a.choices[0].text  # the same adapter files, fetched from storage
    with server.http() as http:
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "ckpt"}).status_code == 200
        gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "ckpt"})
        assert gone.status_code == 404 and gone.json()["error"]["param"] == "lora_name"
    assert _error(lambda: client.completions.create(model="ckpt", prompt=PROMPT))[1]["code"] == "model_not_found"


def test_two_adapters_interleaved(server: Server, loaded: dict[str, Path]) -> None:
    """Concurrent streams of two adapters and the base: each gets exactly what it gets alone, and they overlap."""
    client: Any = server.client()
    asks = {
        "ad-a": dict(temperature=0),
        "ad-b": dict(temperature=1.0, seed=11),  # seeded sampling too: its own generator
        "tiny": dict(temperature=0),  # the base between them: adapter layers off for its steps
    }
    alone = {
        name: client.completions.create(model=name, prompt=PROMPT, max_tokens=120, **kw).choices[0].text
        for name, kw in asks.items()
    }
    times: dict[str, list[float]] = {}
    texts: dict[str, str] = {}
    barrier = threading.Barrier(len(asks))

    def run(name: str) -> None:
        barrier.wait()
        stream = client.completions.create(model=name, prompt=PROMPT, max_tokens=120, stream=True, **asks[name])
        parts = []
        for c in stream:
            times.setdefault(name, []).append(time.monotonic())
            parts.append(c.choices[0].text)
        texts[name] = "".join(parts)

    threads = [threading.Thread(target=run, args=(n,)) for n in asks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert texts == alone
    for x, y in (("ad-a", "ad-b"), ("ad-a", "tiny"), ("ad-b", "tiny")):
        a, b = times[x], times[y]
        assert a[0] < b[-1] and b[0] < a[-1], f"{x} and {y} did not run at the same time"


LONG = {"prompt": PROMPT, "temperature": 0, "max_tokens": 1500}
"""A generation that runs to max_tokens (checked by `long_running`): the disconnect tests stop it early."""


@pytest.fixture(scope="module")
def long_running(server: Server, loaded: dict[str, Path]) -> str:
    """An adapter whose greedy generation of LONG does not end by itself (greedy is deterministic)."""
    for model in ("ad-a", "ad-b", "tiny"):
        r = httpx.post(server.url + "/v1/completions", json={"model": model, **LONG}, timeout=300)
        if r.json()["choices"][0]["finish_reason"] == "length":
            return model
    pytest.fail("every model ends its greedy generation early: the disconnect tests need one that does not")


def stopped_since(server: Server, before: dict[str, Any]) -> dict[str, Any]:
    """The server's counters once a generation was cancelled after `before` and none runs."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = server.stats()
        if now["cancelled"] > before["cancelled"] and now["running"] == 0:
            return now
        time.sleep(0.1)
    pytest.fail(f"generation still running after the client left: {server.stats()}")


def test_client_disconnect_stops_generation(server: Server, long_running: str) -> None:
    before = server.stats()
    with (
        server.http() as http,
        http.stream("POST", "/v1/completions", json={"model": long_running, **LONG, "stream": True}) as r,
    ):
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
    now = stopped_since(server, before)
    time.sleep(1.0)
    later = server.stats()
    assert later["tokens_generated"] == now["tokens_generated"], "tokens still generated after cancellation"
    assert now["tokens_generated"] - before["tokens_generated"] < 0.8 * LONG["max_tokens"]


def test_lru_evicts_and_reloads(demo_model: Path, adapter_dirs: dict[str, Path], tmp_path: Path) -> None:
    srv = start_server(demo_model, tmp_path, SECO_SERVE_MAX_ADAPTERS="1")
    try:
        client: Any = srv.client()
        with srv.http() as http:
            for name in ("a", "b"):
                r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapter_dirs[name])})
                assert r.status_code == 200, r.text
        assert "evicting adapter a" in srv.logs()
        first = client.completions.create(model="a", prompt=PROMPT, max_tokens=12, temperature=0)  # reloaded
        assert "evicting adapter b" in srv.logs()
        second = client.completions.create(model="b", prompt=PROMPT, max_tokens=12, temperature=0)
        again = client.completions.create(model="a", prompt=PROMPT, max_tokens=12, temperature=0)
        assert first.choices[0].text == again.choices[0].text != second.choices[0].text
    finally:
        stop_server(srv)


def test_memory_share_refuses_what_does_not_fit(
    demo_model: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """SECO_SERVE_MEMORY_BYTES: two base models' weights and adapter a fit, the larger adapter b does not."""
    import torch
    from transformers import AutoModelForCausalLM

    weights = sum(
        p.numel() * p.element_size()
        for p in AutoModelForCausalLM.from_pretrained(str(demo_model), dtype=torch.float32).parameters()
    )
    size = {n: (d / "adapter_model.safetensors").stat().st_size for n, d in adapter_dirs.items()}
    assert size["b"] > size["a"]
    srv = start_server(demo_model, tmp_path, SECO_SERVE_MEMORY_BYTES=str(2 * weights + size["a"] + 16))
    try:
        with srv.http() as http:
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(adapter_dirs["b"])})
            assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_memory", r.text
            assert "SECO_SERVE_MEMORY_BYTES" in r.json()["error"]["message"]
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(adapter_dirs["a"])})
            assert r.status_code == 200, r.text
            assert (
                http.post("/v1/completions", json={"model": "a", "prompt": PROMPT, "max_tokens": 2}).status_code == 200
            )
            assert http.post("/v1/completions", json={"model": "b", "prompt": PROMPT}).status_code == 404
    finally:
        stop_server(srv)


def test_non_streamed_client_disconnect_stops_generation(server: Server, long_running: str) -> None:
    before = server.stats()
    body = {"model": long_running, **LONG}
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=server.url, timeout=0.5) as http:
        http.post("/v1/completions", json=body)  # the client gives up and closes the connection
    now = stopped_since(server, before)
    assert now["tokens_generated"] - before["tokens_generated"] < 0.8 * LONG["max_tokens"]


def test_unload_during_a_request_lets_it_finish(server: Server, loaded: dict[str, Path]) -> None:
    client: Any = server.client()
    with server.http() as http:
        assert (
            http.post("/v1/load_lora_adapter", json={"lora_name": "tmp", "lora_path": str(loaded["b"])}).status_code
            == 200
        )
    alone = client.completions.create(model="tmp", prompt=PROMPT, max_tokens=150, temperature=0).choices[0].text
    stream = client.completions.create(model="tmp", prompt=PROMPT, max_tokens=150, temperature=0, stream=True)
    parts = [next(stream).choices[0].text]
    with server.http() as http:
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "tmp"}).status_code == 200
    parts += [c.choices[0].text for c in stream]
    assert "".join(parts) == alone  # its weights stayed until it ended
    assert "tmp" not in {m.id for m in client.models.list().data}
    assert _error(lambda: client.completions.create(model="tmp", prompt=PROMPT))[0] == 404


def test_request_shapes_refused_by_name(server: Server, loaded: dict[str, Path]) -> None:
    with server.http() as http:
        cases = [
            ({"model": "tiny", "messages": CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
            ({"model": "tiny", "messages": CHAT, "max_tokens": 3, "max_completion_tokens": 3}, "max_tokens"),
            ({"model": "tiny", "messages": CHAT, "seed": "7"}, "seed"),
            ({"model": "tiny", "messages": []}, "messages"),
            ({"messages": CHAT}, "model"),
            (
                {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                "messages[0].content",
            ),
        ]
        for body, param in cases:
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        for body, param in (
            ({"model": "tiny", "prompt": ["a", "b"]}, "prompt"),
            ({"model": "tiny", "prompt": PROMPT, "logprobs": 2}, "logprobs"),
            ({"model": "tiny", "prompt": [1, 2, 99999]}, "prompt"),
        ):
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        bad = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
        ids = http.post(
            "/v1/completions", json={"model": "tiny", "prompt": [72, 105], "max_tokens": 2, "temperature": 0}
        )
        assert ids.status_code == 200 and ids.json()["usage"]["prompt_tokens"] == 2
        parts = {
            "role": "user",
            "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story."}],
        }
        one = http.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": [parts], "max_tokens": 5, "temperature": 0}
        )
        two = http.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": [CHAT[1]], "max_tokens": 5, "temperature": 0}
        )
        assert one.json()["choices"][0]["message"] == two.json()["choices"][0]["message"]


def test_adapter_from_object_storage(
    demo_model: Path, adapter_dirs: dict[str, Path], tmp_path: Path, s3_server: Any
) -> None:
    """SECO_STORAGE_URL=s3://...: the process fetches the archive and a directory from the object store."""
    from seco_core.lora import pack_adapter
    from service.record.settings import Settings
    from service.record.storage import open_storage

    url = s3_server.new_url("serve")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env().items():
            mp.setenv(k, v)
        storage = open_storage(Settings(data_dir=tmp_path / "writer", storage_url=url))
        key = f"tenants/{TENANT}/jobs/{JOB}/adapter.tar.gz"
        storage.put_file(key, pack_adapter(adapter_dirs["a"], tmp_path / "a.tar.gz"))
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            storage.put_file(f"tenants/{TENANT}/jobs/{JOB}/b/{name}", adapter_dirs["b"] / name)
    srv = start_server(demo_model, tmp_path, SECO_STORAGE_URL=url, **s3_server.env())
    try:
        client: Any = srv.client()
        with srv.http() as http:
            for name, path in (("a", f"archive:{key}"), ("b", f"dir:tenants/{TENANT}/jobs/{JOB}/b")):
                r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "seco-storage:" + path})
                assert r.status_code == 200, r.text
            for name in ("a", "b"):
                r = http.post(
                    "/v1/load_lora_adapter", json={"lora_name": f"local-{name}", "lora_path": str(adapter_dirs[name])}
                )
                assert r.status_code == 200, r.text
        for name in ("a", "b"):
            stored = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
            local = client.completions.create(model=f"local-{name}", prompt=PROMPT, max_tokens=12, temperature=0)
            assert stored.choices[0].text == local.choices[0].text
    finally:
        stop_server(srv)
