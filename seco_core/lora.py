"""LoRA helpers: attach adapters to a causal LM, save, load and pack them in PEFT format.

The default targets are the model's attention projections (the LoRA paper's choice,
and the layers whose K/V the SeCO relay flows through). They are found from the module
tree rather than a per-architecture table, so a new architecture works if its
projections are linear layers inside a module named or typed like attention.

Saving is atomic: files are written into a temporary sibling directory that is renamed
into place, so a reader (the API serving a download, a resumed job) never sees a
half-written adapter.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)

# Layers LoRA can wrap that count as "projections" (GPT-2 style models use Conv1D).
_PROJECTION_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


def architecture_name(model: nn.Module) -> str:
    """The name users know the model by (`config.architectures[0]`), else its class."""
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None)
    return architectures[0] if architectures else type(model).__name__


def _projections(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of every linear layer (LoRA-wrappable projection)."""
    for name, module in model.named_modules():
        if isinstance(module, _PROJECTION_TYPES):
            yield name, module


def _linear_leaf_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, _ in _projections(model)})


def _is_attention_child(model: nn.Module, name: str) -> bool:
    """True when `name`'s parent module is an attention block (by name or by class)."""
    if "." not in name:
        return False
    parent_name = name.rsplit(".", 1)[0]
    parent = model.get_submodule(parent_name)
    return bool(_ATTENTION.search(parent_name.rsplit(".", 1)[-1]) or _ATTENTION.search(type(parent).__name__))


def default_target_modules(model: nn.Module) -> list[str] | str:
    """The attention projections of `model`, as PEFT `target_modules`.

    Usually a list of leaf names (["q_proj", "k_proj", "v_proj", "o_proj"] for Llama,
    ["o_proj", "qkv_proj"] for Phi-3, ["dense", "query_key_value"] for GPT-NeoX). When a
    leaf name is also used outside attention (GPT-2's `c_proj` is in both attention and
    MLP), a regex restricted to the attention modules is returned instead, because PEFT
    matches list entries by suffix and would wrap the MLP too.
    """
    names = [name for name, _ in _projections(model)]
    attention = [name for name in names if _is_attention_child(model, name)]
    if not attention:
        raise ValueError(
            f"cannot find the attention projections of {architecture_name(model)}: no linear layer "
            f"sits inside an attention module; pass target_modules explicitly, choosing from the "
            f"linear layers {_linear_leaf_names(model)}"
        )
    leaves = sorted({name.rsplit(".", 1)[-1] for name in attention})
    chosen = set(attention)
    outside = {name.rsplit(".", 1)[-1] for name in names if name not in chosen}
    if outside.isdisjoint(leaves):
        return leaves
    # Compact form "(.*\.)?(attn)\.(c_attn|c_proj)" when it selects exactly the same layers.
    parents = sorted({name.rsplit(".", 2)[-2] for name in attention})
    pattern = rf"(.*\.)?({'|'.join(map(re.escape, parents))})\.({'|'.join(map(re.escape, leaves))})"
    if {name for name in names if re.fullmatch(pattern, name)} == chosen:
        return pattern
    return "|".join(re.escape(name) for name in sorted(attention))


def _check_targets(model: nn.Module, target_modules: list[str] | str) -> None:
    """Refuse targets that wrap nothing: PEFT would silently skip a misspelt list entry."""
    names = [name for name, _ in _projections(model)]
    if isinstance(target_modules, str):
        if target_modules == "all-linear" or any(re.fullmatch(target_modules, n) for n in names):
            return
        unmatched = [target_modules]
    else:
        unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ValueError(
            f"target_modules {unmatched} match no linear layer of {architecture_name(model)}; "
            f"its linear layers are {_linear_leaf_names(model)}"
        )


def attach_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    target_modules: Sequence[str] | str | None = None,
) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter named "default"; base weights are frozen.

    `target_modules=None` picks the attention projections (`default_target_modules`).
    Note that `dropout > 0` draws different masks in SeCO's no-grad pass and its
    recomputation, so only `dropout=0` keeps SeCO's gradients exact.
    """
    if isinstance(model, PeftModel):
        raise ValueError("model already has PEFT adapters; attach LoRA to the base model")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA r must be a positive integer, got {r!r}")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    targets = default_target_modules(model) if target_modules is None else target_modules
    if not isinstance(targets, str):
        targets = list(targets)
        if not targets:
            raise ValueError("target_modules must not be empty (use None for the attention projections)")
    _check_targets(model, targets)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft hints int; it only divides by r (scaling), so 0.5 works
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _temporary_sibling(path: Path) -> Path:
    """A unique name in the same directory, so the final rename stays on one filesystem."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")


def _replace_directory(source: Path, target: Path) -> None:
    """Move the complete `source` directory to `target`, replacing an existing one.

    POSIX cannot rename a directory over a non-empty one, so an existing target is
    first renamed aside: readers see the old adapter, briefly nothing, then the new
    one, never a mixture.
    """
    old = None
    if target.exists():
        old = _temporary_sibling(target)
        target.rename(old)
    source.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_adapter(model: PeftModel, directory: str | os.PathLike[str], base_model_name: str) -> Path:
    """Write the active adapter as `adapter_config.json` + `adapter_model.safetensors`.

    `base_model_name` (the registry name, not a server path) is recorded as the config's
    `base_model_name_or_path`, so the file says which model it adapts without leaking
    where that model lives. Only the two PEFT files are kept (no model card).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    adapter = model.active_adapter
    config = model.peft_config[adapter]
    tmp = _temporary_sibling(directory)
    previous_name = config.base_model_name_or_path
    config.base_model_name_or_path = base_model_name
    try:
        model.save_pretrained(
            str(tmp), selected_adapters=[adapter], safe_serialization=True, save_embedding_layers=False
        )
        written = tmp if adapter == "default" else tmp / adapter  # PEFT nests non-default adapters
        final = _temporary_sibling(directory)
        final.mkdir()
        for name in ADAPTER_FILES:
            (written / name).replace(final / name)
        _replace_directory(final, directory)
    finally:
        config.base_model_name_or_path = previous_name
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_adapter(base_model: nn.Module, directory: str | os.PathLike[str], *, is_trainable: bool = False) -> PeftModel:
    """`PeftModel.from_pretrained` on a directory written by `save_adapter` (or extracted from a pack)."""
    return PeftModel.from_pretrained(base_model, str(directory), is_trainable=is_trainable)


def pack_adapter(directory: str | os.PathLike[str], archive_path: str | os.PathLike[str]) -> Path:
    """Pack an adapter directory as a .tar.gz whose root holds the two PEFT files.

    No leading directory, so `tar xzf` into any folder gives a directory that
    `PeftModel.from_pretrained` loads. Written under a temporary name and renamed, so a
    download never serves a partial archive.
    """
    directory = Path(directory)
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is not an adapter directory: missing {missing}")
    return pack_files(directory, ADAPTER_FILES, archive_path)


def pack_files(directory: str | os.PathLike[str], names: Iterable[str], archive_path: str | os.PathLike[str]) -> Path:
    """Pack the files `names` of `directory` as a .tar.gz with them at its root (no leading
    directory, server user names dropped), written under a temporary name and renamed: a
    reader never finds a partial archive. An adapter's pack, and a merged model's."""
    directory, archive_path = Path(directory), Path(archive_path)
    archive_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(archive_path)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for name in names:
                tar.add(directory / name, arcname=name, filter=_anonymise)
        tmp.replace(archive_path)
    finally:
        tmp.unlink(missing_ok=True)
    return archive_path


def _anonymise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Drop the server's user and group names from the archive."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
