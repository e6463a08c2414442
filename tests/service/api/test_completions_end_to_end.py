"""Using a tuned model through the whole service: the real API (uvicorn), Redis, a Celery worker
that trains one job on the demo model, and the real inference process (`seco serve`), driven
with the official `openai` SDK.

One module-scoped job (a high learning rate, so the adapter changes the greedy answer) serves
every test. The fine-tuned model's greedy answer must equal base + adapter computed here with
transformers + peft from the adapter downloaded at `GET /v1/fine_tuning/jobs/{id}/adapter`,
and differ from the base model's. Then: streaming with usage, `/v1/completions`, a checkpoint
name, tenant isolation, errors of the inference process passed on, the per-key limit, a client
that disconnects (the inference process's own counters, `GET /stats`, show its generations
cancelled), an inference process that restarts (the API loads the adapter again), the vLLM
engine's path (adapters unpacked into a directory the inference process reads), and a
deleted model (a 404, unloaded from the inference process, its unpacked copies removed).
Slow: a training job and three server processes on two shared cores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from service.api.lora_names import lora_name_of
from service.archives import safe_extract
from tests.conftest import Service, wait_for, without_chat_template

PROMPT = "the quick brown"
MESSAGES = [{"role": "user", "content": PROMPT}]
ANSWER_TOKENS = 12
DOC = "the quick brown fox jumps over the lazy dog. " * 6
LIMIT = 2  # SECO_MAX_GENERATIONS_PER_KEY here
LONG = 6000  # max_tokens of a greedy generation (the tuned model never ends it) still running when the test ends it


@dataclass
class Tuned:
    svc: Service
    job_id: str
    model: str
    checkpoint: str
    adapter_dir: Path


@pytest.fixture(scope="module")
def tuned(
    launch_service: Callable[..., Service],
    redis_url: str,
    demo_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Tuned]:
    tmp = tmp_path_factory.mktemp("serving")
    plain = without_chat_template(demo_model, tmp / "plain-model")
    svc = launch_service(
        redis_url,
        tmp,
        workers=1,
        inference=True,
        SECO_MODELS=f"tiny={demo_model},plain={plain}",
        SECO_MAX_GENERATIONS_PER_KEY=str(LIMIT),
        SECO_CHECKPOINT_EVERY="2",
    )
    client = svc.client()
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"text": DOC}) + "\n" for _ in range(4)))
    f = client.files.create(file=data.open("rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=f.id,
        hyperparameters={"n_epochs": 3, "learning_rate_multiplier": 50},
        extra_body={"seco": {"chunk_size": 64, "max_length": 256}},
    )
    done = wait_for(
        lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed", "cancelled") and j,
        300,
        what="the training job",
    )
    assert done.status == "succeeded", (done.error, svc.logs())
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints, "the job kept no checkpoint"
    archive = tmp / "adapter.tar.gz"
    with svc.http() as http:
        r = http.get(f"/v1/fine_tuning/jobs/{job.id}/adapter")
        assert r.status_code == 200, r.text
        archive.write_bytes(r.content)
    adapter_dir = tmp / "adapter"
    safe_extract(archive, adapter_dir)
    newest = checkpoints[0].fine_tuned_model_checkpoint  # newest first
    yield Tuned(svc, job.id, done.fine_tuned_model, newest, adapter_dir)
    svc.close()


@pytest.fixture(scope="module")
def reference(demo_model: Path, tuned: Tuned) -> Callable[..., str]:
    """Greedy text of the base model (adapter=False) or base + the downloaded adapter, in process."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    base = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    tuned_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32), str(tuned.adapter_dir)
    ).eval()

    def greedy(*, adapter: bool, chat: bool = True, max_tokens: int = ANSWER_TOKENS) -> str:
        text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) if chat else PROMPT
        ids = tok(str(text), add_special_tokens=False)["input_ids"]
        model = tuned_model if adapter else base
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([list(ids)]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=max_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        return str(tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True))

    return greedy


def _chat(client: Any, model: str, **kw: Any) -> Any:
    return client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=kw.pop("max_tokens", ANSWER_TOKENS), **kw
    )


def _stats(svc: Service) -> dict[str, int]:
    assert svc.inference_url is not None
    return dict(httpx.get(svc.inference_url + "/stats", timeout=10).json())


def _error(call: Callable[[], Any]) -> Any:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value


def test_the_fine_tuned_model_answers_as_base_plus_adapter_in_process(
    tuned: Tuned, reference: Callable[..., str]
) -> None:
    client = tuned.svc.client()
    tuned_answer = _chat(client, tuned.model)
    base_answer = _chat(client, "tiny")
    assert tuned_answer.model == tuned.model and base_answer.model == "tiny"
    assert tuned_answer.object == "chat.completion" and tuned_answer.id.startswith("chatcmpl-")
    choice = tuned_answer.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content == reference(adapter=True)
    assert base_answer.choices[0].message.content == reference(adapter=False)
    assert choice.message.content != base_answer.choices[0].message.content, "the adapter changed nothing"
    assert tuned_answer.usage.completion_tokens <= ANSWER_TOKENS
    assert tuned_answer.usage.total_tokens == tuned_answer.usage.prompt_tokens + tuned_answer.usage.completion_tokens


