"""The memory plan's arithmetic, against the figures in reference/anchors-performance.md."""

from __future__ import annotations

import psutil
import pytest
from transformers import GPTNeoXConfig, LlamaConfig, Qwen3Config

from seco_core.memory_plan import (
    GiB,
    KiB,
    MiB,
    ModelShape,
    PlanOptions,
    choose_chunk_size,
    device_budget_bytes,
    estimate,
    format_bytes,
    max_length,
    parse_size,
    plan,
)

LLAMA3_8B = LlamaConfig(
    num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
    intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
)  # fmt: skip
SHAPE = ModelShape.from_config(LLAMA3_8B)
# The anchors' "checkpointing + fused CE", with their bf16 K/V gradients (seco_core sums them in fp32).
LEAN = PlanOptions(layer_checkpointing=True, fused_loss=True, kv_grad_bytes=2)


def test_llama3_8b_shape_parameters_and_weights() -> None:
    assert (SHAPE.num_layers, SHAPE.num_kv_heads, SHAPE.head_dim) == (32, 8, 128)
    assert SHAPE.num_params == 8_030_261_248  # 8.03B
    e = estimate(LLAMA3_8B, 16384, 1024)  # a transformers config works directly
    assert e.weights == 16_060_522_496  # 16.06 GB = 14.96 GiB of bf16
    assert format_bytes(e.weights) == "14.96 GiB"
    nf4 = estimate(SHAPE, 16384, 1024, PlanOptions(weights_4bit=True))
    assert 5.5e9 < nf4.weights < 5.9e9  # the anchors' ≈5.7 GB


def test_kv_cache_is_128_kib_per_token_and_2_gib_at_16k() -> None:
    assert SHAPE.kv_bytes_per_token(2) == 128 * KiB
    e = estimate(SHAPE, 16384, 1024)
    assert e.kv_cache == 2 * GiB
    # Gradient sums for every chunk before the first backward chunk: (L - c) tokens, in
    # float32 as seco_core keeps them (kv_store.py): twice the bf16 cache per token.
    assert e.kv_grad == (16384 - 1024) * 128 * KiB * 2
    bf16_grads = estimate(SHAPE, 16384, 1024, PlanOptions(kv_grad_bytes=2))
    assert 2 * bf16_grads.kv_grad == e.kv_grad
    assert estimate(SHAPE, 16384, 1024, PlanOptions(batch_size=2)).kv_cache == 4 * GiB


def test_lora_state_and_logits() -> None:
    assert SHAPE.lora_params(16, ("all-linear",)) == 41_943_040  # the anchors' 41.9M
    e = estimate(SHAPE, 16384, 1024, PlanOptions(lora_r=16, lora_targets=("all-linear",)))
    assert e.trainable_state == 41_943_040 * 16  # fp32 weight + grad + AdamW m, v: 0.67 GB
    # Naive loss: 12 B per vocabulary entry at the cross-entropy's backward (saved fp32
    # log-softmax, its grad, the logits' grad), ≈1.47 MiB/token (the anchors' 1.22 MiB
    # counts 10 B); loss_slice bounds the rows, a fused loss removes them.
    naive = estimate(SHAPE, 16384, 1024, PlanOptions(loss_slice=None))
    assert naive.logits == 1024 * 128256 * 12
    assert 1.46 * MiB < naive.logits / 1024 < 1.48 * MiB
    assert estimate(SHAPE, 16384, 1024, PlanOptions(loss_slice=256)).logits == naive.logits // 4
    assert estimate(SHAPE, 16384, 1024, LEAN).logits == 0


def test_layer_checkpointing_shrinks_activations() -> None:
    full = estimate(SHAPE, 16384, 1024)
    ckpt = estimate(SHAPE, 16384, 1024, PlanOptions(layer_checkpointing=True))
    # Without: every layer's working set per chunk token (anchors: ≈4.25 MiB/token).
    assert 3.5 * MiB < full.activations / 1024 < 6.5 * MiB
    # With: 32 layer inputs of 8 KiB plus one layer's working set (anchors: ≈392 KiB).
    assert ckpt.activations == 1024 * (32 * 8 * KiB) + full.activations // 32
    assert 300 * KiB < ckpt.activations / 1024 < 500 * KiB


