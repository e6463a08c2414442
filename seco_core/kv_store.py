"""Where the stage-1 K/V checkpoints live, and where the gradients relayed into them go.

Every earlier chunk leaves, per decoder layer, a block of keys and values (the paper's
m'_i) that later chunks attend to. In stage 2 each later chunk's backward produces a
gradient for every block it attended to; those contributions are summed per block and,
when the block's own chunk comes up, relayed into its fresh K/V. This module owns the
blocks and their gradient sums, so that attention only asks for "the blocks of layer l,
on the compute device" and hands back "this block's gradient". What a store does is the
`KVStore` protocol; two plain classes implement it:

- `DeviceStore`: blocks stay on the compute device; contributions are added in place.
- `HostStore` (KV offload): blocks and gradient sums live in host memory, pinned when the
  compute device is CUDA. Blocks are copied in on one persistent copy stream, the next
  block (and the first block of the next layer) prefetched while the current one is in
  use; each gradient contribution is copied out asynchronously on a second stream and
  added into the host sum by a background thread once its copy event has fired, so the
  training thread never waits for a copy. Host buffers come from `HostBuffers`, a pool
  that a job keeps across its steps: pinning memory is a slow driver call, and after the
  first step of a given shape no step allocates host memory again.

Gradient sums are kept in float32 (or the blocks' dtype when wider): a block receives one
contribution per later chunk, i.e. up to hundreds at 128K tokens, and summing them in
bf16 would lose the small ones. A block's sums come into being with its first contribution,
which is taken as it is (device) or copied (host), never added to zeros: no zeroing pass,
and no sums held through stage 1 and the last chunk's activations, which is when the step's
memory peaks. Host sums are added on several threads (`SUM_THREADS`), slice by slice.

`StoreStats` (kept on the job's `HostBuffers`) counts what the overlap depends on: blocks
fetched, prefetch misses (a block that was not already on its way when attention asked for
it), copies not finished when they were needed, and waits for a free staging buffer.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gradient sums in at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


@dataclass(eq=False)
class KVBlock:
    """One earlier chunk's keys and values for one layer, and their gradient sums.

    key, value: (B, Hkv, n, D). key_grad, value_grad: same shape in `grad_dtype`, the sums
    of the contributions received so far; None until the first one arrives.
    """

    key: torch.Tensor
    value: torch.Tensor
    wants_grad: bool = False
    """A later chunk's backward must relay into this block, so its contributions are summed."""
    key_grad: torch.Tensor | None = None
    value_grad: torch.Tensor | None = None
    ready: Any = None
    """CUDA event: the copy of key and value into host memory has completed."""
    owned: list[torch.Tensor] = field(default_factory=list)
    """Pool buffers behind the tensors above (HostStore), returned on release."""

    @property
    def length(self) -> int:
        return int(self.key.shape[-2])

    @property
    def needs_grad(self) -> bool:
        return self.wants_grad


class KVStore(Protocol):
    """Where a call's K/V blocks and their gradient sums live (DeviceStore, HostStore).

    Stage 1 `put`s each chunk's K/V per layer; attention `stream`s a layer's blocks; stage 2
    `deposit`s each later chunk's gradient contribution into a block and `take_grads` when the
    block's own chunk comes up; `release` ends a block's life, `close` the call's.
    """

    def put(self, key: torch.Tensor, value: torch.Tensor, needs_grad: bool) -> KVBlock:
        """Stage 1: keep the chunk's K/V of one layer as a block."""
        ...

    def stream(
        self, blocks: list[KVBlock], layer: int, forward: bool, training: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The blocks' (key, value) on the compute device, in order (`forward`: in the
        forward pass, else in its backward)."""
        ...

    def deposit(self, block: KVBlock, key_grad: torch.Tensor, value_grad: torch.Tensor) -> None:
        """Add one later chunk's gradient contribution to the block's sums."""
        ...

    def take_grads(self, block: KVBlock) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The block's summed gradients on the compute device (None: it received none)."""
        ...

    def release(self, block: KVBlock) -> None:
        """The block is no longer anyone's prefix."""
        ...

    def attach(self, layers: list[list[KVBlock]]) -> None:
        """The per-layer block lists (a store may prefetch across layers)."""
        ...

    def close(self) -> None:
        """End of the call: wait for outstanding work."""
        ...


