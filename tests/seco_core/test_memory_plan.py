"""The memory plan's arithmetic, against the figures in reference/anchors-performance.md."""

from __future__ import annotations

import math
import re

import psutil
import pytest
import torch
from transformers import GPTNeoXConfig, LlamaConfig, Qwen3Config

from seco_core import ChunkConfig, chunked_backward
from seco_core.kv_store import HostBuffers
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
from tests.seco_core.tiny import CONFIGS, VOCAB, tiny_model

LLAMA3_8B = LlamaConfig(
    num_hidden_layers=32,
    hidden_size=4096,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    tie_word_embeddings=False,
)
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
    # 16K, c=1K, no checkpointing, naive CE: ≈27 GiB -> refused on a 24 GB card (the anchors'
    # arithmetic has no allocator term: compared without it).
    naive = estimate(SHAPE, 16384, 1024, PlanOptions(loss_slice=None))
    assert 25 * GiB < naive.total - naive.allocator < 31 * GiB < naive.total
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

    # Nothing fits at all, not even with 4-bit weights (5.3 GiB) and the 2 GiB workspace.
    p = plan(SHAPE, 16384, 6 * GiB)
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
    assert e.host_staging == 0  # the copy-out ring reuses the last block's released buffers
    assert e.host_total == e.host_kv_cache + e.host_kv_grad + e.host_staging
    # Streamed one block at a time: in use, the next, the next layer's first (K and V), and
    # about two blocks' gradient contributions waiting for their copy out.
    assert e.kv_transient == 2 * block * (3 + 2)
    # Device memory grows with L only by the step's int64 ids, labels, targets and positions.
    assert estimate(SHAPE, 1048576, 1024, options).total - e.total == 4 * 8 * (1048576 - 131072)
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
            + e.token_ids
            + e.allocator
            + e.workspace
        )


def test_max_chunk_caps_the_choice() -> None:
    assert choose_chunk_size(SHAPE, 16384, 500 * GiB) == 16384
    assert choose_chunk_size(SHAPE, 16384, 500 * GiB, PlanOptions(max_chunk=4096)) == 4096
    assert choose_chunk_size(SHAPE, 1000, 500 * GiB, PlanOptions(max_chunk=4096)) == 512


def test_branch_tokens_add_their_kv_cache_and_gradients() -> None:
    """A prefix tree (DPO) keeps every branch's leaves until stage 2: L + branch tokens of K/V."""
    shape = ModelShape(
        num_layers=2,
        hidden_size=64,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=100,
        num_params=10**6,
    )
    for offload in (False, True):
        tree = estimate(shape, 1000, 128, PlanOptions(branch_tokens=300, kv_offload=offload))
        longer = estimate(shape, 1300, 128, PlanOptions(kv_offload=offload))
        assert (tree.kv_cache, tree.kv_grad) == (longer.kv_cache, longer.kv_grad)
        assert tree.activations == estimate(shape, 1000, 128, PlanOptions(kv_offload=offload)).activations
    # Offloaded, in chunk-sized host buffers: 1000 tokens are 8 blocks of 128, the answers
    # start blocks of their own (3 for 300 tokens), and the prompt's last block may have been
    # partial (1 more): 12 blocks, where one 1300-token sequence has 11.
    tree = estimate(shape, 1000, 128, PlanOptions(branch_tokens=300, kv_offload=True))
    longer = estimate(shape, 1300, 128, PlanOptions(kv_offload=True))
    buffer = 128 * 2 * 16 * 2  # one layer's K (or V) of one block: 8 KiB, a power of two
    assert (tree.host_kv_cache, longer.host_kv_cache) == (2 * 12 * 2 * buffer, 2 * 11 * 2 * buffer)
    assert (tree.host_kv_grad, longer.host_kv_grad) == (2 * 11 * 2 * 2 * buffer, 2 * 10 * 2 * 2 * buffer)
    with pytest.raises(ValueError, match="branch_tokens must be >= 0"):
        PlanOptions(branch_tokens=-1)


# What the allocators really take. Each figure below is derived by hand from the model's
# shape and the allocators' rules, not by calling the plan's own helpers.


def _next_power_of_two(n: int) -> int:
    """PyTorch's pinned-memory allocator's rounding (CachingHostAllocator: PowerOf2Ceil)."""
    return 2 ** math.ceil(math.log2(n))


