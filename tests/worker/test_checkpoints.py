"""Resuming a checkpoint on another host than the one that wrote it (worker/checkpoints.py).

A CPU-only test machine cannot write CUDA tensors, so a GPU host's checkpoint is simulated
honestly at the two places that differ: the storage location torch.save records for every
tensor (patched to "cuda:1", so loading it as written needs a second GPU), and the CUDA
random states (two of them, as a two-GPU host saves). Resuming then runs with 0 or 1
simulated devices, whose `set_rng_state` rejects a device index they do not have, as
the real one does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.serialization
from transformers import AutoModelForCausalLM

from benchmarks.demo import build_demo_model
from seco_core.lora import attach_lora
from worker.checkpoints import Position, load_checkpoint, save_checkpoint

SAVED_CUDA_STATES = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("models") / "tiny")


def _training_state(model_dir: Path) -> tuple[Any, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A LoRA model with an optimizer that has taken one step (so it has moments to restore)."""
    torch.manual_seed(0)
    model = attach_lora(AutoModelForCausalLM.from_pretrained(model_dir), r=4, alpha=8, dropout=0.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ids = torch.arange(12).unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


@pytest.fixture
def gpu_checkpoint(tmp_path: Path, demo_model: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkpoint as a two-GPU host writes it for a job on cuda:1."""
    model, optimizer, scheduler = _training_state(demo_model)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:1")
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in SAVED_CUDA_STATES])
        return save_checkpoint(
            tmp_path / "checkpoints",
            model,
            "tiny",
            optimizer,
            scheduler,
            Position(step=1, epoch=0, batch_in_epoch=1, trained_tokens=12),
            {"step": 1},
        )


def _simulate_devices(monkeypatch: pytest.MonkeyPatch, count: int) -> dict[int, torch.Tensor]:
    """`count` CUDA devices whose RNG setter records what it is given and, like the real
    one, fails for an index the host does not have."""
    restored: dict[int, torch.Tensor] = {}

    def set_rng_state(state: torch.Tensor, device: int | str | torch.device = "cuda") -> None:
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index >= count:
            raise IndexError(f"no CUDA device {index} on this host ({count} devices)")
        restored[index] = state.clone()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)
    return restored


@pytest.mark.parametrize("devices", [0, 1])
def test_a_two_gpu_checkpoint_resumes_on_a_host_with_fewer_devices(
    gpu_checkpoint: Path, demo_model: Path, monkeypatch: pytest.MonkeyPatch, devices: int
) -> None:
    """Loaded to the CPU (it says cuda:1), its optimizer moments land on the parameters'
    device, the CPU state is restored, and only the CUDA states of existing devices are set."""
    # The same seeded step as the one that wrote the checkpoint: its moments are what must come back.
    _, optimizer, _ = _training_state(demo_model)
    expected = {k: v["exp_avg"].clone() for k, v in optimizer.state_dict()["state"].items()}
    fresh_model, fresh_optimizer, fresh_scheduler = _training_state(demo_model)
    for state in fresh_optimizer.state.values():
        state["exp_avg"].zero_()  # so a restore that did nothing is seen
    restored = _simulate_devices(monkeypatch, devices)
    cpu_state = torch.load(gpu_checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)["cpu_rng"]
    torch.manual_seed(1234)  # another CPU state than the saved one

    position, metrics = load_checkpoint(gpu_checkpoint, fresh_model, fresh_optimizer, fresh_scheduler)

    assert position.step == 1 and metrics == {"step": 1}
    assert torch.equal(torch.get_rng_state(), cpu_state)
    assert sorted(restored) == list(range(devices))
    for index, state in restored.items():
        assert torch.equal(state, SAVED_CUDA_STATES[index])
    moments = {k: v["exp_avg"] for k, v in fresh_optimizer.state_dict()["state"].items()}
    assert moments.keys() == expected.keys()
    for key, moment in moments.items():
        assert moment.device.type == "cpu" and torch.equal(moment, expected[key])
