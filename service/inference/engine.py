"""The one model thread: every model call of every request, interleaved step by step.

Requests arrive from the HTTP handlers (asyncio) as `Job`s; adapter loads and unloads as
commands. The thread runs commands first, then one step of each running job in turn (a
prefill chunk or one decoded token, `seco_core.generate.Generation.step`), picking the
job's weights (its adapter or the base) before the step. Each job has its own KV cache and
sampling generator, so what it produces does not depend on what else runs: exactly what it
would get alone. A job whose client went away is cancelled between two steps, and its
cache is freed. Results go back to the handler's asyncio queue through its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from seco_core.generate import Generation, SamplingParams
from service.inference.errors import OpenAIError
from service.inference.models import KnownAdapter, ServedModel

log = logging.getLogger(__name__)


@dataclass
class Update:
    """What a job sends its handler: new text, and at the end the finish reason and token counts."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: OpenAIError | None = None
    started: bool = False  # the job was admitted (its adapter loaded): the response can begin

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class Job:
    """One request in the engine."""

    served: ServedModel
    adapter: KnownAdapter | None
    input_ids: list[int]
    params: SamplingParams
    emit: Callable[[Update], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    generation: Generation | None = None

    def cancel(self) -> None:
        """Ask the engine to stop this job at its next step (thread-safe)."""
        self.cancelled.set()


@dataclass
class EngineStats:
    """Counters for /stats: what the engine did, to watch it from outside."""

    running: int = 0
    started: int = 0
    finished: int = 0
    cancelled: int = 0
    tokens_generated: int = 0
    steps: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def asyncio_emitter(q: asyncio.Queue[Update]) -> Callable[[Update], None]:
    """An `emit` that hands updates to an asyncio queue from the model thread."""
    loop = asyncio.get_running_loop()

    def emit(update: Update) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
            loop.call_soon_threadsafe(q.put_nowait, update)

    return emit


class Engine:
    """Owns the models' thread; `submit` a job, `call` a function on the thread (adapter loads)."""

    def __init__(self, prefill_chunk: int) -> None:
        self.prefill_chunk = prefill_chunk
        self.stats = EngineStats()
        self._inbox: queue.Queue[Job | tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue()
        self._jobs: list[Job] = []
        self._pending_removal: set[tuple[ServedModel, str]] = set()
        self._thread = threading.Thread(target=self._run, name="seco-serve-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> Job:
        self._inbox.put(job)
        return job

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn` on the model thread, between two steps; its result (or exception) in the future."""
        fut: Future[Any] = Future()
        self._inbox.put((fn, fut))
        return fut

    def busy_adapters(self, served: ServedModel) -> set[str]:
        """Adapters held by running jobs of `served` (never evicted under them). Model thread only."""
        return {j.adapter.name for j in self._jobs if j.served is served and j.adapter is not None}

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            try:
                item = self._inbox.get_nowait() if self._jobs else self._inbox.get()
            except queue.Empty:  # nothing new: one round of steps, then look again
                self._round()
                continue
            if item is None:
                return
            self._take(item)

    def _take(self, item: Job | tuple[Callable[[], Any], Future[Any]]) -> None:
        if isinstance(item, Job):
            self._admit(item)
            return
        fn, fut = item
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as e:  # handed to the caller, which answers the request
            fut.set_exception(e)

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        try:
            if job.adapter is not None:
                job.served.ensure_loaded(job.adapter, self.busy_adapters(job.served))
            job.generation = Generation(
                model=job.served.model,
                input_ids=torch.tensor(job.input_ids, device=job.served.device),
                params=job.params,
                eos_token_ids=job.served.eos_token_ids,
                decode=job.served.decode,
                prefill_chunk=self.prefill_chunk,
            )
        except OpenAIError as e:
            job.emit(Update(error=e))
            return
        self._jobs.append(job)
        self.stats.started += 1
        self.stats.running = len(self._jobs)
        job.emit(Update(started=True))

    def _round(self) -> None:
        """One step of every running job, in turn."""
        for job in list(self._jobs):
            gen = job.generation
            assert gen is not None
            if job.cancelled.is_set():
                gen.cancel()
                self.stats.cancelled += 1
                self._drop(job)
                continue
            job.served.use(job.adapter.name if job.adapter else None)
            gen.model = job.served.model  # the first adapter wraps the base model in a PeftModel
            try:
                result = gen.step()
            except Exception as e:  # a failing forward ends this request only
                log.exception("generation failed")
                job.emit(Update(error=OpenAIError(500, f"generation failed: {e}", type="server_error")))
                self._drop(job)
                continue
            self.stats.steps += 1
            if result.token is not None:
                self.stats.tokens_generated += 1
            if result.finished:
                job.emit(
                    Update(
                        text=result.text,
                        finish_reason=gen.finish_reason,
                        prompt_tokens=gen.prompt_tokens,
                        completion_tokens=gen.completion_tokens,
                    )
                )
                self.stats.finished += 1
                self._drop(job)
            elif result.text:
                job.emit(Update(text=result.text))

    def _drop(self, job: Job) -> None:
        self._jobs.remove(job)
        self.stats.running = len(self._jobs)
        for served, name in list(self._pending_removal):
            if name not in self.busy_adapters(served):
                self._pending_removal.discard((served, name))
                served.remove(name)

    # ------------------------------------------------------------ adapters (run through `call`)

    def load(self, served: ServedModel, adapter: KnownAdapter) -> None:
        """Load `adapter` into `served` now (a load request), replacing an older one of that name."""
        self._pending_removal.discard((served, adapter.name))
        old = served.loaded.get(adapter.name)
        if old is not None and old != adapter:
            if adapter.name in self.busy_adapters(served):
                raise OpenAIError(409, f"adapter {adapter.name} is in use; unload it first", param="lora_name")
            served.remove(adapter.name)
        served.ensure_loaded(adapter, self.busy_adapters(served))

    def unload(self, served: ServedModel, name: str) -> None:
        """Delete adapter `name` from `served`, at once or when the last request using it ends."""
        if name in self.busy_adapters(served):
            self._pending_removal.add((served, name))
        else:
            served.remove(name)
