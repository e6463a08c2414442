"""Text generation for serving: chunked prefill through the KV cache, then token-by-token decoding.

A long prompt is never run as one forward: its tokens go through the model `prefill_chunk`
at a time, each chunk appending its keys/values to a transformers `DynamicCache` (SeCO's
stage 1 without the loss), and only the last position's logits are computed
(`logits_to_keep=1`). So prefill never builds a prompt x prompt score matrix nor the
vocabulary x prompt logits of a plain forward; what grows with the prompt is the KV cache
(and the chunk x prompt attention mask of the model's own attention).

`Generation` is one request's state, advanced one model call at a time by `step()`, so a
server can interleave the steps of several requests (each with its own cache, sampling
generator and adapter) on one model thread and each gets exactly what it would alone.
`generate_tokens` runs one to the end. Sampling is temperature, nucleus (top-p) and a
per-request seeded `torch.Generator`; stops are end-of-sequence tokens, stop strings
(with a `decode` function: the stop text is cut and text that could still become a stop
string is held back) and the token budget. Torch only: tokenizers are passed in as
callables.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache

from seco_core.arch import CACHE_KEYWORDS, unwrap
from seco_core.errors import UnsupportedModelError

FinishReason = Literal["stop", "length"]
DEFAULT_PREFILL_CHUNK = 2048


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples; `temperature == 0` is greedy (argmax)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be between 0 and 1, got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


def model_cache_keyword(model: nn.Module) -> str:
    """The keyword the causal LM's forward takes its Cache under (`cache` or `past_key_values`).

    Read from the signature, as `seco_core.arch.cache_keyword` does for decoders: transformers
    5.17 knows only `past_key_values`, later releases `cache` (the old name deprecated), and
    an unknown keyword would be swallowed by `**kwargs` and the cache silently rebuilt.
    """
    parameters = inspect.signature(unwrap(model).forward).parameters
    for name in CACHE_KEYWORDS:
        if name in parameters:
            return name
    raise UnsupportedModelError(f"{type(unwrap(model)).__name__}: its forward takes no KV cache argument")


def _forward_last_logits(model: nn.Module, ids: torch.Tensor, cache: DynamicCache, keyword: str) -> torch.Tensor:
    """Run `ids` (1, n) through the model after what `cache` holds; the last position's logits (V,) in float32."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{keyword: cache})
    return out.logits[0, -1].float()


def chunked_prefill(
    model: nn.Module,
    input_ids: torch.Tensor,
    cache: DynamicCache,
    chunk_size: int = DEFAULT_PREFILL_CHUNK,
    *,
    keyword: str | None = None,
) -> torch.Tensor:
    """Feed the (1, L) prompt through the model chunk by chunk into `cache`; the next-token logits (V,).

    Equal, to float rounding, to the last row of a full forward's logits.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (1, L) with L >= 1, got {tuple(input_ids.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    keyword = keyword or model_cache_keyword(model)
    logits = torch.empty(0)
    with torch.inference_mode():
        for start in range(0, input_ids.shape[1], chunk_size):
            logits = _forward_last_logits(model, input_ids[:, start : start + chunk_size], cache, keyword)
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from (V,) float logits: argmax at temperature 0, else temperature + nucleus sampling."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly above each token
        keep = before < params.top_p
        keep[0] = True  # the most likely token always survives (top_p = 0 is then greedy)
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


class StopText:
    """Incremental text of the generated tokens, cut at the first stop string.

    `update` returns the new text that is safe to show: text that could still grow into a
    stop string, and a trailing incomplete character (U+FFFD of a split multi-byte
    sequence), are held back until the next token settles them.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]) -> None:
        self.decode = decode
        self.stop = tuple(stop)
        self.emitted = ""
        self.text = ""
        self.stopped = False

    def update(self, tokens: list[int], final: bool = False) -> str:
        """The text to add after `tokens` (all generated so far); sets `stopped` at a stop string."""
        text = self.decode(tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped, final = text[:cut], True, True
        self.text = text
        safe = len(text)
        if not final:
            safe = min(safe, len(text.rstrip("\ufffd")))
            for s in self.stop:  # the longest tail of the text that starts a stop string
                for n in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:n]):
                        safe -= n
                        break
        if safe <= len(self.emitted) or not text.startswith(self.emitted):
            return ""
        delta = text[len(self.emitted) : safe]
        self.emitted = text[:safe]
        return delta


@dataclass
class StepResult:
    """What one `Generation.step()` produced: a token (None during prefill) and the text it released."""

    token: int | None = None
    text: str = ""
    finished: bool = False


