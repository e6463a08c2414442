"""Training checkpoints: everything needed to resume a job exactly where it stopped.

A checkpoint directory `checkpoints/step-000012/` holds the LoRA adapter (PEFT format,
so a checkpoint is itself a usable adapter), the optimizer and scheduler state, the
RNG states and the position in the data, plus the metrics of the step. It is written
under a temporary name and renamed, so a worker killed mid-write leaves either the
previous checkpoint or a complete new one, never a half-written one that a resume
would load.

The state file holds tensors and plain containers only (AdamW's and LambdaLR's state
dicts, RNG byte tensors), so it is loaded with `weights_only=True`: a checkpoint comes
back from shared storage, and a full unpickler would run whatever code a file planted
there names. Anything else in it fails the job with `invalid_checkpoint`.

A checkpoint may be resumed on another host than the one that wrote it (any worker takes
the next attempt): the state file is loaded into CPU memory whatever device wrote it
(`optimizer.load_state_dict` then moves each moment to its parameter's device), and the
CUDA random states are restored for the devices this host has, the rest ignored.
"""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seco_core.lora import save_adapter
from worker.spec import TrainingError

STATE_FILE = "trainer_state.pt"
META_FILE = "checkpoint.json"


@dataclass
class Position:
    """Where training stands: the next optimizer step to run."""

    step: int  # optimizer steps completed
    epoch: int  # epoch of the next step (0-based)
    batch_in_epoch: int  # batches of that epoch already done
    trained_tokens: int


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def save_checkpoint(
    root: Path,
    model: nn.Module,
    base_model_name: str,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: Position,
    metrics: dict[str, Any],
) -> Path:
    """Write a complete checkpoint for `position.step` atomically; returns its directory."""
    final = checkpoint_dir(root, position.step)
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp / "adapter", base_model_name)  # type: ignore[arg-type]
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        tmp / STATE_FILE,
    )
    (tmp / META_FILE).write_text(json.dumps({"position": asdict(position), "metrics": metrics}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories are ignored)."""
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / META_FILE).is_file() and (p / STATE_FILE).is_file())
    return done[-1] if done else None


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[Position, dict[str, Any]]:
    """Restore LoRA weights, optimizer, scheduler and RNG states from `path`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
    try:
        # Tensors written on cuda:N would otherwise be restored to cuda:N, which this host may
        # not have (or not have free): CPU first, the optimizer places its state itself.
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise TrainingError(
            f"checkpoint {path.name} holds more than tensors and plain values; refusing to load it",
            code="invalid_checkpoint",
        ) from e
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_states(state["cpu_rng"], state["cuda_rng"])
    meta = json.loads((path / META_FILE).read_text())
    return Position(**meta["position"]), meta["metrics"]


def restore_rng_states(cpu_state: torch.Tensor, cuda_states: list[torch.Tensor] | None) -> int:
    """Restore the CPU random state and one saved CUDA state per device this host has.

    Why not `torch.cuda.set_rng_state_all`: it sets state i on device i for every saved
    state, and fails on a host with fewer devices than the one that wrote the checkpoint
    (a one-GPU container resuming a job first run on cuda:1). States beyond this host's
    devices are ignored, devices beyond the saved states keep theirs. Returns the number
    of CUDA states restored.
    """
    torch.set_rng_state(cpu_state)
    if not cuda_states or not torch.cuda.is_available():
        return 0
    restored = min(len(cuda_states), torch.cuda.device_count())
    for index in range(restored):
        torch.cuda.set_rng_state(cuda_states[index], index)
    return restored
