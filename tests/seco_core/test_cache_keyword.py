"""The decoder gets the chunk cache under the keyword its own signature names.

transformers 5.17's decoders take a Cache as `past_key_values` only: a `cache=` keyword
disappears into `**kwargs`, the model builds a cache of its own and chunk-wise training
never sees a chunk's keys/values. Later releases take `cache=` and keep `past_key_values`
as a deprecated alias, due to be removed. CI's oldest-versions run (`scripts/dev.sh
test-oldest`) runs every test on 5.17 itself; here the installed decoder is given the
other releases' signatures, so both keywords are exercised whichever version is installed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch

from seco_core import ChunkConfig, UnsupportedModelError, chunked_backward
from seco_core.arch import model_parts
from tests.seco_core.test_parity import batch, max_rel_error, reference_grads
from tests.seco_core.tiny import tiny_model

DROPPED = ("cache", "past_key_values")  # keywords a decoder of the emulated signature does not know


def _native_keyword(forward: Callable[..., Any]) -> str:
    """The installed decoder's own Cache keyword (the one its layers really receive)."""
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def with_signature(decoder: torch.nn.Module, keyword: str | None) -> None:
    """Give `decoder.forward` a signature whose only Cache keyword is `keyword` (None: none at all).

    The other keyword is dropped, as a release that does not know it drops it (swallowed by
    `**kwargs`, never reaching a cache); the cache received goes on to the real forward
    under the installed version's own name.
    """
    original = decoder.forward
    native = _native_keyword(original)

    def forward_past(
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        for name in DROPPED:
            kwargs.pop(name, None)
        kwargs[native] = past_key_values
        return original(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache, **kwargs)

    def forward_cache(
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        for name in DROPPED:
            kwargs.pop(name, None)
        kwargs[native] = cache
        return original(input_ids=input_ids, position_ids=position_ids, use_cache=use_cache, **kwargs)

    def forward_none(
        input_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        for name in DROPPED:
            kwargs.pop(name, None)
        return original(input_ids=input_ids, position_ids=position_ids, **kwargs)

    forwards = {"past_key_values": forward_past, "cache": forward_cache, None: forward_none}
    decoder.forward = forwards[keyword]  # type: ignore[method-assign]


@pytest.mark.parametrize("keyword", ["past_key_values", "cache"], ids=["transformers-5.17", "newer"])
@pytest.mark.usefixtures("float64_norms")
def test_chunks_reach_the_cache_under_either_keyword(keyword: str) -> None:
    model = tiny_model("llama")
    with_signature(model.get_decoder(), keyword)
    ids, labels = batch()
    ref_loss, ref = reference_grads(model, ids, labels)
    out = chunked_backward(model, ids, labels, ChunkConfig(chunk_size=7))
    assert out.loss == pytest.approx(ref_loss, rel=1e-13)
    assert max_rel_error(model, ref) < 1e-12
    assert model_parts(model).cache_keyword == keyword


def test_a_decoder_without_a_cache_keyword_is_refused_by_name() -> None:
    model = tiny_model("llama")
    with_signature(model.get_decoder(), None)
    ids, labels = batch()
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM: .*no KV cache argument"):
        chunked_backward(model, ids, labels, ChunkConfig(chunk_size=7))
    assert all(p.grad is None for p in model.parameters())


def test_a_decoder_that_ignores_the_cache_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder that accepts the keyword but never writes into the cache (attention that
    bypasses the Cache API) fails with the reason, not a bare AssertionError."""
    model = tiny_model("llama")
    decoder = model.get_decoder()
    original = decoder.forward
    native = _native_keyword(original)

    def ignoring(*args: Any, **kwargs: Any) -> Any:
        kwargs[native] = None  # builds and fills a cache of its own
        return original(*args, **kwargs)

    monkeypatch.setattr(decoder, "forward", ignoring)
    monkeypatch.setattr("seco_core.arch.cache_keyword", lambda decoder, architecture: native, raising=False)
    ids, labels = batch()
    with pytest.raises(UnsupportedModelError, match="did not write layer 0's keys/values into the chunk cache"):
        chunked_backward(model, ids, labels, ChunkConfig(chunk_size=7))