class DeviceStore:
    """A KVStore on the compute device; the first gradient contribution becomes the sum, later
    ones are added in place."""

    def put(self, key: torch.Tensor, value: torch.Tensor, needs_grad: bool) -> KVBlock:
        """Stage 1: keep the chunk's K/V (detached) as a block; its gradient sums start with
        its first contribution."""
        return KVBlock(key.detach(), value.detach(), wants_grad=needs_grad)

    def stream(
        self, blocks: list[KVBlock], layer: int, forward: bool, training: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The blocks' (key, value) on the compute device, in order. `training`: the attention
        call was made with grad enabled (its backward will stream them again)."""
        for block in blocks:
            yield block.key, block.value

    def deposit(self, block: KVBlock, key_grad: torch.Tensor, value_grad: torch.Tensor) -> None:
        """Add one later chunk's gradient contribution to the block's sums.

        The store takes the contribution over: the first one is kept as the sum itself
        (converted to `grad_dtype` if narrower), as autograd does with a leaf's first grad.
        """
        if block.key_grad is None or block.value_grad is None:
            dtype = grad_dtype(block.key.dtype)
            block.key_grad, block.value_grad = key_grad.to(dtype), value_grad.to(dtype)
            return
        block.key_grad.add_(key_grad)
        block.value_grad.add_(value_grad)

    def take_grads(self, block: KVBlock) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Stage 2, when the block's own chunk comes up: its summed gradients on the compute device."""
        if block.key_grad is None or block.value_grad is None:
            return None
        return block.key_grad, block.value_grad

    def release(self, block: KVBlock) -> None:
        """The block is no longer anyone's prefix."""

    def attach(self, layers: list[list[KVBlock]]) -> None:
        """The per-layer block lists, for prefetching across layers (HostStore)."""

    def close(self) -> None:
        """End of the call: wait for outstanding work (before the remaining blocks are released)."""


@dataclass
class StoreStats:
    """What a host store's overlap of copies and compute depends on, counted over the pool's
    life (`HostBuffers.stats`; `reset()` between steps to count one step)."""

    blocks_fetched: int = 0
    """Blocks copied to the compute device."""
    prefetch_misses: int = 0
    """Blocks that attention asked for before any copy of them had been started (the
    copy then starts on demand and the compute stream waits for all of it)."""
    prefetch_late: int = 0
    """CUDA: blocks whose prefetched copy had not finished when attention needed them."""
    ring_waits: int = 0
    """Deposits that found every staging buffer in flight and waited for the host sums."""
    contributions: int = 0
    """Gradient contributions received (each one block's K and V from one later chunk)."""
    first_copies: int = 0
    """Of those, the first of their block: copied into the sums, not added to zeros."""

    def reset(self) -> None:
        for name in self.as_dict():
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class HostBuffers:
    """A pool of host buffers for offloaded blocks, gradient sums and copy staging.

    Pinned (page-locked) when `pin` is asked for, so that copies to and from the GPU are
    asynchronous. Buffers are sized for a whole chunk and handed out as views, so a
    shorter last chunk reuses them too. Keep one pool per job and pass it to every step
    (`chunked_backward(..., host_buffers=pool)`); `release()` or dropping it frees them.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[Any, ...], list[tuple[torch.Tensor, Any]]] = {}
        self._lock = threading.Lock()
        self.allocations = 0
        """Buffers allocated so far (a steady job stops allocating after its first step)."""
        self.bytes_allocated = 0
        self.stats = StoreStats()
        """Counters of every store that used this pool (see `StoreStats`)."""

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
        """A buffer of `shape` and `dtype` (contents undefined), reused when one is free."""
        key = (tuple(shape), dtype, pin)
        with self._lock:
            free = self._free.get(key)
            item = free.pop() if free else None
        if item is not None:
            buffer, released = item
            if released is not None:
                released.synchronize()  # a copy that still read it when it was given back (long done)
            return buffer
        buffer = torch.empty(shape, dtype=dtype, pin_memory=pin)
        with self._lock:
            self.allocations += 1
            self.bytes_allocated += buffer.numel() * buffer.element_size()
        return buffer

    def give(self, buffer: torch.Tensor, released: Any = None) -> None:
        """Return a buffer; `released` (a CUDA event) marks the end of the last copy reading it."""
        key = (tuple(buffer.shape), buffer.dtype, buffer.is_pinned())
        with self._lock:
            self._free.setdefault(key, []).append((buffer, released))

    def release(self) -> None:
        """Free every buffer now (the job is over)."""
        with self._lock:
            self._free.clear()


STAGING_BUFFERS = 32
"""Copy-out buffers per shape: gradient contributions in flight to host memory at once.
When all are in flight (the host additions fall behind), the next deposit waits."""


SUM_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))
"""Threads that add contributions into host sums. One thread adds ~0.5 G float32 elements/s,
which at 128K tokens (~1.3e11 additions a step) is minutes a step; the work splits into
independent slices and host memory bandwidth allows several."""
SUM_SLICE = 1 << 20
"""Elements per slice of one addition (4 MiB of float32): smaller additions stay on one thread."""


@dataclass
class _Job:
    """Contributions copied out under one event, to be added (or, first, copied) into their host sums."""

    ready: Any
    adds: list[tuple[torch.Tensor, torch.Tensor, bool]]  # (staged contribution, host sum, first)
    staging: list[tuple[torch.Tensor, queue.Queue[torch.Tensor]]]  # buffers and the ring they return to


@dataclass
class _Prefetched:
    block: KVBlock
    key: torch.Tensor
    value: torch.Tensor
    ready: Any


def _sum_slice(total: torch.Tensor, staged: torch.Tensor, first: bool) -> None:
    if first:
        total.copy_(staged)
    else:
        total.add_(staged)


class _Accumulator(threading.Thread):
    """Adds copied-out gradient contributions into host sums, off the training thread.

    Jobs are taken in order (a block's first contribution is copied before any is added),
    and each job's additions are split into slices summed on `threads` threads at once.
    """

    def __init__(self, threads: int = SUM_THREADS) -> None:
        super().__init__(name="seco-kv-grad-accumulator", daemon=True)
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.error: BaseException | None = None
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="seco-kv-grad-sum") if threads > 1 else None

    def _add(self, adds: list[tuple[torch.Tensor, torch.Tensor, bool]]) -> None:
        """Every (staged, total) pair of a job, as slices spread over the threads."""
        slices: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
        for staged, total, first in adds:
            flat_total, flat_staged = total.view(-1), staged.view(-1)
            n = flat_total.numel()
            step = max(SUM_SLICE, -(-n // self.threads))
            slices.extend((flat_total[s : s + step], flat_staged[s : s + step], first) for s in range(0, n, step))
        if self._pool is None or len(slices) == 1:
            for args in slices:
                _sum_slice(*args)
            return
        for future in [self._pool.submit(_sum_slice, *args) for args in slices]:
            future.result()

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                if job.ready is not None:
                    job.ready.synchronize()  # this thread waits for the copy; the training thread does not
                if self.error is None:
                    self._add(job.adds)
            except BaseException as e:  # reported to the training thread at the next flush
                self.error = e
            finally:
                for buffer, ring in job.staging:
                    ring.put(buffer)
                self.jobs.task_done()
        self.jobs.task_done()

    def flush(self) -> None:
        """Wait until every queued contribution has been added."""
        self.jobs.join()
        if self.error is not None:
            raise RuntimeError("adding K/V gradients in host memory failed") from self.error

    def stop(self) -> None:
        self.jobs.put(None)
        self.join()
        if self._pool is not None:
            self._pool.shutdown()


def _current_graph_task_id() -> int:
    """-1 outside a backward pass; torch's own marker, read defensively (a private API)."""
    query = getattr(torch._C, "_current_graph_task_id", None)
    return int(query()) if query is not None else -1


_COPY_STREAMS: dict[torch.device, tuple[Any, Any]] = {}


def copy_streams(device: torch.device) -> tuple[Any, Any]:
    """One persistent (host-to-device, device-to-host) stream pair per GPU: the two
    directions use separate copy engines, so fetching blocks and sending gradients overlap."""
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
    return _COPY_STREAMS[device]


class HostStore:
    """A KVStore for KV offload: blocks and float32 gradient sums in host memory, streamed
    block by block.

    On a CPU compute device the same code runs with plain copies and no events, which is
    what the CPU tests exercise; the asynchrony only exists on CUDA.
    """

    def __init__(self, device: torch.device, chunk_size: int, buffers: HostBuffers | None = None) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.chunk_size = chunk_size
        self.buffers = buffers if buffers is not None else HostBuffers()
        self.stats = self.buffers.stats
        self.layers: list[list[KVBlock]] = []
        self._ahead: tuple[int, _Prefetched] | None = None  # the next layer's first block, being copied in
        self._rings: dict[tuple[Any, ...], queue.Queue[torch.Tensor]] = {}
        self._accumulator = _Accumulator()
        self._accumulator.start()
        if self.cuda:
            self.h2d, self.d2h = copy_streams(device)

    def attach(self, layers: list[list[KVBlock]]) -> None:
        self.layers = layers

    # ------------------------------------------------------------------ buffers

    def _capacity(self, like: torch.Tensor) -> int:
        """Elements of a chunk-sized buffer for tensors shaped like `like` (B, H, n, D)."""
        b, h, n, d = like.shape
        return b * h * max(n, self.chunk_size) * d

    def _host(self, like: torch.Tensor, dtype: torch.dtype, owned: list[torch.Tensor]) -> torch.Tensor:
        """A flat chunk-sized pool buffer viewed as `like`'s shape: contiguous whatever the
        length, so copies to and from the device stay single asynchronous transfers."""
        buffer = self.buffers.take((self._capacity(like),), dtype, pin=self.cuda)
        owned.append(buffer)
        return buffer[: like.numel()].view(like.shape)

    def _stage(self, like: torch.Tensor, staging: list[tuple[torch.Tensor, queue.Queue[torch.Tensor]]]) -> torch.Tensor:
        """A copy-out buffer shaped like `like`, from a fixed ring (allocated on first use)."""
        key = (self._capacity(like), like.dtype)
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = queue.Queue()
            for _ in range(STAGING_BUFFERS):
                ring.put(self.buffers.take((key[0],), like.dtype, pin=self.cuda))
        try:
            buffer = ring.get_nowait()
        except queue.Empty:
            self.stats.ring_waits += 1
            buffer = ring.get()  # waits while every buffer of the ring is in flight
        staging.append((buffer, ring))
        return buffer[: like.numel()].view(like.shape)

    def _copy_out(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        """Copy device tensors into host buffers, asynchronously on CUDA; returns the copy's event."""
        if not self.cuda:
            for dst, src in pairs:
                dst.copy_(src)
            return None
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))  # the sources are computed
        with torch.cuda.stream(self.d2h):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
                src.record_stream(self.d2h)  # keep the device memory until the copy has read it
            event = torch.cuda.Event()
            event.record(self.d2h)
        return event

    # ------------------------------------------------------------------ the store

    def put(self, key: torch.Tensor, value: torch.Tensor, needs_grad: bool) -> KVBlock:
        owned: list[torch.Tensor] = []
        host_key, host_value = self._host(key, key.dtype, owned), self._host(value, value.dtype, owned)
        ready = self._copy_out([(host_key, key.detach()), (host_value, value.detach())])
        return KVBlock(host_key, host_value, wants_grad=needs_grad, ready=ready, owned=owned)

    def _fetch(self, block: KVBlock) -> _Prefetched:
        """Start copying a block to the compute device (on CUDA, on the copy stream)."""
        self.stats.blocks_fetched += 1
        return self._copy_in(block)

    def _copy_in(self, block: KVBlock) -> _Prefetched:
        if not self.cuda:
            return _Prefetched(block, block.key, block.value, None)
        with torch.cuda.stream(self.h2d):
            if block.ready is not None:
                self.h2d.wait_event(block.ready)  # its stage-1 copy into host memory has landed
            key = block.key.to(self.device, non_blocking=True)
            value = block.value.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.h2d)
        return _Prefetched(block, key, value, ready)

    def _take(self, layer: int, block: KVBlock) -> _Prefetched:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == layer and ahead[1].block is block:
            return ahead[1]
        self.stats.prefetch_misses += 1
        return self._fetch(block)

    def _next_layer(self, layer: int, forward: bool, training: bool) -> int:
        """The layer whose attention streams blocks next, to prefetch its first block.

        Forward goes up the layers; after the last one, stage 2 (`training`) turns into that
        layer's backward and stage 1 (no grad) into the next chunk's layer 0. A forward
        inside a backward is a checkpointed layer's recomputation: its own backward follows.
        Backward goes down; after layer 0 the next chunk's forward starts at layer 0 again.
        """
        in_backward = _current_graph_task_id() != -1
        if forward and not in_backward and layer + 1 < len(self.layers):
            return layer + 1
        if forward:
            return layer if in_backward or training else 0
        return max(layer - 1, 0)

    def stream(
        self, blocks: list[KVBlock], layer: int, forward: bool, training: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each block on the device, one at a time, the next one's copy already under way.

        After the last block, the first block of the layer that runs next (the next layer
        in a forward pass, the previous one in backward) is prefetched as well.
        """
        current = self._take(layer, blocks[0]) if blocks else None
        for i in range(len(blocks)):
            assert current is not None
            if i + 1 < len(blocks):
                upcoming: _Prefetched | None = self._fetch(blocks[i + 1])
            else:
                upcoming = None
                nxt = self._next_layer(layer, forward, training)
                if 0 <= nxt < len(self.layers) and self.layers[nxt]:
                    self._ahead = (nxt, self._fetch(self.layers[nxt][0]))
            if self.cuda:
                main = torch.cuda.current_stream(self.device)
                if not current.ready.query():
                    self.stats.prefetch_late += 1
                main.wait_event(current.ready)
                current.key.record_stream(main)
                current.value.record_stream(main)
            yield current.key, current.value
            current = upcoming

    def deposit(self, block: KVBlock, key_grad: torch.Tensor, value_grad: torch.Tensor) -> None:
        """Copy the contribution out (asynchronously) and queue its addition to the host sums;
        the block's first contribution is copied into newly taken sums instead."""
        first = block.key_grad is None or block.value_grad is None
        if first:
            dtype = grad_dtype(block.key.dtype)
            block.key_grad = self._host(block.key, dtype, block.owned)
            block.value_grad = self._host(block.value, dtype, block.owned)
            self.stats.first_copies += 1
        assert block.key_grad is not None and block.value_grad is not None
        self.stats.contributions += 1
        staging: list[tuple[torch.Tensor, queue.Queue[torch.Tensor]]] = []
        staged_key, staged_value = self._stage(key_grad, staging), self._stage(value_grad, staging)
        copied = self._copy_out([(staged_key, key_grad), (staged_value, value_grad)])
        adds = [(staged_key, block.key_grad, first), (staged_value, block.value_grad, first)]
        self._accumulator.jobs.put(_Job(copied, adds, staging))

    def take_grads(self, block: KVBlock) -> tuple[torch.Tensor, torch.Tensor] | None:
        if block.key_grad is None or block.value_grad is None:
            return None
        self._accumulator.flush()  # queued while later chunks ran: normally long done
        if not self.cuda:
            return block.key_grad.clone(), block.value_grad.clone()  # the buffers go back to the pool
        with torch.cuda.stream(self.h2d):
            key_grad = block.key_grad.to(self.device, non_blocking=True)
            value_grad = block.value_grad.to(self.device, non_blocking=True)
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.h2d)
        key_grad.record_stream(main)
        value_grad.record_stream(main)
        return key_grad, value_grad

    def release(self, block: KVBlock) -> None:
        released = None
        if self.cuda:  # copies reading these buffers may still be queued on the copy stream
            released = torch.cuda.Event()
            released.record(self.h2d)
        for buffer in block.owned:
            self.buffers.give(buffer, released)
        block.owned = []
        if self._ahead is not None and self._ahead[1].block is block:
            self._ahead = None

    def close(self) -> None:
        try:
            self._accumulator.flush()
        finally:
            self._accumulator.stop()
            self._ahead = None
            released = None
            if self.cuda:  # the last copies out of the staging buffers have been waited for by flush
                released = torch.cuda.Event()
                released.record(self.d2h)
            for ring in self._rings.values():
                while not ring.empty():
                    self.buffers.give(ring.get(), released)
            self._rings.clear()


class LayerPrefix:
    """The earlier chunks' blocks that one layer's attention reads, and the store keeping them.

    A snapshot of the layer's block list when the attention call is made, so forward and
    backward (which may run much later, on another thread) index the same blocks.
    """

    def __init__(self, store: KVStore, blocks: list[KVBlock], layer: int) -> None:
        self.store = store
        self.blocks = list(blocks)
        self.layer = layer
        self.training = torch.is_grad_enabled()
        """Taken where attention is called: inside the autograd Function's forward grad is off."""

    @classmethod
    def empty(cls) -> LayerPrefix:
        return cls(DeviceStore(), [], 0)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def length(self) -> int:
        """Tokens in the prefix."""
        return sum(b.length for b in self.blocks)

    def stream(self, forward: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each block's (key, value) on the compute device, in order."""
        if self.blocks:
            yield from self.store.stream(self.blocks, self.layer, forward, self.training)

    def deposit(self, i: int, key_grad: torch.Tensor, value_grad: torch.Tensor) -> None:
        """Block i's gradient from this chunk; dropped when no later relay needs it."""
        if self.blocks[i].needs_grad:
            self.store.deposit(self.blocks[i], key_grad, value_grad)
