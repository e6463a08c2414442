"""The serving engine on tiny random models: chunked prefill, sampling, stops, cancellation."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from seco_core.generate import (
    Generation,
    SamplingParams,
    StopText,
    chunked_prefill,
    eos_ids_of,
    generate_tokens,
    sample_token,
)
from tests.seco_core.tiny import CONFIGS, VOCAB, tiny_model

ARCHS = sorted(CONFIGS)


def _prompt(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, n), generator=g)


def _letters(ids: list[int]) -> str:
    """A toy detokenizer: token i is one letter."""
    return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.mark.parametrize(("arch", "chunk"), [("llama", 1), *((arch, chunk) for arch in ARCHS for chunk in (7, 64))])
def test_chunked_prefill_equals_full_forward(arch: str, chunk: int) -> None:
    model = tiny_model(arch, torch.float64)
    ids = _prompt(50)
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, -1]
    cache = DynamicCache()
    logits = chunked_prefill(model, ids, cache, chunk)
    assert cache.get_seq_length() == 50
    torch.testing.assert_close(logits, full.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked_prefill(model, ids, DynamicCache(), chunk).double(), full, rtol=0, atol=1e-5)


def test_chunked_prefill_keeps_float64_precision() -> None:
    """The logits it returns are float32, but the computation is the model's: float64 agrees to float32 rounding."""
    model = tiny_model("llama", torch.float64)
    ids = _prompt(40)
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, -1].float()
    assert (chunked_prefill(model, ids, DynamicCache(), 9) - full).abs().max() < 1e-6


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_greedy_equals_generate(arch: str) -> None:
    model = tiny_model(arch, torch.float32)
    ids = _prompt(37, seed=3)
    expected = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=25, eos_token_id=None
    )[0, 37:].tolist()
    got = [r.token for r in generate_tokens(model, ids, SamplingParams(max_tokens=25, temperature=0), prefill_chunk=8)]
    assert got == expected


def test_greedy_equals_generate_with_a_peft_adapter() -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    model = get_peft_model(
        tiny_model("llama", torch.float32),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    ).eval()
    ids = _prompt(30, seed=4)
    expected = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20, eos_token_id=None
    )[0, 30:].tolist()
    got = [r.token for r in generate_tokens(model, ids, SamplingParams(max_tokens=20, temperature=0), prefill_chunk=6)]
    assert got == expected
    with model.disable_adapter():
        base = [r.token for r in generate_tokens(model, ids, SamplingParams(max_tokens=20, temperature=0))]
    assert base != got


def test_seeded_sampling_is_reproducible() -> None:
    model = tiny_model("llama", torch.float32)
    ids = _prompt(20)

    def run(seed: int, top_p: float = 1.0) -> list[int | None]:
        params = SamplingParams(max_tokens=30, temperature=1.3, top_p=top_p, seed=seed)
        return [r.token for r in generate_tokens(model, ids, params)]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(1, 0.5) == run(1, 0.5)


def test_interleaved_generations_equal_each_alone() -> None:
    """Two generations stepped in turn on one model (own caches, own generators) match each run alone."""
    model = tiny_model("llama", torch.float32)
    a_ids, b_ids = _prompt(25, 1), _prompt(40, 2)
    pa, pb = SamplingParams(max_tokens=15, temperature=0), SamplingParams(max_tokens=15, temperature=1.0, seed=3)
    alone_a = [r.token for r in generate_tokens(model, a_ids, pa, prefill_chunk=8)]
    alone_b = [r.token for r in generate_tokens(model, b_ids, pb, prefill_chunk=8)]
    ga, gb = Generation(model, a_ids, pa, prefill_chunk=8), Generation(model, b_ids, pb, prefill_chunk=8)
    while not (ga.finished and gb.finished):
        ga.step()
        gb.step()
    assert (ga.tokens, gb.tokens) == (alone_a, alone_b)