@pytest.mark.parametrize(("dtype", "sizes"), [(torch.float32, {6400}), (torch.bfloat16, {3200, 6400})])
def test_pinned_host_memory_is_what_the_kv_store_asks_the_host_allocator_for(
    dtype: torch.dtype, sizes: set[int]
) -> None:
    """A real offloaded step (CPU, tiny Llama) records every host buffer the K/V store
    allocates; pinned through CUDA's host allocator each takes the next power of two (and at
    least a 4 KiB page). Chunk 100 of 250 tokens: 3 blocks, the last one half full, all in
    chunk-sized buffers: K/V 2 KV heads x 100 x 8 elements (6400 B in fp32, 3200 B in bf16,
    pinning 8 and 4 KiB), float32 sums 6400 B."""
    allocated: list[int] = []

    class Recording(HostBuffers):
        def take(self, shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
            before = self.allocations
            buffer = super().take(shape, dtype, pin)
            if self.allocations > before:
                allocated.append(buffer.numel() * buffer.element_size())
            return buffer

    model = tiny_model("llama", dtype=dtype)
    ids = torch.randint(3, VOCAB, (1, 250), generator=torch.Generator().manual_seed(0))
    chunked_backward(model, ids, ids, ChunkConfig(chunk_size=100, offload_kv=True), host_buffers=Recording())
    pinned = [max(4 * KiB, _next_power_of_two(n)) for n in allocated]
    assert set(allocated) == sizes

    e = estimate(CONFIGS["llama"], 250, 100, PlanOptions(kv_offload=True, dtype_bytes=dtype.itemsize))
    # 2 layers x (K and V of 3 blocks + the sums of 2), and the 32-buffer copy-out ring, whose
    # first 4 are the last block's K and V, released just before the first deposit.
    assert e.host_buffers == len(allocated) == 2 * (2 * 3 + 2 * 2) + 32 - 4
    assert e.host_total == sum(pinned)
    assert 250 * 2 * 2 * 2 * 8 * (dtype.itemsize + 4) < e.host_total  # the tokens' exact K/V and sums undercount it


def test_8b_at_128k_with_offload_counts_pinning_and_the_allocator() -> None:
    """Llama-3-8B, bf16, 128K tokens in chunks of 4096, KV offload and layer checkpointing."""
    options = PlanOptions(kv_offload=True, layer_checkpointing=True)
    e = estimate(SHAPE, 131072, 4096, options)
    # Host: 32 blocks x 32 layers; K and V of a block and layer 4096 x 8 x 128 x 2 B = 8 MiB,
    # their float32 sums 16 MiB (every block but the last); the 32-buffer copy-out ring is
    # made of the last block's 64 released K and V buffers.
    assert e.host_kv_cache == 32 * 32 * 2 * 8 * MiB == 16 * GiB
    assert e.host_kv_grad == 31 * 32 * 2 * 16 * MiB == 31 * GiB
    assert e.host_staging == 0
    assert e.host_buffers == 32 * (2 * 32 + 2 * 31) == 4032  # what the first step pins
    # Device, allocator: 10% of the short-lived tensors. Per chunk token, 32 layer inputs
    # (4096 x 2 B) plus one layer's working set: 4 hidden-sized, 2 query-sized, 2 KV-sized,
    # 4 MLP-sized bf16 vectors and 2 hidden-sized fp32 ones; logits of a 1024-token slice at
    # 12 B per vocabulary entry; 3 + 2 streamed blocks of K and V (8 MiB each in bf16).
    layer = (4 * 4096 + 2 * 4096 + 2 * 1024 + 4 * 14336) * 2 + 2 * 4096 * 4
    activations = 4096 * (32 * 4096 * 2 + layer)
    logits = 1024 * 128256 * 12
    streamed = 5 * 2 * 8 * MiB
    assert (e.activations, e.logits, e.kv_transient) == (activations, logits, streamed)
    assert e.allocator == math.ceil(0.10 * (activations + logits + streamed))  # the blocks are 2 MiB multiples
    assert 330 * MiB < e.allocator < 350 * MiB
    # 22.2 GiB of the 23 GiB a 24 GiB card leaves after its 1 GiB reserve: it fits, by 0.8 GiB.
    assert 22.1 * GiB < e.total < 22.3 * GiB
    assert plan(SHAPE, 131072, 23 * GiB, 4096, options, host_budget_bytes=48 * GiB).fits


def test_heads_that_are_not_a_power_of_two_pin_a_third_more() -> None:
    """Phi-3-mini (32 KV heads of 96): a block's K in bf16 at chunk 4096 is 24 MiB and pins
    32 MiB; its float32 sum is 48 MiB and pins 64 MiB."""
    phi3 = ModelShape(
        num_layers=32,
        hidden_size=3072,
        num_heads=32,
        num_kv_heads=32,
        head_dim=96,
        intermediate_size=8192,
        vocab_size=32064,
        num_params=3_821_079_552,
    )
    e = estimate(phi3, 32768, 4096, PlanOptions(kv_offload=True, layer_checkpointing=True))
    exact_kv = 32768 * 32 * 2 * 32 * 96 * 2  # 12 GiB of K/V for 32K tokens
    assert exact_kv == 12 * GiB and e.host_kv_cache == 16 * GiB
    assert e.host_kv_grad == 7 * 32 * 2 * 64 * MiB  # 28 GiB where the exact float32 sums are 21 GiB
    assert e.host_staging == 0  # the ring reuses the last block's buffers (64 > 32)


def test_a_host_bound_refusal_says_which_host_budget_or_length_would_fit() -> None:
    """128K with offload on a 40 GiB host budget: the device would hold it; the host needs
    47 GiB (above). At 40 GiB: n blocks of 4096 need 1.5 GiB each (K, V and sums of 32
    layers), the last one 0.5 GiB (no sums): 1.5 (n - 1) + 0.5 <= 40 gives n = 27 blocks,
    110592 tokens."""
    options = PlanOptions(kv_offload=True, layer_checkpointing=True)
    p = plan(SHAPE, 131072, 23 * GiB, 4096, options, host_budget_bytes=40 * GiB)
    assert not p.fits
    assert "47.00 GiB of pinned host memory (host budget 40.00 GiB)" in p.message
    assert "within the device budget" in p.message
    assert "SECO_HOST_MEMORY_BUDGET) of at least 47.00 GiB (4032 pinned buffers) with chunk_size=4096" in p.message
    assert "max_length<=110592 with chunk_size=4096" in p.message
    assert plan(SHAPE, 131072, 23 * GiB, 4096, options, host_budget_bytes=47 * GiB).fits
    assert not plan(SHAPE, 131072, 23 * GiB, 4096, options, host_budget_bytes=47 * GiB - 1).fits
    assert plan(SHAPE, 110592, 23 * GiB, 4096, options, host_budget_bytes=40 * GiB).fits
    assert not plan(SHAPE, 110593, 23 * GiB, 4096, options, host_budget_bytes=40 * GiB).fits


def test_a_refusal_names_the_options_that_would_fit() -> None:
    # 16K on 16 GiB: bf16 weights and the workspace alone take 17 GiB; NF4 weights (5.3 GiB) leave room.
    p = plan(SHAPE, 16384, 16 * GiB)
    suggested = re.search(r"4-bit weights \(seco\.load_in_4bit\) with chunk_size=(\d+) at max_length=16384", p.message)
    assert not p.fits and suggested
    assert plan(SHAPE, 16384, 16 * GiB, int(suggested.group(1)), PlanOptions(weights_4bit=True)).fits
    # 128K without offload: 16 GiB of K/V and 32 GiB of sums on the device; offloaded they fit.
    p = plan(SHAPE, 131072, 23 * GiB, None, PlanOptions(max_chunk=4096), host_budget_bytes=64 * GiB)
    suggested = re.search(r"KV offload with layer checkpointing with chunk_size=(\d+) at max_length=131072", p.message)
    assert not p.fits and suggested
    offload = PlanOptions(max_chunk=4096, kv_offload=True, layer_checkpointing=True)
    assert plan(SHAPE, 131072, 23 * GiB, int(suggested.group(1)), offload, host_budget_bytes=64 * GiB).fits
    # Without a host budget there is nowhere to offload to: not suggested.
    assert "KV offload" not in plan(SHAPE, 131072, 23 * GiB, None, PlanOptions(max_chunk=4096)).message
