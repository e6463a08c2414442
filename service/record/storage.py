"""Where files, checkpoints and adapters live under SECO_DATA_DIR.

Layout (every path is derived from a validated id, never from user text)::

    $SECO_DATA_DIR/
      files/<file_id>            uploaded JSONL, written to files/.<id>.part then renamed
      jobs/<job_id>/             one directory per job, written by the worker that runs it
        checkpoints/step-N/      LoRA weights + optimizer/scheduler/RNG state + data position
        adapter/                 the final PEFT adapter
        adapter.tar.gz           the downloadable archive (a result file)
        metrics.csv              per-step metrics (a result file)
      redis/                     the embedded server's AOF when `seco up` runs it
      models/                    the demo model built by `seco up`

Records in Redis store paths *relative* to the data dir, so several hosts can mount the
same volume at different places (NFS, a Kubernetes ReadWriteMany volume, docker volume).

S3-compatible storage: the only operations needed are "put a finished object", "get an
object (streamed)", "list a prefix" and "delete". The API reads uploads and result files
only through `resolve()`; the worker writes checkpoints and adapters into its job
directory. Moving to S3 would mean (1) the API streaming uploads to `files/<id>` with a
multipart upload instead of a local rename (the temp-then-rename step becomes "complete
multipart upload", equally atomic), (2) serving content with a presigned URL redirect or
a proxied stream, (3) the worker staging `jobs/<id>/` on local disk and uploading each
checkpoint directory once complete (marker object last, as the local code writes
config last), and downloading the latest checkpoint before a resume. Nothing in Redis
would change: records keep relative keys.
"""

from __future__ import annotations

from pathlib import Path

from service.record.ids import is_file_id, is_job_id


class DataDir:
    """Paths under one data directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    @property
    def files(self) -> Path:
        return self.root / "files"

    def file_path(self, file_id: str) -> Path:
        if not is_file_id(file_id):
            raise ValueError(f"not a file id: {file_id!r}")
        return self.files / file_id

    def upload_temp_path(self, file_id: str) -> Path:
        """Uploads land here first; a rename publishes them, so readers never see half a file."""
        return self.files / f".{file_id}.part"

    def job_dir(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / "jobs" / job_id

    def relative(self, path: Path) -> str:
        """How a path is recorded in Redis: relative when under the data dir."""
        path = Path(path).resolve()
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def resolve(self, recorded: str) -> Path:
        """The inverse of `relative`; refuses anything that escapes the data dir."""
        path = (self.root / recorded).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"recorded path escapes the data dir: {recorded!r}")
        return path

    def ensure(self) -> None:
        self.files.mkdir(parents=True, exist_ok=True)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
