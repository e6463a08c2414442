"""The model thread and the adapter LRU in this process (the HTTP path is test_serve.py)."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest
import torch

from seco_core.generate import SamplingParams
from service.inference.engine import Engine, Job, Update
from service.inference.errors import OpenAIError
from service.inference.models import KnownAdapter, MemoryShare, ServedModel


@pytest.fixture
def served(demo_model: Path) -> ServedModel:
    return ServedModel("tiny", demo_model, torch.device("cpu"), max_adapters=1, memory=MemoryShare(None))


def _adapter(name: str, path: Path) -> KnownAdapter:
    return KnownAdapter(name, str(path), path, "tiny")


def test_lru_evicts_the_idle_and_refuses_when_all_are_busy(served: ServedModel, adapter_dirs: dict[str, Path]) -> None:
    a, b = _adapter("a", adapter_dirs["a"]), _adapter("b", adapter_dirs["b"])
    served.ensure_loaded(a, busy=set())
    served.ensure_loaded(b, busy=set())
    assert list(served.loaded) == ["b"]
    with pytest.raises(OpenAIError) as info:
        served.ensure_loaded(a, busy={"b"})
    assert (info.value.status, info.value.code) == (503, "adapter_slots_busy")
    served.remove("b")
    assert not served.loaded and served.model.__class__.__name__ == "LlamaForCausalLM"  # back to the plain base


def test_a_failing_request_ends_alone(served: ServedModel) -> None:
    engine = Engine(prefill_chunk=8)
    engine.start()
    try:
        updates: queue.Queue[Update] = queue.Queue()
        params = SamplingParams(max_tokens=3, temperature=0)
        vocab = len(served.tokenizer)
        engine.submit(Job(served, None, [1, vocab + 5], params, updates.put))  # an id beyond the embedding
        while (u := updates.get(timeout=30)).error is None:
            pass
        assert u.error.status == 500 and engine.alive
        engine.submit(Job(served, None, [72, 105], params, updates.put))
        while not (u := updates.get(timeout=30)).final:
            pass
        assert u.error is None and u.finish_reason in ("length", "stop") and u.prompt_tokens == 2
        assert engine.stats.started == 2 and engine.stats.finished == 1
    finally:
        engine.stop()
