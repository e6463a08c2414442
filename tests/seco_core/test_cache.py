"""How attention finds the chunk cache: through the modules, on whichever thread runs it."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from torch import nn

from seco_core import ChunkConfig, chunked_backward
from seco_core.cache import CACHE_ATTRIBUTE
from seco_core.lora import attach_lora
from tests.seco_core.test_parity import REL_TOL, batch, max_rel_error, reference_grads
from tests.seco_core.tiny import tiny_model


def backward_on_another_thread(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Run every `Tensor.backward` on a fresh thread, as CUDA's autograd engine does.

    A new thread starts with an empty `contextvars` context, so a cache found through a
    context variable is invisible to a checkpointed layer recomputed inside backward.
    """
    original = torch.Tensor.backward
    threads: list[str] = []

    def threaded(self: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        errors: list[BaseException] = []

        def run() -> None:
            threads.append(threading.current_thread().name)
            try:
                original(self, *args, **kwargs)
            except BaseException as e:  # re-raised on the caller's thread
                errors.append(e)

        t = threading.Thread(target=run, name=f"autograd-{len(threads)}")
        t.start()
        t.join()
        if errors:
            raise errors[0]

    monkeypatch.setattr(torch.Tensor, "backward", threaded)
    return threads


@pytest.mark.parametrize("options", [{"layer_checkpointing": True}, {"layer_checkpointing": True, "offload_kv": True}])
@pytest.mark.usefixtures("float64_norms")
def test_recompute_in_backward_on_another_thread(monkeypatch: pytest.MonkeyPatch, options: dict[str, bool]) -> None:
    model = attach_lora(tiny_model("llama"), r=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    ids, labels = batch()
    _, ref = reference_grads(model, ids, labels)
    threads = backward_on_another_thread(monkeypatch)
    chunked_backward(model, ids, labels, ChunkConfig(chunk_size=8, **options))
    assert len(threads) == 6  # one backward per chunk (45 tokens in chunks of 8), each on its own thread
    assert max_rel_error(model, ref) < REL_TOL
    assert not [m for m in model.modules() if CACHE_ATTRIBUTE in m.__dict__]  # released afterwards
