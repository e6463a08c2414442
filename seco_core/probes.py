"""Peak-memory and timing probes that work the same way on CUDA and on CPU.

The worker streams `peak_memory_bytes` per optimizer step and the benchmark compares
methods by their peak; both need "the most memory this step needed", measured from a
known starting point:

- CUDA: the caching allocator's own counters (`torch.cuda.max_memory_allocated`), reset
  with `torch.cuda.reset_peak_memory_stats`. This counts tensors only, not the CUDA
  context or allocator fragmentation, which is what a memory plan budgets separately.
  Whether a step fits a card is a different question, answered by `DeviceMemoryUse`:
  the allocator's peak reservation plus what the process holds outside the allocator.
- CPU (Linux): the process's peak resident set size. The kernel keeps it as VmHWM in
  /proc/self/status, and writing "5" to /proc/self/clear_refs resets VmHWM to the
  current RSS, so a peak can be measured per step.
- CPU elsewhere: `resource.getrusage(...).ru_maxrss`, which cannot be reset: the peak
  is then the peak of the whole process so far (`resettable` is False).

Usage::

    probe = PeakMemory("cpu")       # resets on construction
    ...                             # the step
    probe.peak_extra_bytes          # peak minus the usage at the last reset
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    """A `VmXXX:  123 kB` line of /proc/self/status in KiB, or None off Linux."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def current_rss_bytes() -> int:
    """The process's resident set size now (VmRSS; psutil where /proc is missing)."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil  # only needed off Linux

    return int(psutil.Process().memory_info().rss)


def _ru_maxrss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter number for the mmap threshold."""


def return_freed_memory_to_os(threshold_bytes: int = 64 * 1024) -> bool:
    """Serve allocations of `threshold_bytes` and more with mmap, so freeing them unmaps them.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after
    which such blocks come from the heap and stay resident when freed: a CPU training
    process then keeps the high-water mark of every tensor size it ever used, RSS no
    longer tracks live tensors (a 4096-token step of the demo model measured 26 MiB above
    its baseline against 10.5 MiB of live tensors), and a CPU worker holds memory its host
    could use. A fixed threshold stops that. Returns False where glibc is not the C library.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@dataclass(frozen=True)
class DeviceMemoryUse:
    """What a CUDA process used at its peak, counted three ways.

    `max_memory_allocated` (tensors) understates what a card must hold: the caching
    allocator reserves whole segments (its peak is `max_memory_reserved`), and the CUDA
    context, cuBLAS/cuDNN workspaces and kernel images live outside the allocator. Only
    `torch.cuda.mem_get_info` sees those: the device's used memory minus what the
    allocator reserves now is that outside part. Whether a step fits a 24 GiB card is
    decided on `peak_held_bytes`, the allocator's peak reservation plus the outside part.
    `mem_get_info` is device-wide: on a device shared with other processes their memory
    counts as this one's (the verdict then errs towards "does not fit").
    """

    peak_allocated_bytes: int
    """Peak bytes of live tensors (`torch.cuda.max_memory_allocated`)."""
    peak_reserved_bytes: int
    """Peak bytes the caching allocator reserved (`torch.cuda.max_memory_reserved`)."""
    reserved_bytes: int
    """Bytes the caching allocator reserves now (`torch.cuda.memory_reserved`)."""
    device_used_bytes: int
    """Device memory in use now, every process and the CUDA context included (total - free)."""
    device_total_bytes: int
    """The device's memory (`torch.cuda.mem_get_info`)."""

    def __post_init__(self) -> None:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        negative = [name for name, value in fields.items() if value < 0]
        if negative:
            raise ValueError(f"memory counters must not be negative: {', '.join(negative)}")
        if self.peak_allocated_bytes > self.peak_reserved_bytes:
            raise ValueError(
                f"peak allocated ({self.peak_allocated_bytes}) exceeds peak reserved ({self.peak_reserved_bytes}):"
                " the counters were not read together (reset between them?)"
            )

    @property
    def outside_allocator_bytes(self) -> int:
        """What the process holds beyond the allocator's reservation: context, workspaces, libraries."""
        return max(0, self.device_used_bytes - self.reserved_bytes)

    @property
    def peak_held_bytes(self) -> int:
        """The most device memory the process held: peak reservation plus the outside part."""
        return self.peak_reserved_bytes + self.outside_allocator_bytes

    def fits(self, cap_bytes: int) -> bool:
        """Whether a card of `cap_bytes` could have held this peak (held, not allocated)."""
        if cap_bytes <= 0:
            raise ValueError(f"cap_bytes must be positive, got {cap_bytes}")
        return self.peak_held_bytes <= cap_bytes

    def report(self, cap_bytes: int | None = None) -> dict[str, int | bool]:
        """The figures as one flat dict (JSON-ready), with the verdict when a cap is given."""
        out: dict[str, int | bool] = {
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "device_used_bytes": self.device_used_bytes,
            "outside_allocator_bytes": self.outside_allocator_bytes,
            "peak_held_bytes": self.peak_held_bytes,
        }
        if cap_bytes is not None:
            out["fits_cap"] = self.fits(cap_bytes)
        return out