def test_worked_examples_of_the_anchors() -> None:
    # 16K, c=1K, no checkpointing, naive CE: ≈27 GiB -> refused on a 24 GB card.
    naive = estimate(SHAPE, 16384, 1024, PlanOptions(loss_slice=None))
    assert 25 * GiB < naive.total < 31 * GiB
    # With checkpointing + fused CE: ≈22 GiB -> fits, close to the limit.
    lean = estimate(SHAPE, 16384, 1024, LEAN)
    assert 21 * GiB < lean.total < 23 * GiB
    # H200 (~130 GiB usable): ≈440K tokens with bf16 KV-grad, ≈300K with fp32.
    assert 400_000 < max_length(SHAPE, 130 * GiB, 1024, LEAN) < 470_000
    fp32 = PlanOptions(layer_checkpointing=True, fused_loss=True, kv_grad_bytes=4)
    assert 270_000 < max_length(SHAPE, 130 * GiB, 1024, fp32) < 330_000
    # 80 GB card: ≈235K.
    assert 210_000 < max_length(SHAPE, 80 * 10**9, 1024, LEAN) < 260_000


def test_max_length_is_exact_at_the_boundary() -> None:
    budget = 24 * GiB
    n = max_length(SHAPE, budget, 1024, LEAN)
    assert estimate(SHAPE, n, 1024, LEAN).total <= budget < estimate(SHAPE, n + 1, 1024, LEAN).total
    assert max_length(SHAPE, 10 * GiB, 1024) == 0  # the weights alone do not fit
    assert max_length(SHAPE, 10_000 * GiB, 1024, LEAN, limit=2**20) == 2**20


def test_choose_chunk_size_takes_the_largest_power_of_two_that_fits() -> None:
    c = choose_chunk_size(SHAPE, 16384, 24 * GiB)
    assert c is not None and c & (c - 1) == 0 and 64 <= c <= 16384
    assert estimate(SHAPE, 16384, c).total <= 24 * GiB < estimate(SHAPE, 16384, 2 * c).total
    assert choose_chunk_size(SHAPE, 16384, 500 * GiB) == 16384  # capped at the length
    assert choose_chunk_size(SHAPE, 32768, 24 * GiB) is None


def test_plan_refuses_and_says_what_would_fit() -> None:
    # 32K tokens with everything on a 24 GiB card: KV + KV-grad alone are 8 GiB.
    p = plan(SHAPE, 32768, 24 * GiB)
    assert not p.fits
    assert p.chunk_size == 64
    assert "max_length=32768" in p.message and "24.00 GiB" in p.message
    assert f"max_length<={p.longest_length} with chunk_size=64" in p.message
    assert 16384 < p.longest_length < 32768
    assert plan(SHAPE, p.longest_length, 24 * GiB, chunk_size=64).fits

    # A requested chunk that is too big at a length that fits with a smaller one.
    p = plan(SHAPE, 16384, 24 * GiB, chunk_size=4096)
    assert not p.fits
    smaller = choose_chunk_size(SHAPE, 16384, 24 * GiB)
    assert f"chunk_size={smaller} at max_length=16384" in p.message

    # Nothing fits at all.
    p = plan(SHAPE, 16384, 12 * GiB)
    assert not p.fits and p.longest_length == 0
    assert "Nothing fits" in p.message and "4-bit" in p.message

    # Fits: the chosen chunk is the largest that fits.
    p = plan(SHAPE, 16384, 24 * GiB)
    assert p.fits and p.chunk_size == smaller
    assert p.estimate.total <= 24 * GiB and p.longest_length >= 16384


def test_kv_offload_moves_kv_and_grads_to_the_host() -> None:
    options = PlanOptions(kv_offload=True, layer_checkpointing=True, fused_loss=True)
    e = estimate(SHAPE, 131072, 1024, options)
    # On the device only the current chunk's own K/V and the (float32) gradient relayed into it.
    assert e.kv_cache == 1024 * 128 * KiB and e.kv_grad == 2 * e.kv_cache
    assert e.host_kv_cache == 16 * GiB  # 128K x 128 KiB
    assert e.host_kv_grad == (131072 - 1024) * 128 * KiB * 2  # float32 sums
    block = 1024 * 8 * 128 * 2  # one layer's K (or V) block of 1024 tokens in bf16
    assert e.host_staging == 32 * block  # the copy-out ring
    assert e.host_total == e.host_kv_cache + e.host_kv_grad + e.host_staging
    # Streamed one block at a time: in use, the next, the next layer's first (K and V), and
    # about two blocks' gradient contributions waiting for their copy out.
    assert e.kv_transient == 2 * block * (3 + 2)
    assert estimate(SHAPE, 1048576, 1024, options).total == e.total  # device memory does not grow with L
    assert e.total < 24 * GiB  # 128K tokens of an 8B model under 24 GiB
    # A host budget is enforced too.
    assert plan(SHAPE, 131072, 24 * GiB, 1024, options, host_budget_bytes=128 * GiB).fits
    refused = plan(SHAPE, 131072, 24 * GiB, 1024, options, host_budget_bytes=16 * GiB)
    assert not refused.fits and "host memory" in refused.message