def test_top_p_zero_is_greedy_and_top_p_restricts_the_draw() -> None:
    logits = torch.tensor([3.0, 2.9, -5.0, -5.0])
    g = torch.Generator().manual_seed(0)
    assert {sample_token(logits, SamplingParams(max_tokens=1, top_p=0.0), g) for _ in range(50)} == {0}
    drawn = {sample_token(logits, SamplingParams(max_tokens=1, top_p=0.6), g) for _ in range(200)}
    assert drawn == {0, 1}  # the two tokens that make up the nucleus, never the tail
    assert sample_token(logits, SamplingParams(max_tokens=1, temperature=0), None) == 0


def test_max_tokens_eos_and_finish_reason() -> None:
    model = tiny_model("llama", torch.float32)
    ids = _prompt(20)
    greedy = Generation(model, ids, SamplingParams(max_tokens=6, temperature=0))
    while not greedy.finished:
        greedy.step()
    assert (greedy.finish_reason, len(greedy.tokens), greedy.completion_tokens) == ("length", 6, 6)
    third = greedy.tokens[2]
    eos = Generation(model, ids, SamplingParams(max_tokens=6, temperature=0), eos_token_ids=frozenset({third}))
    while not eos.finished:
        eos.step()
    first_eos = greedy.tokens.index(third)
    assert eos.finish_reason == "stop" and eos.tokens == greedy.tokens[:first_eos]
    assert eos.completion_tokens == first_eos + 1  # the end-of-sequence token counts, as vLLM counts it


def test_stop_strings_cut_the_text_and_hold_back_what_may_become_one() -> None:
    model = tiny_model("llama", torch.float32)
    ids = _prompt(20)
    full = Generation(model, ids, SamplingParams(max_tokens=20, temperature=0), decode=_letters)
    while not full.finished:
        full.step()
    text = full.output_text
    stop = text[8:11]
    gen = Generation(model, ids, SamplingParams(max_tokens=20, temperature=0, stop=(stop,)), decode=_letters)
    deltas = []
    while not gen.finished:
        deltas.append(gen.step().text)
    assert "".join(deltas) == gen.output_text == text[: text.find(stop)]
    assert gen.finish_reason == "stop"
    assert len(gen.tokens) < 20


def test_stop_text_holds_back_partial_matches_and_split_characters() -> None:
    stream = StopText(lambda ids: "".join(map(chr, ids)), ["END"])
    assert stream.update([ord("a"), ord("E")]) == "a"  # "E" may start "END"
    assert stream.update([ord("a"), ord("E"), ord("x")]) == "Ex"
    assert stream.update([ord("a"), ord("E"), ord("x"), 0xFFFD]) == ""  # an unfinished character waits
    stopped = stream.update([ord("a"), ord("E"), ord("x"), ord("y"), ord("E"), ord("N"), ord("D"), ord("z")])
    assert stopped == "y" and stream.stopped and stream.text == "aExy"


def test_cancel_stops_between_tokens() -> None:
    model = tiny_model("llama", torch.float32)
    seen = []

    def should_stop() -> bool:
        return len(seen) >= 3

    for r in generate_tokens(model, _prompt(10), SamplingParams(max_tokens=50, temperature=0), should_stop=should_stop):
        seen.append(r.token)
    assert len(seen) == 3
    gen = Generation(model, _prompt(10), SamplingParams(max_tokens=50))
    gen.step()
    gen.cancel()
    assert gen.finished and gen.step().finished and gen.cache.get_seq_length() == 0


def test_bad_input_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_tokens=1, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(max_tokens=1, temperature=-1)
    with pytest.raises(ValueError, match="decode"):
        Generation(tiny_model("llama"), _prompt(3), SamplingParams(max_tokens=1, stop=("x",)))
    with pytest.raises(ValueError, match="input_ids"):
        Generation(tiny_model("llama"), torch.zeros(1, 0, dtype=torch.long), SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_prefill(tiny_model("llama"), _prompt(3), DynamicCache(), 0)


def test_eos_ids_from_configs() -> None:
    model = tiny_model("llama")
    assert eos_ids_of(model) == {2}
    assert eos_ids_of(model, 5) == {2, 5}