def cuda_memory_use(device: str | torch.device) -> DeviceMemoryUse:
    """Read `DeviceMemoryUse` for a CUDA device now (peaks since the last reset_peak_memory_stats)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"cuda_memory_use needs a CUDA device, got {dev}")
    index = _cuda_index(dev)
    torch.cuda.synchronize(index)
    free, total = torch.cuda.mem_get_info(index)
    return DeviceMemoryUse(
        peak_allocated_bytes=int(torch.cuda.max_memory_allocated(index)),
        peak_reserved_bytes=int(torch.cuda.max_memory_reserved(index)),
        reserved_bytes=int(torch.cuda.memory_reserved(index)),
        device_used_bytes=int(total - free),
        device_total_bytes=int(total),
    )


class PeakMemory:
    """Peak memory since the last `reset()`, on a CUDA device or for the CPU process.

    `baseline_bytes` is the usage at the last reset (allocated tensors on CUDA, RSS on
    CPU); `peak_extra_bytes` is what the work after the reset added on top of it, the
    figure to compare between methods that start from the same model.
    Also a context manager: `with PeakMemory(dev) as probe: ...` resets on entry.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        self.baseline_bytes = 0
        self.resettable = True
        self.reset()

    def reset(self) -> None:
        """Start a new measurement: the peak becomes the current usage."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = int(torch.cuda.memory_allocated(self.device))
        else:
            self.resettable = _reset_rss_peak()
            self.baseline_bytes = current_rss_bytes()

    def current_bytes(self) -> int:
        """Usage now: allocated tensor bytes on CUDA, resident set size on CPU."""
        if self.is_cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return current_rss_bytes()

    def peak_bytes(self) -> int:
        """Highest usage since the last reset (since process start if not `resettable`)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.resettable:
            kib = _status_kib("VmHWM")
            if kib is not None:
                return kib * 1024
        return _ru_maxrss_bytes()

    def device_memory(self) -> DeviceMemoryUse | None:
        """Allocated, reserved and device-wide peaks since the last reset (None on CPU, where RSS is all)."""
        return cuda_memory_use(self.device) if self.is_cuda else None

    @property
    def peak_extra_bytes(self) -> int:
        """Peak minus the usage at the last reset (never negative)."""
        return max(0, self.peak_bytes() - self.baseline_bytes)

    def __enter__(self) -> PeakMemory:
        self.reset()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


def synchronize(device: str | torch.device) -> None:
    """Wait for queued CUDA kernels so wall-clock time covers the work (no-op on CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Stopwatch:
    """Wall-clock timer that synchronises CUDA at start and stop.

    CUDA kernels run asynchronously: without a synchronisation, `perf_counter` would
    measure how long it took to queue the step, not to run it.

    >>> with Stopwatch("cpu") as sw:
    ...     pass
    >>> sw.seconds >= 0.0
    True
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._start: float | None = None
        self.seconds = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def stop(self) -> float:
        """Stop and return the seconds since `start()` (also kept in `.seconds`)."""
        if self._start is None:
            raise RuntimeError("Stopwatch.stop() called before start()")
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
        self._start = None
        return self.seconds

    def __enter__(self) -> Stopwatch:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
