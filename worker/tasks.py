"""The Celery task: claim the next job, call the training loop, save what it produced.

Thin on purpose. The task `train_next` checks its message and calls `train_next_job`, plain
code that tests call too (with a stand-in for the training loop). Importing this module
stays light (no torch): `worker.trainer` is imported inside the task, in the child process
that runs it.

Guarantees:
- A task message means "a job is waiting": the worker starts the queued job that the
  fair order across tenants puts first (`Store.claim_next`, `service.record.scheduling`),
  which is not necessarily the job the message names.
- Only a `queued` job starts (atomic queued -> running); a message that finds no queued
  job (a duplicate delivery, a job cancelled meanwhile) does nothing.
- While training, a thread renews the job's lease. If this process dies the lease
  expires and a reaper (API or any worker) requeues the job, which resumes from its
  last checkpoint. If the lease is lost while we still run (a long stall), the job is
  someone else's: we stop and write nothing more.
- Any exception ends the job `failed` with a message; the worker process survives.
- A Redis outage shorter than the lease (e.g. a restart of a persistent Redis) does not
  interrupt training: reports wait for Redis to come back instead of crashing the job.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import redis
from celery.signals import worker_init, worker_ready, worker_shutdown

from seco_core.job_config import JobConfig
from service.archives import safe_extract
from service.record import ids
from service.record.model_sources import resolve_fine_tuned
from service.record.models import fine_tuned_model_name, parse_model_name
from service.record.outputs import measure_outputs
from service.record.private import private_dir, restrict_umask
from service.record.queue import LEGACY_TASK_NAMES, TASK_NAME, publish
from service.record.settings import Settings, get_settings
from service.record.stop_rule import stop_action
from service.record.storage import (
    ObjectNotFound,
    Storage,
    StorageError,
    keys,
    open_storage,
    scratch_dir,
    sweep_scratch,
)
from service.record.store import FileRecord, JobRecord, Store, now
from worker.celery_app import app
from worker.checkpoint_store import METRICS_CSV, prune_checkpoints, publish_checkpoint, restore_latest_checkpoint
from worker.spec import JobCancelled, JobPaused, TrainContext, TrainingError, TrainResult, TrainSpec

log = logging.getLogger(__name__)

# Set before any job imports torch (the pool children inherit it): a long job allocates
# blocks of many sizes (chunks, the shorter last chunk, streamed K/V blocks), and
# expandable segments let the CUDA caching allocator grow segments instead of
# fragmenting memory until a request no longer fits.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

TrainFn = Callable[[TrainSpec, TrainContext], TrainResult]
T = TypeVar("T")

# Redis unreachable or still loading its AOF: worth waiting for, unlike a wrong command.
STORE_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)
RETRY_SECONDS = 0.5


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@functools.cache
def _store(url: str, pid: int) -> Store:
    """One store per process (keyed by pid: a forked child never reuses its parent's sockets)."""
    return Store.from_url(url, name="seco-worker")


def process_store(settings: Settings) -> Store:
    assert settings.redis_url, "REDIS_URL is not set"
    return _store(settings.redis_url, os.getpid())


_storages: dict[tuple[str | None, str, int], Storage] = {}


def process_storage(settings: Settings) -> Storage:
    """One storage client per process (a forked child opens its own connections)."""
    key = (settings.storage_url, str(settings.data_dir), os.getpid())
    if key not in _storages:
        _storages[key] = open_storage(settings)
    return _storages[key]


# --------------------------------------------------------------------------- lease


class LeaseKeeper(threading.Thread):
    """Renews the job's lease every lease/3 seconds; `lost` once the job is no longer ours."""

    def __init__(self, store: Store, job_id: str, worker_id: str, lease_seconds: float) -> None:
        super().__init__(name=f"lease-{job_id}", daemon=True)
        self.store, self.job_id, self.worker_id = store, job_id, worker_id
        self.lease_seconds = lease_seconds
        self.lost = False
        self._stop_event = threading.Event()

    def run(self) -> None:
        wait = self.lease_seconds / 3
        while not self._stop_event.wait(wait):
            try:
                if not self.store.refresh_lease(self.job_id, self.worker_id, self.lease_seconds):
                    self.lost = True
                    log.error("lost the lease of job %s; stopping work on it", self.job_id)
                    return
                wait = self.lease_seconds / 3
            except Exception as e:  # Redis briefly down: retry soon, so the lease is renewed as it comes back
                log.warning("could not renew the lease of job %s: %s", self.job_id, e)
                wait = min(RETRY_SECONDS, self.lease_seconds / 3)

    def stop(self) -> None:
        self._stop_event.set()


# --------------------------------------------------------------------------- context


class StoreContext:
    """The `TrainContext` the training loop reports through, backed by the store."""

    CANCEL_POLL_SECONDS = 0.25

    def __init__(
        self,
        store: Store,
        rec: JobRecord,
        worker_id: str,
        lease: LeaseKeeper,
        storage: Storage,
        output_dir: Path,
        keep_checkpoints: int = 3,
    ) -> None:
        self.store, self.job_id, self.tenant, self.worker_id = store, rec.id, rec.tenant, worker_id
        self.lease = lease
        self.storage = storage
        self.output_dir = output_dir
        self.keep_checkpoints = keep_checkpoints
        self._flags_checked = 0.0
        self._cancel = False
        self._pause = False

    def persist(self, call: Callable[[], T]) -> T:
        """`call()` against the store, riding out a Redis outage while the lease may still be valid.

        Redis restarting (with its AOF) must not fail a job that trains fine: the report
        waits for it. Once the outage has outlasted the lease the job is the reaper's to
        requeue, so the error is raised and this attempt ends.
        """
        deadline = time.monotonic() + self.lease.lease_seconds
        while True:
            try:
                return call()
            except STORE_DOWN as e:
                if self.lease.lost or time.monotonic() >= deadline:
                    raise
                log.warning("job store unavailable (%s); retrying", type(e).__name__, extra={"job_id": self.job_id})
                time.sleep(RETRY_SECONDS)

    def message(self, text: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        if not self.lease.lost:
            self.persist(lambda: self.store.add_event(self.job_id, text, level=level, data=data))

    def metrics(self, data: dict[str, Any]) -> None:
        """One metrics event; step 0 (the starting model's validation, before training) says so."""
        step, total = data.get("step"), data.get("total_steps")
        msg = f"Step {step}/{total}" if total else f"Step {step}"
        if step == 0:
            msg += " (the starting model, before training)"
        parts = []
        if isinstance(data.get("train_loss"), int | float):
            parts.append(f"training loss={data['train_loss']:.4f}")
        if isinstance(data.get("valid_loss"), int | float):
            parts.append(f"validation loss={data['valid_loss']:.4f}")
        if isinstance(data.get("reward_margin"), int | float):  # DPO
            parts.append(
                f"reward margin={data['reward_margin']:.4f}, reward accuracy={data.get('reward_accuracy', 0):.2f}"
            )
        if parts:
            msg += ": " + ", ".join(parts)
        self.persist(lambda: self.store.add_metrics(self.job_id, self.worker_id, data, msg))

    def progress(self, step: int, total_steps: int, trained_tokens: int, eta_seconds: float | None) -> None:
        fields = {
            "step": step,
            "total_steps": total_steps,
            "trained_tokens": trained_tokens,
            "progress": round(step / total_steps, 6) if total_steps else "",
            "estimated_finish": int(time.time() + eta_seconds) if eta_seconds is not None else "",
        }
        self.persist(lambda: self.store.update_running(self.job_id, self.worker_id, fields))

    def hyperparameters(self, resolved: dict[str, Any]) -> None:
        if not self.lease.lost:
            self.persist(lambda: self.store.resolve_hyperparameters(self.job_id, self.worker_id, resolved))

    def checkpoint_saved(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        """Publish the checkpoint to storage (marker last), record it, prune the oldest
        beyond SECO_KEEP_CHECKPOINTS, and count what the job's outputs now take."""
        if self.lease.lost:
            return
        key = publish_checkpoint(self.storage, self.tenant, self.job_id, path, self.output_dir / METRICS_CSV)
        self.persist(lambda: self.store.add_checkpoint(self.job_id, step, key, metrics))
        self.persist(lambda: self.store.add_event(self.job_id, f"Checkpoint saved at step {step}", data={"step": step}))
        pruned = prune_checkpoints(self.storage, self.tenant, self.job_id, self.keep_checkpoints)
        self.persist(lambda: self.store.remove_checkpoints(self.job_id, pruned))
        size = self.storage.size_under(keys.job_prefix(self.tenant, self.job_id))
        self.persist(lambda: self.store.set_output_bytes(self.job_id, self.tenant, size))

    def _read_stop_flags(self) -> None:
        """The job's cancel and pause flags, both in one Redis read at most every 0.25 s (the loop
        asks for a cancel before each window and for a pause after each step); a flag once seen
        stays set."""
        t = time.monotonic()
        if not (self._cancel and self._pause) and t - self._flags_checked >= self.CANCEL_POLL_SECONDS:
            self._flags_checked = t
            cancel, pause = self.persist(lambda: self.store.stop_requests(self.job_id))
            self._cancel, self._pause = self._cancel or cancel, self._pause or pause

    def cancelled(self) -> bool:
        """A cancel request or a lost lease."""
        if self.lease.lost:
            return True
        self._read_stop_flags()
        return stop_action(self._cancel, self._pause) == "cancel"

    def pause_requested(self) -> bool:
        """A pause request with no cancel pending (`stop_rule`: cancel wins, so the loop goes on to
        its cancel check instead of writing a checkpoint to pause); asked once per optimizer step."""
        self._read_stop_flags()
        return stop_action(self._cancel, self._pause) == "pause"


# --------------------------------------------------------------------------- the job


def _auto(value: Any) -> Any:
    return None if value == "auto" else value


def build_spec(
    rec: JobRecord, settings: Settings, store: Store, storage: Storage, scratch: Path, *, resuming: bool = False
) -> TrainSpec:
    """Resolve names to paths (model registry, file records); a user never sends a path.

    The job's files come from storage into `scratch/inputs/` (the local back-end hands
    out the stored file itself); its outputs go to `scratch/out/`. `resuming`: the job's own
    checkpoint is restored there, so the fine-tuned model it started from is not fetched.
    """
    model_path = settings.models.get(rec.base_model)
    if model_path is None:
        raise TrainingError(
            f"Model {rec.base_model!r} is not configured on this worker (SECO_MODELS)",
            code="model_not_available",
            param="model",
        )

    def file_path(file_id: str | None, param: str) -> Path | None:
        if file_id is None:
            return None
        frec = store.get_file(file_id, rec.tenant)
        try:
            if frec is None:
                raise ObjectNotFound(file_id)
            return storage.fetch(frec.path, scratch / "inputs" / file_id)
        except ObjectNotFound:
            raise TrainingError(f"{param} {file_id!r} no longer exists", code="file_not_found", param=param) from None

    training = file_path(rec.training_file, "training_file")
    assert training is not None
    start_adapter = scratch / "inputs" / "start-adapter"
    hp = rec.hyperparameters
    try:
        seco = JobConfig.from_dict(rec.seco)
    except ValueError as exc:
        raise TrainingError(f"invalid seco settings: {exc}", code="invalid_seco", param="seco") from None
    return TrainSpec(
        job_id=rec.id,
        model_name=rec.base_model,
        model_path=model_path,
        training_file=training,
        validation_file=file_path(rec.validation_file, "validation_file"),
        output_dir=scratch / "out",
        device=settings.device,
        n_epochs=_auto(hp.get("n_epochs")),
        batch_size=_auto(hp.get("batch_size")),
        learning_rate_multiplier=_auto(hp.get("learning_rate_multiplier")),
        seed=rec.seed,
        seco=seco,
        method=rec.method,
        beta=_auto(hp.get("beta")),
        checkpoint_every=settings.checkpoint_every,
        memory_budget_bytes=settings.memory_budget_bytes,
        host_memory_budget_bytes=settings.host_memory_budget_bytes,
        serve_memory_bytes=settings.serve_memory_bytes,
        serve_device=settings.serve_device,
        # a resume restores every LoRA weight from the job's own checkpoint: the model it started
        # from is not needed (and may have been deleted since, or lost from storage)
        init_adapter=None if resuming else fetch_start_adapter(rec, store, storage, start_adapter),
    )


def fetch_start_adapter(rec: JobRecord, store: Store, storage: Storage, dest: Path) -> Path | None:
    """The PEFT adapter of the fine-tuned model (or checkpoint) the job names as `model`, fetched
    into `dest`; None for a job on a base model. Its owner may have deleted it since the job
    was created: a clear failure then."""
    if parse_model_name(rec.model) is None:
        return None
    found = resolve_fine_tuned(rec.model, rec.tenant, store)
    where = found.adapter_location(store) if found is not None else None
    try:
        if where is None:
            raise ObjectNotFound(rec.model)
        kind, key = where
        if kind == "dir":
            return storage.fetch_dir(key, dest)
        archive = storage.fetch(key, dest.with_name("start-adapter.tar.gz"))
        safe_extract(archive, dest)
        return dest
    except ObjectNotFound:
        raise TrainingError(
            f"Model {rec.model!r} no longer exists (it was deleted after this job was created)",
            code="model_not_available",
            param="model",
        ) from None


def _publish_results(rec: JobRecord, result: TrainResult, storage: Storage) -> list[tuple[str, str, int]]:
    """Put the adapter archive and metrics CSV into storage: (kind, key, bytes) of each.

    Each is one atomic object (a PUT, or a rename on a local disk), so an adapter is
    never served half-written; the records pointing at them come after (`_register_results`).
    """
    out = []
    for kind, path, name in (
        ("adapter", result.adapter_archive, "adapter.tar.gz"),
        ("metrics", result.metrics_csv, "metrics.csv"),
    ):
        path = Path(path)
        if not path.is_file():
            raise TrainingError(f"the training loop produced no {kind} file at {path.name}", code="missing_output")
        key = keys.result_key(rec.tenant, rec.id, name)
        out.append((kind, key, storage.put_file(key, path)))
    return out


def _register_results(rec: JobRecord, published: list[tuple[str, str, int]], store: Store) -> tuple[str, str]:
    """The published adapter archive and metrics CSV as `fine-tune-results` files (ids fixed per job).

    The job lists them metrics CSV first: OpenAI's `result_files[0]` is the metrics CSV, and
    scripts read it from there; the adapter is `adapter_file` (and the `/adapter` route)."""
    out = []
    for kind, key, size in published:
        fid = ids.result_file_id(rec.id, kind)
        name = f"{rec.id}-{'adapter.tar.gz' if kind == 'adapter' else 'metrics.csv'}"
        store.create_file(
            FileRecord(
                id=fid,
                tenant=rec.tenant,
                bytes=size,
                created_at=now(),
                filename=name,
                purpose="fine-tune-results",
                path=key,
                job_id=rec.id,
            ),
            counted=False,
            tenant_limit=0,
        )
        out.append(fid)
    return out[0], out[1]


# errno of a data dir that is full or cannot be written, and how libraries that hide the
# errno (safetensors, torch.save) spell the same failures.
_STORAGE_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.ENOTEMPTY,
    errno.EIO,
    errno.EFBIG,
}
_STORAGE_TEXT = {
    "No space left on device": errno.ENOSPC,
    "os error 28": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
    "file write failed": errno.EIO,
}


LOCAL_DISK_REMEDY = "Check the free space and permissions of the data directory (SECO_DATA_DIR)."


def storage_failure(exc: BaseException) -> tuple[str, str | None] | None:
    """(why, what to check) when `exc` is storage failing, else None.

    A StorageError names its reason (the back-end's remedy applies: None here); an OSError
    with a disk errno, or a library's text for one, is this host's data dir or scratch
    space being full or unwritable. Such failures are the operator's to fix, not a bug in
    training; they get their own error code and a message without paths or URLs.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, StorageError):
            return seen.reason, None
        if isinstance(seen, OSError) and seen.errno in _STORAGE_ERRNOS:
            return os.strerror(seen.errno).lower(), LOCAL_DISK_REMEDY
        for text, code in _STORAGE_TEXT.items():
            if text in str(seen):
                return os.strerror(code).lower(), LOCAL_DISK_REMEDY
        seen = seen.__cause__ or seen.__context__
    return None


def _scrub(message: str, settings: Settings) -> str:
    """A user-facing message without the server's directories (data dir, model paths) or storage URL."""
    root = Path(settings.data_dir).resolve()
    message = message.replace(f"{root}{os.sep}", "").replace(str(root), "<data dir>")
    if settings.storage_url:
        message = message.replace(settings.storage_url, "<storage>")
    for name, path in settings.models.items():
        message = message.replace(str(path), f"<model {name}>")
    return message


def train_next_job(
    settings: Settings, store: Store, *, worker_id: str | None = None, train: TrainFn | None = None
) -> str:
    """Claim the queued job the fair order puts first, run it, settle it; what happened ("idle"
    when none is queued), for logs and tests.

    One sequence: claim (queued -> running, with a lease this process renews while it trains),
    run in a scratch directory of its own, settle (succeeded, failed, cancelled or paused, by
    `_run_and_settle`); the lease keeper and the scratch directory end however the job does.
    """
    worker_id = worker_id or default_worker_id()
    job_id = store.claim_next(worker_id, settings.lease_seconds)
    if job_id is None:
        log.info("no queued job to start (its message outlived it: a duplicate, or the job was cancelled)")
        return "idle"
    rec = store.get_job(job_id)
    assert rec is not None  # just claimed: a job record is only deleted once finished
    lease = LeaseKeeper(store, job_id, worker_id, settings.lease_seconds)
    scratch = scratch_dir(settings, "jobs", f"{job_id}.{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    lease.start()
    try:
        return _run_and_settle(rec, settings, store, worker_id, lease, train, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        lease.stop()


def _run_and_settle(
    rec: JobRecord,
    settings: Settings,
    store: Store,
    worker_id: str,
    lease: LeaseKeeper,
    train: TrainFn | None,
    scratch: Path,
) -> str:
    """Run the claimed job and record how it ended: the outcome's name ("succeeded", "failed",
    "cancelled", "paused", or "lost" once the lease is someone else's and nothing more is written)."""
    job_id = rec.id
    storage = process_storage(settings)
    ctx = StoreContext(store, rec, worker_id, lease, storage, scratch / "out", settings.keep_checkpoints)
    log.info("job started", extra={"job_id": job_id, "worker": worker_id, "attempt": rec.attempts + 1})

    def fail(code: str, message: str, param: str | None = None) -> str:
        store.finish_job(
            job_id,
            worker_id,
            "failed",
            event=message,
            event_level="error",
            fields={"error": {"code": code, "message": message, "param": param}},
        )
        return "failed"

    try:
        # a resume (after a pause or a lost worker, on any host) continues from the job's own checkpoint
        restored = restore_latest_checkpoint(storage, rec.tenant, job_id, scratch / "out")
        spec = build_spec(rec, settings, store, storage, scratch, resuming=restored is not None)
        if train is None:
            from worker.trainer import train as real_train  # torch is imported here, in the child only

            if settings.device == "cpu":  # this child runs one job: RSS then tracks live tensors, as the plan does
                from seco_core.probes import return_freed_memory_to_os

                return_freed_memory_to_os()
            train = real_train
        result = train(spec, ctx)
        if lease.lost:
            return "lost"
        published = _publish_results(rec, result, storage)
        if lease.lost:
            return "lost"
        adapter_id, metrics_id = ctx.persist(lambda: _register_results(rec, published, store))
        ctx.persist(lambda: measure_outputs(store, storage, rec.tenant, job_id))  # the quota counts them
    except JobCancelled:
        if lease.lost:
            log.warning("job %s lost its lease; another worker owns it now", job_id)
            return "lost"
        store.finish_job(job_id, worker_id, "cancelled", event="Fine-tuning job cancelled")
        return "cancelled"
    except JobPaused as e:  # its checkpoint is stored: resuming is a resume from it, as after a crash
        if lease.lost:
            return "lost"
        paused_at = e.step
        outcome = ctx.persist(lambda: store.pause_running(job_id, worker_id, paused_at))
        if outcome == "cancelled":  # a cancel came after the pause was seen: cancel wins
            log.info("job cancelled while pausing", extra={"job_id": job_id, "step": paused_at})
            return "cancelled"
        log.info("job paused", extra={"job_id": job_id, "step": paused_at})
        return "paused" if outcome else "lost"
    except TrainingError as e:
        log.info("job failed: %s", e, extra={"job_id": job_id, "code": e.code})
        return fail(e.code, str(e), e.param)
    except Exception as e:
        log.exception("job %s crashed", job_id, extra={"job_id": job_id})
        failure = storage_failure(e)
        if failure is not None:
            reason, remedy = failure
            return fail(
                "storage_error", f"The worker could not save this job's files: {reason}. {remedy or storage.remedy}"
            )
        return fail("internal_error", _scrub(f"Training failed: {type(e).__name__}: {e}", settings))
    fine_tuned = fine_tuned_model_name(rec.base_model, rec.tenant, rec.suffix, job_id)
    ctx.persist(lambda: store.add_event(job_id, f"New fine-tuned model created: {fine_tuned}"))
    recorded = ctx.persist(lambda: store.get_job(job_id))
    peak = max(int(result.peak_memory_bytes or 0), (recorded.peak_memory_bytes if recorded else 0) or 0)
    done = ctx.persist(
        lambda: store.finish_job(
            job_id,
            worker_id,
            "succeeded",
            event="The job has successfully completed",
            fields={
                "fine_tuned_model": fine_tuned,
                "trained_tokens": str(result.trained_tokens),
                "result_files": [metrics_id, adapter_id],
                "adapter_file": adapter_id,
                "progress": "1",
                "peak_memory_bytes": str(peak),
                "step": str(result.steps),
            },
        )
    )
    return "succeeded" if done else "lost"


def _train_next(queued_job_id: str) -> str:
    """Celery entry point (`service.record.queue.publish`): `queued_job_id` was queued; train the
    next job in fair order, which may be another tenant's."""
    if not ids.is_job_id(queued_job_id):
        log.error("refusing a task with a malformed job id %r", queued_job_id)
        return "invalid"
    settings = get_settings()
    return train_next_job(settings, process_store(settings))


train_next = app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)(_train_next)
for _legacy in LEGACY_TASK_NAMES:  # messages published under an older name, still in the broker
    app.task(name=_legacy, acks_late=True, reject_on_worker_lost=True, ignore_result=True)(_train_next)


# --------------------------------------------------------------------------- worker process


class WorkerHeartbeat(threading.Thread):
    """In the worker's main process: heartbeat for /readyz, and the reaper sweep."""

    def __init__(self, settings: Settings, worker_id: str) -> None:
        super().__init__(name="seco-heartbeat", daemon=True)
        self.settings = settings
        self.worker_id = worker_id
        self.store = Store.from_url(settings.redis_url or "", name="seco-worker")
        self._stop_event = threading.Event()

    def sweep(self) -> None:
        for job_id in self.store.reap_expired(self.settings.max_attempts):
            publish(app, self.settings, job_id)

    def run(self) -> None:
        interval = self.settings.lease_seconds / 3
        last_sweep = 0.0
        while True:
            try:
                self.store.worker_heartbeat(self.worker_id, self.settings.lease_seconds)
                if time.monotonic() - last_sweep >= self.settings.reaper_interval:
                    last_sweep = time.monotonic()
                    self.sweep()
            except Exception as e:
                log.warning("worker heartbeat failed: %s: %s", type(e).__name__, e)
            if self._stop_event.wait(interval):
                return

    def stop(self) -> None:
        self._stop_event.set()
        with contextlib.suppress(Exception):
            self.store.remove_worker(self.worker_id)


_heartbeat: WorkerHeartbeat | None = None


@worker_init.connect
def _on_init(**_: Any) -> None:
    """Before the pool forks: the children inherit a umask of 077 (checkpoints, adapters 0600)."""
    restrict_umask()
    private_dir(Path(get_settings().data_dir))


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    """Start the heartbeat; its first sweep requeues jobs orphaned while no worker ran."""
    global _heartbeat
    settings = get_settings()
    _heartbeat = WorkerHeartbeat(settings, f"{getattr(sender, 'hostname', socket.gethostname())}:{os.getpid()}")
    _heartbeat.start()
    for path in sweep_scratch(settings, "jobs"):  # what workers killed on this host left behind
        log.info("removed the scratch space of a dead worker process", extra={"path": path.name})
    log.info("worker ready", extra={"worker": _heartbeat.worker_id, "device": settings.device})


@worker_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