def test_other_architectures_read_from_their_configs() -> None:
    qwen3 = ModelShape.from_config(
        Qwen3Config(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            num_hidden_layers=3,
            intermediate_size=128,
            vocab_size=100,
        )
    )
    assert qwen3.head_dim == 32  # explicit head_dim, not hidden // heads
    assert qwen3.kv_bytes_per_token(4) == 3 * 2 * 2 * 32 * 4
    neox = ModelShape.from_config(
        GPTNeoXConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=256, vocab_size=100)
    )
    assert neox.num_kv_heads == 4
    assert neox.lora_params(8, ("query_key_value",)) == 2 * 8 * (64 + 3 * 64)
    with pytest.raises(ValueError, match="unknown LoRA target module 'qq_proj'"):
        SHAPE.lora_params(8, ("qq_proj",))


def test_options_validate_themselves() -> None:
    with pytest.raises(ValueError, match="dtype_bytes"):
        PlanOptions(dtype_bytes=3)
    with pytest.raises(ValueError, match="loss_slice"):
        PlanOptions(loss_slice=0)
    with pytest.raises(ValueError, match="seq_len"):
        estimate(SHAPE, 0, 64)


def test_sizes_parse_and_format() -> None:
    assert parse_size("24GiB") == 24 * GiB
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("512 MiB") == 512 * MiB
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError, match="not a memory size"):
        parse_size("lots")
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(2 * GiB) == "2.00 GiB"


def test_cpu_budget_is_available_ram_minus_a_reserve() -> None:
    vm = psutil.virtual_memory()
    budget = device_budget_bytes("cpu")
    assert 0 < budget < vm.total
    assert device_budget_bytes("cpu", reserve_bytes=0) >= budget


def test_cuda_budget_is_the_free_memory_within_the_process_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process on the GPU (or a memory fraction) leaves less than the card's size."""
    import torch

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (70 * GiB, 141 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 0)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 1.0)
    assert device_budget_bytes("cuda:0") == 69 * GiB  # free memory minus the 1 GiB reserve
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda index: 24 / 141)
    assert device_budget_bytes("cuda") == 23 * GiB  # the 24 GiB cap of gpu_check.sh on an H200


def test_logits_and_attention_transients_are_not_added_up() -> None:
    fused = estimate(SHAPE, 16384, 1024)
    assert fused.attention_scores == 1024 * 32 * 128 * 4 * 4
    matmul = estimate(SHAPE, 16384, 1024, PlanOptions(fused_attention=False))
    assert matmul.attention_scores == 32 * 1024 * 1024 * 4 * 4
    for e in (fused, matmul):
        assert e.transient == max(e.logits, e.attention_scores)
        assert (
            e.total
            == e.weights
            + e.trainable_state
            + e.kv_cache
            + e.kv_grad
            + e.activations
            + e.transient
            + e.kv_transient
            + e.workspace
        )


def test_max_chunk_caps_the_choice() -> None:
    assert choose_chunk_size(SHAPE, 16384, 500 * GiB) == 16384
    assert choose_chunk_size(SHAPE, 16384, 500 * GiB, PlanOptions(max_chunk=4096)) == 4096
    assert choose_chunk_size(SHAPE, 1000, 500 * GiB, PlanOptions(max_chunk=4096)) == 512


def test_branch_tokens_add_their_kv_cache_and_gradients() -> None:
    """A prefix tree (DPO) keeps every branch's leaves until stage 2: L + branch tokens of K/V."""
    shape = ModelShape(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=128, vocab_size=100, num_params=10**6)  # fmt: skip
    for offload in (False, True):
        tree = estimate(shape, 1000, 128, PlanOptions(branch_tokens=300, kv_offload=offload))
        longer = estimate(shape, 1300, 128, PlanOptions(kv_offload=offload))
        assert (tree.kv_cache, tree.kv_grad, tree.host_kv_cache, tree.host_kv_grad) == (
            longer.kv_cache,
            longer.kv_grad,
            longer.host_kv_cache,
            longer.host_kv_grad,
        )
        assert tree.activations == estimate(shape, 1000, 128, PlanOptions(kv_offload=offload)).activations
    with pytest.raises(ValueError, match="branch_tokens must be >= 0"):
        PlanOptions(branch_tokens=-1)
