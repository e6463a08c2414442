"""Peak-memory and timing probes, on CPU (process peak RSS)."""

from __future__ import annotations

import sys
import time

import pytest

from seco_core.probes import DeviceMemoryUse, PeakMemory, Stopwatch, cuda_memory_use
from tests.conftest import ROOT

MB = 1024 * 1024
GiB = 1024**3
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM reset is Linux-only")


def in_fresh_process(code: str) -> str:
    """Run `code` in a new interpreter, fail with its errors if it fails, return what it printed.

    VmHWM is the whole process's peak: in the test process, memory that other tests left
    for the garbage collector (or a background thread) can be freed between a reset and
    the allocation being measured, and the new tensor then fits under the old peak. A fresh
    interpreter holds only what the code allocates.
    """
    import subprocess

    prelude = (
        "import torch\n"
        "from seco_core.probes import PeakMemory, current_rss_bytes, return_freed_memory_to_os\n"
        "MB = 2**20\n"
    )
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


@linux_only
def test_a_200mb_tensor_shows_up_in_the_peak_and_reset_forgets_it() -> None:
    in_fresh_process(
        "probe = PeakMemory('cpu')\n"
        "assert probe.resettable\n"
        "assert probe.baseline_bytes > 0\n"
        "x = torch.ones(50 * MB, dtype=torch.float32)  # 200 MiB, every page touched by ones()\n"
        "assert x.numel() * 4 == 200 * MB\n"
        "del x\n"
        "extra = probe.peak_extra_bytes\n"
        "assert 195 * MB <= extra <= 260 * MB, extra / MB\n"
        # a large tensor is mmapped and returned to the kernel on free, so after a reset the
        # peak is back near the current RSS
        "probe.reset()\n"
        "assert probe.peak_extra_bytes < 30 * MB, probe.peak_extra_bytes / MB\n"
        "assert abs(probe.baseline_bytes - current_rss_bytes()) < 30 * MB\n"
    )


@linux_only
def test_context_manager_resets_on_entry() -> None:
    # Both sizes lie above glibc's largest dynamic mmap threshold (32 MiB), so each tensor
    # gets fresh pages: a 20 MiB tensor could come from already-resident heap and add less
    # than its size to the peak.
    in_fresh_process(
        "with PeakMemory('cpu') as outer:\n"
        "    y = torch.ones(40 * MB)  # 160 MiB\n"
        "    del y\n"
        "    assert outer.peak_extra_bytes >= 155 * MB, outer.peak_extra_bytes / MB\n"
        "    with PeakMemory('cpu') as inner:\n"
        "        z = torch.ones(10 * MB)  # 40 MiB\n"
        "        del z\n"
        "        assert 38 * MB <= inner.peak_extra_bytes < 80 * MB, inner.peak_extra_bytes / MB\n"
        "assert outer.peak_bytes() >= outer.baseline_bytes\n"
    )


def test_stopwatch_measures_wall_time() -> None:
    with Stopwatch("cpu") as sw:
        time.sleep(0.05)
    assert 0.045 <= sw.seconds < 1.0
    sw2 = Stopwatch()
    with pytest.raises(RuntimeError):
        sw2.stop()


def test_freed_tensor_memory_goes_back_to_the_os() -> None:
    """After return_freed_memory_to_os, a freed 16 MiB tensor leaves the resident set each time
    (glibc's dynamic threshold keeps a block of that size on the heap once one was freed:
    from the second time on, freeing it gave back nothing)."""
    out = in_fresh_process(
        "assert return_freed_memory_to_os()\n"
        "for _ in range(3):\n"
        "    t = torch.ones(4 * MB)\n"
        "    held = current_rss_bytes()\n"
        "    del t\n"
        "    print(held - current_rss_bytes())\n"
    )
    assert all(int(freed) > 15 * 2**20 for freed in out.split()), out


def test_the_card_verdict_is_on_what_the_process_held_not_on_tensors() -> None:
    """20 GiB of tensors in 23.2 GiB of allocator segments plus a 0.9 GiB context: over 24 GiB."""
    use = DeviceMemoryUse(
        peak_allocated_bytes=20 * GiB,
        peak_reserved_bytes=int(23.2 * GiB),
        reserved_bytes=22 * GiB,  # the allocator gave some segments back after the peak
        device_used_bytes=int(22.9 * GiB),  # mem_get_info now: the reservation and the context
        device_total_bytes=141 * GiB,
    )
    assert use.outside_allocator_bytes == int(22.9 * GiB) - 22 * GiB
    assert use.peak_held_bytes == int(23.2 * GiB) + int(22.9 * GiB) - 22 * GiB
    assert use.peak_allocated_bytes <= 24 * GiB  # what the old verdict looked at, and passed
    assert not use.fits(24 * GiB)
    assert use.fits(25 * GiB)
    report = use.report(24 * GiB)
    assert report["fits_cap"] is False
    assert report["peak_reserved_bytes"] == int(23.2 * GiB) and report["peak_allocated_bytes"] == 20 * GiB
    assert report["peak_held_bytes"] == use.peak_held_bytes and report["device_used_bytes"] == int(22.9 * GiB)
    assert "fits_cap" not in use.report()


def test_memory_used_by_other_processes_never_makes_a_peak_look_smaller() -> None:
    # The device reads less used than the allocator reserves (counters read a moment apart):
    # nothing outside the allocator, and the verdict falls back to the peak reservation.
    use = DeviceMemoryUse(GiB, 2 * GiB, 2 * GiB, GiB, 80 * GiB)
    assert use.outside_allocator_bytes == 0 and use.peak_held_bytes == 2 * GiB
    assert use.fits(2 * GiB) and not use.fits(2 * GiB - 1)


def test_inconsistent_memory_counters_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="peak_reserved_bytes"):
        DeviceMemoryUse(0, -1, 0, 0, GiB)
    with pytest.raises(ValueError, match=r"peak allocated \(\d+\) exceeds peak reserved"):
        DeviceMemoryUse(2 * GiB, GiB, GiB, GiB, 80 * GiB)
    with pytest.raises(ValueError, match="cap_bytes must be positive"):
        DeviceMemoryUse(GiB, GiB, GiB, GiB, 80 * GiB).fits(0)


def test_device_figures_exist_only_for_cuda() -> None:
    assert PeakMemory("cpu").device_memory() is None
    with pytest.raises(ValueError, match="needs a CUDA device, got cpu"):
        cuda_memory_use("cpu")
