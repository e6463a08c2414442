"""Peak-memory and timing probes, on CPU (process peak RSS)."""

from __future__ import annotations

import sys
import time

import pytest
import torch

from seco_core.probes import PeakMemory, Stopwatch, current_rss_bytes
from tests.conftest import ROOT

MB = 1024 * 1024
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM reset is Linux-only")


@linux_only
def test_a_200mb_tensor_shows_up_in_the_peak_and_reset_forgets_it() -> None:
    probe = PeakMemory("cpu")
    assert probe.resettable
    assert probe.baseline_bytes > 0

    x = torch.ones(50 * MB, dtype=torch.float32)  # 200 MiB, every page touched by ones()
    assert x.numel() * 4 == 200 * MB
    del x
    extra = probe.peak_extra_bytes
    assert 195 * MB <= extra <= 260 * MB, extra / MB

    # A large tensor is mmapped and returned to the kernel on free, so after a reset the
    # peak is back near the current RSS.
    probe.reset()
    assert probe.peak_extra_bytes < 30 * MB, probe.peak_extra_bytes / MB
    assert abs(probe.baseline_bytes - current_rss_bytes()) < 30 * MB


@linux_only
def test_context_manager_resets_on_entry() -> None:
    # Both sizes lie above glibc's largest dynamic mmap threshold (32 MiB), so each tensor
    # gets fresh pages whatever earlier tests in this process freed: a 20 MiB tensor could
    # come from already-resident heap and add less than its size to the peak.
    with PeakMemory("cpu") as outer:
        y = torch.ones(40 * MB)  # 160 MiB
        del y
        assert outer.peak_extra_bytes >= 155 * MB
        with PeakMemory("cpu") as inner:
            z = torch.ones(10 * MB)  # 40 MiB
            del z
            assert 38 * MB <= inner.peak_extra_bytes < 80 * MB
    assert outer.peak_bytes() >= outer.baseline_bytes


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
    import subprocess

    code = (
        "import torch\n"
        "from seco_core.probes import current_rss_bytes, return_freed_memory_to_os\n"
        "assert return_freed_memory_to_os()\n"
        "for _ in range(3):\n"
        "    t = torch.ones(4 * 2**20)\n"
        "    held = current_rss_bytes()\n"
        "    del t\n"
        "    print(held - current_rss_bytes())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert all(int(freed) > 15 * 2**20 for freed in out.stdout.split()), out.stdout