def test_a_stream_with_usage_carries_the_same_answer_under_the_callers_model_name(tuned: Tuned) -> None:
    client = tuned.svc.client()
    whole = _chat(client, tuned.model).choices[0].message.content
    chunks = list(_chat(client, tuned.model, stream=True, stream_options={"include_usage": True}))
    assert chunks and all(c.model == tuned.model and c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens >= 1


def test_text_completions_of_the_fine_tuned_model(tuned: Tuned, reference: Callable[..., str]) -> None:
    client = tuned.svc.client()
    out = client.completions.create(model=tuned.model, prompt=PROMPT, temperature=0, max_tokens=ANSWER_TOKENS)
    assert out.model == tuned.model and out.object == "text_completion"
    assert out.choices[0].text == reference(adapter=True, chat=False)
    streamed = list(
        client.completions.create(
            model=tuned.model, prompt=PROMPT, temperature=0, max_tokens=ANSWER_TOKENS, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text
    assert all(c.model == tuned.model for c in streamed)


def test_a_checkpoint_is_a_model_too(tuned: Tuned) -> None:
    client = tuned.svc.client()
    answer = _chat(client, tuned.checkpoint)
    assert answer.model == tuned.checkpoint and answer.choices[0].message.content is not None
    # the newest checkpoint of a succeeded job is its final state
    assert answer.choices[0].message.content == _chat(client, tuned.model).choices[0].message.content


def test_another_tenant_gets_404_for_the_fine_tuned_model_and_its_checkpoints(tuned: Tuned) -> None:
    other = tuned.svc.client("b")
    for name in (tuned.model, tuned.checkpoint):
        err = _error(lambda n=name: _chat(other, n))
        assert err.status_code == 404 and err.body["code"] == "model_not_found", err.body
        assert err.body["param"] == "model"
        err = _error(lambda n=name: other.completions.create(model=n, prompt="x", max_tokens=2))
        assert err.status_code == 404 and err.body["code"] == "model_not_found", err.body
    assert _chat(other, "tiny").model == "tiny"  # the base models are everyone's


def test_errors_of_the_inference_process_are_passed_on(tuned: Tuned) -> None:
    client = tuned.svc.client()
    too_long = [{"role": "user", "content": "x" * 8200}]  # the demo model's context is 8192 tokens
    err = _error(lambda: client.chat.completions.create(model=tuned.model, messages=too_long, max_tokens=10))
    assert err.status_code == 400, err
    assert err.body["code"] == "context_length_exceeded" and err.body["param"] == "messages", err.body
    assert "maximum context length is 8192 tokens" in err.body["message"]
    assert lora_name_of(tuned.model) not in err.body["message"]


def test_a_base_model_without_a_chat_template_takes_prompts_only(tuned: Tuned) -> None:
    client = tuned.svc.client()
    err = _error(lambda: client.chat.completions.create(model="plain", messages=MESSAGES, max_tokens=2))
    assert err.status_code == 400 and err.body["code"] == "no_chat_template", err.body
    assert err.body["param"] == "messages" and "no chat template" in err.body["message"], err.body
    answer = client.completions.create(model="plain", prompt=PROMPT, max_tokens=3, temperature=0)
    assert answer.model == "plain" and answer.usage is not None and answer.usage.completion_tokens >= 1


def test_the_per_key_limit_and_a_client_that_disconnects(
    tuned: Tuned, launch_service: Callable[..., Service], redis_url: str, tmp_path: Path
) -> None:
    """Beyond SECO_MAX_GENERATIONS_PER_KEY a 429 with Retry-After, from every API process;
    closing the streams stops their generations in the inference process and gives the slots back."""
    svc = tuned.svc
    second_api = launch_service(  # another API process on the same Redis and data
        redis_url, tmp_path, SECO_MAX_GENERATIONS_PER_KEY=str(LIMIT), SECO_DATA_DIR=str(svc.data_dir)
    )
    before = _stats(svc)
    body = {"model": tuned.model, "messages": MESSAGES, "max_tokens": LONG, "stream": True, "temperature": 0}
    with svc.http() as http, svc.http("b") as other:
        streams = [http.stream("POST", "/v1/chat/completions", json=body, timeout=60) for _ in range(LIMIT)]
        opened = [s.__enter__() for s in streams]
        try:
            assert [resp.status_code for resp in opened] == [200] * LIMIT
            readers = [resp.iter_lines() for resp in opened]  # kept: a dropped reader closes its stream
            for lines in readers:
                assert next(line for line in lines if line.startswith("data:"))  # generating
            refused = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
            assert refused.status_code == 429, refused.text
            err = refused.json()["error"]
            assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests", err
            assert int(refused.headers["retry-after"]) >= 1
            with second_api.http() as elsewhere:  # the count is the key's, across API processes
                assert elsewhere.post("/v1/completions", json={"model": tuned.model, "prompt": "a"}).status_code == 429
            ok = other.post("/v1/chat/completions", json={**body, "model": "tiny", "stream": False, "max_tokens": 2})
            assert ok.status_code == 200, ok.text  # another key has its own slots
            assert _stats(svc)["running"] == LIMIT
        finally:
            for s in streams:
                s.__exit__(None, None, None)
        # the inference process cancels both generations, long before their LONG tokens
        stats = wait_for(lambda: (st := _stats(svc))["running"] == 0 and st, 30, what="the generations to stop")
        assert stats["cancelled"] - before["cancelled"] >= LIMIT, (before, stats)
        time.sleep(1)
        assert _stats(svc)["tokens_generated"] == stats["tokens_generated"], "still generating"
        assert stats["tokens_generated"] - before["tokens_generated"] < LIMIT * LONG
        # the slots came back with the disconnects
        again = wait_for(
            lambda: (
                (
                    r := http.post("/v1/completions", json={"model": tuned.model, "prompt": "a", "max_tokens": 2})
                ).status_code
                != 429
                and r
            ),
            10,
            what="the slots to be given back",
        )
        assert again.status_code == 200, again.text
    second_api.close()


def test_a_client_that_leaves_before_a_whole_answer_stops_it_too(tuned: Tuned) -> None:
    svc = tuned.svc
    before = _stats(svc)
    body = {"model": tuned.model, "prompt": PROMPT, "max_tokens": LONG, "temperature": 0}
    with svc.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body, timeout=2)  # gives up and closes the connection
    api_log = svc.log_dir / "api.log"
    wait_for(lambda: "client disconnected while its completion" in api_log.read_text(), 10, what="the API to notice")
    stats = wait_for(lambda: (st := _stats(svc))["running"] == 0 and st, 15, what="the generation to stop")
    assert stats["cancelled"] > before["cancelled"], (before, stats)
    assert stats["tokens_generated"] - before["tokens_generated"] < LONG


def test_an_inference_process_that_restarts_gets_the_adapter_again(tuned: Tuned) -> None:
    svc, client = tuned.svc, tuned.svc.client()
    expected = _chat(client, tuned.model).choices[0].message.content
    svc.stop_inference()
    err = _error(lambda: _chat(client, tuned.model))
    assert err.status_code == 503 and err.body["code"] == "inference_unavailable", err.body
    assert int(err.response.headers["retry-after"]) >= 1
    svc.start_inference()
    # the API still believes the adapter loaded: the new process's 404 makes it load it again
    assert _chat(client, tuned.model).choices[0].message.content == expected


def test_the_vllm_engine_path_unpacks_adapters_into_the_shared_data_dir(
    tuned: Tuned, launch_service: Callable[..., Service], redis_url: str, tmp_path: Path
) -> None:
    """SECO_INFERENCE_ENGINE=vllm: the API sends a local directory, as a vLLM server needs, which
    `seco serve` also takes: same answers, from the unpacked archive and checkpoint directory."""
    expected = _chat(tuned.svc.client(), tuned.model).choices[0].message.content
    vllm_side = launch_service(
        redis_url, tmp_path, inference=True, SECO_INFERENCE_ENGINE="vllm", SECO_DATA_DIR=str(tuned.svc.data_dir)
    )
    try:
        client = vllm_side.client()
        assert _chat(client, tuned.model).choices[0].message.content == expected
        assert _chat(client, tuned.checkpoint).choices[0].message.content == expected
        for name in (tuned.model, tuned.checkpoint):
            unpacked = tuned.svc.data_dir / "serving" / lora_name_of(name)
            assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in unpacked.iterdir()}
        assert vllm_side.inference_url is not None
        served = {m["id"] for m in httpx.get(vllm_side.inference_url + "/v1/models", timeout=10).json()["data"]}
        assert {lora_name_of(tuned.model), lora_name_of(tuned.checkpoint)} <= served
    finally:
        vllm_side.close()


def test_a_deleted_model_is_a_404_and_serving_keeps_nothing_of_it(tuned: Tuned) -> None:
    svc, client = tuned.svc, tuned.svc.client()
    lora_names = {lora_name_of(tuned.model), lora_name_of(tuned.checkpoint)}
    assert svc.inference_url is not None
    served = lambda: {m["id"] for m in httpx.get(svc.inference_url + "/v1/models", timeout=10).json()["data"]}  # noqa: E731
    for name in (tuned.model, tuned.checkpoint):
        _chat(client, name, max_tokens=1)  # both loaded, whatever ran before
    assert lora_names <= served()
    assert client.models.delete(tuned.model).deleted
    for name in (tuned.model, tuned.checkpoint):
        err = _error(lambda n=name: _chat(client, n))
        assert err.status_code == 404 and err.body["code"] == "model_not_found", err.body
    # unloaded from the inference process, and the copies unpacked for the vLLM engine removed
    wait_for(lambda: not lora_names & served(), 10, what="the adapters to be unloaded")
    assert not [n for n in lora_names if (svc.data_dir / "serving" / n).exists()]