@dataclass
class Generation:
    """One request: prompt, sampling, its own KV cache and generator; advanced by `step()`.

    The first steps prefill one chunk each; the step that finishes the prompt also samples
    the first token; then each step decodes one token. `cancel()` makes the next step end
    it. The caller picks the weights (e.g. a peft adapter) before each step.
    """

    model: nn.Module
    input_ids: torch.Tensor
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    decode: Callable[[list[int]], str] | None = None
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    cancelled: bool = False
    ended_by_eos: bool = False

    def __post_init__(self) -> None:
        if self.input_ids.dim() == 1:
            self.input_ids = self.input_ids[None]
        if self.input_ids.dim() != 2 or self.input_ids.shape[0] != 1 or self.input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (L,) or (1, L) with L >= 1, got {tuple(self.input_ids.shape)}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {self.prefill_chunk}")
        if self.params.stop and self.decode is None:
            raise ValueError("stop strings need a decode function")
        self.cache = DynamicCache()
        self.keyword = model_cache_keyword(self.model)
        self.prefilled = 0
        device = self.input_ids.device
        self.generator: torch.Generator | None = None
        if self.params.temperature > 0.0:
            self.generator = torch.Generator(device=device)
            if self.params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.params.seed % (1 << 64))
        self.text = StopText(self.decode, self.params.stop) if self.decode is not None else None

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def cancel(self) -> None:
        """Stop generating (the client went away); frees the cache at once."""
        self.cancelled = True
        self.cache = DynamicCache()

    def step(self) -> StepResult:
        """One model call: a prefill chunk, or one decoded token; a finished generation does nothing."""
        if self.finished:
            return StepResult(finished=True)
        with torch.inference_mode():
            length = self.prompt_tokens
            if self.prefilled < length:
                end = min(self.prefilled + self.prefill_chunk, length)
                logits = _forward_last_logits(
                    self.model, self.input_ids[:, self.prefilled : end], self.cache, self.keyword
                )
                self.prefilled = end
                if end < length:
                    return StepResult()
            else:
                last = torch.tensor([[self.tokens[-1]]], device=self.input_ids.device)
                logits = _forward_last_logits(self.model, last, self.cache, self.keyword)
            token = sample_token(logits, self.params, self.generator)
        return self._accept(token)

    def _accept(self, token: int) -> StepResult:
        if token in self.eos_token_ids:
            self.finish_reason, self.ended_by_eos = "stop", True
            self.cache = DynamicCache()
            return StepResult(token=token, text=self._flush(final=True), finished=True)
        self.tokens.append(token)
        if len(self.tokens) >= self.params.max_tokens:
            self.finish_reason = "length"
        text = self._flush(final=self.finish_reason is not None)
        if self.text is not None and self.text.stopped:
            self.finish_reason = "stop"
        if self.finish_reason is not None:
            self.cache = DynamicCache()  # the KV cache is not needed any more
        return StepResult(token=token, text=text, finished=self.finish_reason is not None)

    def _flush(self, final: bool) -> str:
        return self.text.update(self.tokens, final=final) if self.text is not None else ""

    @property
    def completion_tokens(self) -> int:
        """Tokens generated, the end-of-sequence token included when one ended the text (as vLLM counts)."""
        return len(self.tokens) + int(self.ended_by_eos)

    @property
    def output_text(self) -> str:
        """The text generated so far, cut at a stop string (needs `decode`)."""
        if self.text is None:
            raise ValueError("no decode function was given")
        return self.text.text


def generate_tokens(
    model: nn.Module,
    input_ids: torch.Tensor,
    params: SamplingParams,
    *,
    eos_token_ids: Sequence[int] = (),
    decode: Callable[[list[int]], str] | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[StepResult]:
    """Run one generation to its end, yielding each decoded token's result as it comes.

    `should_stop` is asked between model calls; when it returns True the generation is
    cancelled (a disconnected client) and the iterator ends.
    """
    gen = Generation(model, input_ids, params, frozenset(eos_token_ids), decode, prefill_chunk)
    while not gen.finished:
        if should_stop is not None and should_stop():
            gen.cancel()
            return
        result = gen.step()
        if result.token is not None or result.text:
            yield result


def eos_ids_of(model: nn.Module, extra: Any = None) -> frozenset[int]:
    """End-of-sequence ids from the model's generation config and config (an int or a list), plus `extra`."""
    ids: set[int] = set()
    base = unwrap(model)
    for source in (getattr(base, "generation_config", None), getattr(base, "config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    if isinstance(extra, int):
        ids.add(extra)
    return frozenset(ids)
