"""The memory benchmark's arithmetic: the K/V floor per token and the two ratios it prints."""

from __future__ import annotations

from benchmarks import bench, bench_memory


def test_floor_is_kv_and_kv_gradient_bytes_per_token() -> None:
    spec = bench.resolve(bench.parse_args([]))  # 4 layers, 4 KV heads of 64, fp32
    # K and V of 4 layers x 256 wide, 4 bytes each, and as much again for their float32 sums
    assert bench_memory.floor_bytes_per_token(spec) == 4 * 2 * 256 * (4 + 4) == 16 * 1024
    bf16 = {**spec, "dtype": "bfloat16", "kv_heads": 1}  # bf16 K/V, float32 sums, one KV head
    assert bench_memory.floor_bytes_per_token(bf16) == 4 * 2 * 64 * (2 + 4)


def test_figures_compare_growth_with_the_floor_and_plain_with_seco() -> None:
    spec = bench.resolve(bench.parse_args([]))
    mib = bench_memory.MiB
    results = {
        ("seco", 2048): {"peak_extra_bytes": 400 * mib},
        ("seco", 8192): {"peak_extra_bytes": 520 * mib},  # grew 120 MiB; the floor grows 96 MiB
        ("plain", 8192): {"peak_extra_bytes": 4160 * mib},
    }
    fig = bench_memory.figures(results, spec, 2048, 8192)
    assert fig["floor_growth_mib"] == 96.0
    assert fig["growth_over_floor"] == 1.25
    assert fig["plain_over_seco"] == 8.0
    report = bench_memory.format_report(fig, 2048, 8192)
    assert "growth / floor: 1.25x (aim <= 1.25x: ok)" in report
    assert "plain / SeCO peak extra at 8192: 8.00x (aim >= 8.0x: ok)" in report
