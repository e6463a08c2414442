"""A served base model: its weights, tokenizer, context length and its LoRA adapters in an LRU.

Adapters are loaded into one peft model per base (`PeftModel.load_adapter`, several side by
side), and the weights a request needs are picked before each of its model calls (`use`):
a named adapter, or the base alone with the adapter layers disabled. At most
`max_adapters` stay loaded; beyond that the least recently used one that no running
request holds is deleted from the model (it stays known, so a later request loads it
again from its directory). Everything that touches the model runs on the engine's model
thread (engine.py), never concurrently with a forward.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoTokenizer

from seco_core.generate import eos_ids_of
from seco_core.loading import load_causal_lm
from seco_core.prefill_attention import use_prefill_attention
from service.inference.errors import OpenAIError, invalid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownAdapter:
    """An adapter the process was asked to load: under which name, from where, for which base."""

    name: str
    lora_path: str
    local_dir: Path
    base: str

    @property
    def weight_bytes(self) -> int:
        """What its weights take once loaded: the size of its safetensors file (float32 there as in memory)."""
        return (self.local_dir / "adapter_model.safetensors").stat().st_size


class MemoryShare:
    """The memory `seco serve` may use (SECO_SERVE_MEMORY_BYTES): weights and adapters counted against it."""

    def __init__(self, limit_bytes: int | None) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0

    def fits(self, more: int) -> bool:
        return self.limit_bytes is None or self.used_bytes + more <= self.limit_bytes

    def refuse(self, what: str, more: int) -> OpenAIError:
        return OpenAIError(
            507,
            f"{what} needs {more} bytes but SECO_SERVE_MEMORY_BYTES={self.limit_bytes} leaves "
            f"{max(0, (self.limit_bytes or 0) - self.used_bytes)} (unload an adapter or raise the share)",
            code="insufficient_memory",
            type="server_error",
        )


def _dtype(device: torch.device) -> Any:
    """float32 on CPU (no fast half kernels there); the checkpoint's own dtype on an accelerator."""
    return torch.float32 if device.type == "cpu" else "auto"


class ServedModel:
    """One base model of SECO_MODELS, ready to generate, with its adapters."""

    def __init__(self, name: str, path: Path, device: torch.device, max_adapters: int, memory: MemoryShare) -> None:
        self.name = name
        self.device = device
        self.max_adapters = max_adapters
        self.memory = memory
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        base: Any = load_causal_lm(path, dtype=_dtype(device))
        base.to(device).eval()
        self.weights_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
        if not memory.fits(self.weights_bytes):
            raise RuntimeError(str(memory.refuse(f"base model {name}", self.weights_bytes)))
        memory.used_bytes += self.weights_bytes
        self.prefill_attention = use_prefill_attention(base)  # no chunk x prompt mask per layer call
        self.model: nn.Module = base
        self.context = int(getattr(base.config, "max_position_embeddings", 0) or 0) or None
        self.eos_token_ids = eos_ids_of(base, self.tokenizer.eos_token_id)
        self.loaded: OrderedDict[str, KnownAdapter] = OrderedDict()  # least recently used first
        self._current: str | None = None  # the adapter the model computes with now (None: the base)

    # ------------------------------------------------------------ text

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Messages rendered with the tokenizer's chat template, ready for the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise invalid(
                "messages",
                f"the tokenizer of {self.name} has no chat template: use /v1/completions with a prompt",
                code="no_chat_template",
            )
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(str(text), add_special_tokens=False)["input_ids"])

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            vocab = len(self.tokenizer)
            if max(prompt) >= vocab:
                raise invalid("prompt", f"token id {max(prompt)} is outside the vocabulary ({vocab} tokens)")
            return prompt
        return list(self.tokenizer(prompt)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    # ------------------------------------------------------------ adapters (model thread only)

    def use(self, adapter: str | None, *, force: bool = False) -> None:
        """Compute with `adapter` (loaded) or, for None, with the base weights alone.

        A no-op when that is already so, so switching costs only when requests alternate;
        `force` re-applies it after peft changed the active adapter (a load or a delete).
        """
        if adapter == self._current and not force:
            return
        if not isinstance(self.model, PeftModel):
            if adapter is not None:
                raise RuntimeError(f"adapter {adapter} is not loaded into {self.name}")
        elif adapter is None:
            tuner: Any = self.model.base_model
            tuner.disable_adapter_layers()
        else:
            tuner = self.model.base_model
            tuner.enable_adapter_layers()
            self.model.set_adapter(adapter)
        self._current = adapter

    def ensure_loaded(self, adapter: KnownAdapter, busy: set[str]) -> None:
        """Load `adapter` if it is not, evicting least recently used ones that no request holds."""
        if adapter.name in self.loaded:
            self.loaded.move_to_end(adapter.name)
            return
        size = adapter.weight_bytes
        while len(self.loaded) >= self.max_adapters or not self.memory.fits(size):
            victim = next((n for n in self.loaded if n not in busy), None)
            if victim is None:
                if len(self.loaded) >= self.max_adapters:
                    raise OpenAIError(
                        503,
                        f"all {self.max_adapters} adapter slots of {self.name} are in use by running requests "
                        "(SECO_SERVE_MAX_ADAPTERS); retry shortly",
                        code="adapter_slots_busy",
                        type="server_error",
                    )
                raise self.memory.refuse(f"adapter {adapter.name}", size)
            log.info("evicting adapter %s (least recently used)", victim)
            self.remove(victim)
        self._load(adapter)
        self.memory.used_bytes += size

    def _load(self, adapter: KnownAdapter) -> None:
        try:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(adapter.local_dir), adapter_name=adapter.name, is_trainable=False)
            else:
                self.model = PeftModel.from_pretrained(
                    self.model, str(adapter.local_dir), adapter_name=adapter.name, is_trainable=False
                )
                self.model.eval()
                self._current = adapter.name
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            raise invalid("lora_path", f"the adapter at {adapter.lora_path} does not fit {self.name}: {e}") from None
        self.loaded[adapter.name] = adapter
        self.use(self._current, force=True)  # peft may have switched the active adapter

    def remove(self, name: str) -> None:
        """Delete a loaded adapter from the model (it may be loaded again later)."""
        adapter = self.loaded.pop(name, None)
        if adapter is None:
            return
        self.memory.used_bytes -= adapter.weight_bytes
        assert isinstance(self.model, PeftModel)
        if not self.loaded:  # peft keeps no model without an adapter: back to the plain base
            self.model = self.model.unload()
            self._current = None
            return
        if self._current == name:
            self._current = None
        self.model.delete_adapter(name)
        self.use(self._current, force=True)
