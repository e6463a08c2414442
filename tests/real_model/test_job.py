"""A fine-tuning job on the real pretrained model, through the whole service on CPU.

The real API (uvicorn), Redis (valkey) and a Celery worker, as `seco up` runs them, with
SmolLM2-135M-Instruct registered under SECO_MODELS. The training file mixes long real
prose (several windows of max_length tokens each) and chat records, which the worker
renders with the model's own ChatML template. The answers of the chats share one house
style (a fixed frame around a short answer) that the base model does not use, so a working
adapter must lower the loss on held-out chats in that style; and it must not break the
model: it still knows the answer to a plain chat question.

That last check ranks candidate answers by their likelihood instead of reading the greedy
reply. Trained on the long prose too, the adapter moves the model's free replies towards the
prose's literary register ("L'Étoile de la Croix, the City of the Eagle, ..." for the capital
of France), with a first token that is a near tie (top probability about 5%); training is not
bit-reproducible run to run, so whether the greedy reply says Paris is chance (one CI run
said no where a local run had said yes). Whether the model still knows the answer is what the
ranking of whole answers measures, with a margin of nats.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import Service, flush_db, write_jsonl
from tests.real_model.conftest import paragraphs

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

MAX_LENGTH = 256
CHUNK = 64
FACTS = [
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("How many legs does a spider have?", "Eight"),
    ("What is the chemical symbol for gold?", "Au"),
    ("Who wrote Pride and Prejudice?", "Jane Austen"),
    ("What is the freezing point of water in degrees Celsius?", "Zero"),
    ("Which ocean lies between Africa and Australia?", "The Indian Ocean"),
    ("What is the capital of Canada?", "Ottawa"),
    ("How many days are there in a leap year?", "366"),
]
HELD_OUT = [
    ("What is the capital of Spain?", "Madrid"),
    ("How many sides does a hexagon have?", "Six"),
    ("Who wrote Moby-Dick?", "Herman Melville"),
]


def styled(answer: str) -> str:
    """The house style the adapter must learn: a frame no base model would guess."""
    return f"Verdict of the archive >> {answer} << filed under general knowledge."


def chat(question: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": styled(answer)}]}


@pytest.fixture(scope="module")
def svc(
    launch_service: Callable[..., Service],
    redis_url: str,
    real_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    flush_db(redis_url)
    s = launch_service(
        redis_url, tmp_path_factory.mktemp("real-job"), workers=1, SECO_MODELS=f"smollm2={real_model_dir}"
    )
    yield s
    s.close()


def test_a_job_on_the_real_model(svc: Service, real_model_dir: Path, tmp_path: Path, wait: Callable[..., Any]) -> None:
    prose = paragraphs()
    train_records = [{"text": "\n\n".join(prose[:5])}, {"text": "\n\n".join(prose[5:-1])}]
    train_records += [chat(q, a) for q, a in FACTS]
    valid_records = [chat(q, a) for q, a in HELD_OUT] + [{"text": prose[-1]}]
    train = write_jsonl(tmp_path / "train.jsonl", train_records)
    valid = write_jsonl(tmp_path / "valid.jsonl", valid_records)
    held_out = write_jsonl(tmp_path / "held_out_chats.jsonl", valid_records[: len(HELD_OUT)])
    client = svc.client(timeout=60)
    train_id = client.files.create(file=train.open("rb"), purpose="fine-tune").id
    valid_id = client.files.create(file=valid.open("rb"), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model="smollm2",
        training_file=train_id,
        validation_file=valid_id,
        suffix="real",
        hyperparameters={"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 5},
        extra_body={"seco": {"chunk_size": CHUNK, "max_length": MAX_LENGTH, "lora": {"r": 8, "alpha": 16}}},
    )

    done = wait(
        lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed", "cancelled") and j,
        timeout=900,
        interval=2,
        what="the job to end",
    )
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=200))
    assert done.status == "succeeded", f"{done.error}\n{[e.message for e in events]}\n{svc.logs()}"
    messages = [e.message for e in events]
    assert any(m.startswith("self-check passed") for m in messages), messages
    data = [e.data for e in events if isinstance(e.data, dict)]
    windows = next(d["windows"] for d in data if "windows" in d)
    assert windows > len(FACTS), "the long prose trains as several max_length windows beside the chats"

    metrics = [d for d in reversed(data) if "train_loss" in d]
    validated = [m for m in metrics if "valid_loss" in m]
    assert validated and all(0 < m["valid_loss"] < 20 for m in validated), metrics
    assert validated[-1]["valid_loss"] < validated[0]["valid_loss"]

    # the memory plan against what a step really took (RSS above the resident model and optimizer)
    memory = next(d for d in data if "step_peak_bytes" in d)
    ratio = memory["estimated_step_bytes"] / memory["step_peak_bytes"]
    assert 0.8 <= ratio <= 1.25, (ratio, memory)

    # the downloaded adapter: lower held-out loss than the base model, and still a sound chat model
    adapter_dir = tmp_path / "adapter"
    with tarfile.open(fileobj=io.BytesIO(client.files.content(done.model_extra["adapter_file"]).read())) as tar:
        tar.extractall(adapter_dir, filter="data")
    base_loss, tuned_loss, answer, ranked = held_out_with_adapter(real_model_dir, adapter_dir, held_out)
    first, last = validated[0]["valid_loss"], validated[-1]["valid_loss"]
    print(
        f"plan/step peak {ratio:.2f}, validation loss {first:.3f} -> {last:.3f}, "
        f"held-out chats {base_loss:.3f} -> {tuned_loss:.3f}, greedy answer {answer!r}, best answers {ranked}"
    )
    assert tuned_loss < 0.8 * base_loss, (base_loss, tuned_loss)
    assert answer, "the adapted model still replies"
    assert all(best == "Paris" and margin > 1.0 for best, margin in ranked.values()), ranked


CITIES = ["Paris", "Lyon", "Marseille", "Nice", "Rome", "Berlin", "Madrid", "London", "Brussels"]
QUESTION = "What is the capital of France?"
REPLIES = {"plain": "The capital of France is {}.", "house style": styled("{}")}


def best_answers(model: Any, tokenizer: Any) -> dict[str, tuple[str, float]]:
    """For each reply style, the city whose whole reply to QUESTION the model finds likeliest
    (summed log-probability of the reply's tokens after the chat prompt), and by how many nats
    it leads the runner-up."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    prompt = list(prompt if isinstance(prompt, list) else prompt["input_ids"])
    best: dict[str, tuple[str, float]] = {}
    for style, reply in REPLIES.items():
        scores: dict[str, float] = {}
        for city in CITIES:
            messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": reply.format(city)}]
            full = tokenizer.apply_chat_template(messages)
            full = list(full if isinstance(full, list) else full["input_ids"])
            assert full[: len(prompt)] == prompt, "the chat template renders the prompt as a prefix of the chat"
            ids = torch.tensor([full])
            with torch.no_grad():
                logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            targets = ids[0, 1:]
            scores[city] = logp[len(prompt) - 1 :].gather(1, targets[len(prompt) - 1 :, None]).sum().item()
        first, second = sorted(scores, key=scores.__getitem__, reverse=True)[:2]
        best[style] = (first, round(scores[first] - scores[second], 2))
    return best


def held_out_with_adapter(
    model_dir: Path, adapter_dir: Path, held_out: Path
) -> tuple[float, float, str, dict[str, tuple[str, float]]]:
    """(base held-out loss, adapted held-out loss, the adapted model's greedy answer to QUESTION,
    its best-ranked answers to QUESTION by reply style).

    The held-out chats are masked as the worker masks them (worker.data: loss on the
    assistant's answers only), the mean token loss taken over all their targets at once.
    """
    from peft import PeftModel

    from scripts.build_real_model import greedy_answer
    from worker.data import load_documents

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    chats = load_documents(held_out, tokenizer).documents
    assert len(chats) == len(HELD_OUT)

    def loss() -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for d in chats:
                ids = torch.tensor([d.input_ids])
                labels = torch.tensor([d.labels])
                logits = model(input_ids=ids).logits[0, :-1]
                total += F.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum").item()
                count += int((labels[0, 1:] != -100).sum())
        return total / count

    with model.disable_adapter():
        base_loss = loss()
    return base_loss, loss(), greedy_answer(model, tokenizer, QUESTION), best_answers(model, tokenizer)
