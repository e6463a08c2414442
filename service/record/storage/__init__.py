"""Where files, checkpoints, adapters and result files live: one interface, two back-ends.

- `SECO_STORAGE_URL` unset: `LocalStorage` under `SECO_DATA_DIR` (what `seco up` uses;
  several hosts can share it over NFS).
- `SECO_STORAGE_URL=s3://bucket/prefix`: `S3Storage`, any S3-compatible object store;
  hosts then share nothing but Redis and the store, and `SECO_DATA_DIR` is each host's
  own scratch space (uploads being received, checkpoints being written, the files a
  running job reads), cleaned when a job ends.

Keys are built by `keys.py` from validated ids, prefixed by tenant; Redis records hold
them. The API streams uploads to scratch, validates, then publishes (`put_file`);
workers publish checkpoints with a marker object last (`put_dir`) and fetch the newest
complete one before a resume (`complete_dirs`, `fetch_dir`).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from service.record.settings import Settings
from service.record.storage import keys
from service.record.storage.base import Download, ObjectInfo, ObjectNotFound, Storage, StorageError
from service.record.storage.local import LocalStorage

__all__ = [
    "Download",
    "LocalStorage",
    "ObjectInfo",
    "ObjectNotFound",
    "Storage",
    "StorageError",
    "keys",
    "open_storage",
    "scratch_dir",
    "sweep_scratch",
]


def open_storage(settings: Settings) -> Storage:
    """The back-end `settings` name (see the module docstring)."""
    if settings.storage_url:
        from service.record.storage.s3 import S3Storage  # obstore only where it is used

        return S3Storage(settings.storage_url)
    return LocalStorage(settings.data_dir)


def scratch_dir(settings: Settings, *parts: str) -> Path:
    """This host's (and process's) scratch space under the data dir: never shared, never published.

    Per host, so a data dir shared over NFS does not mix hosts; callers add the pid where
    two processes of one host could otherwise collide.
    """
    return Path(settings.data_dir).resolve().joinpath("scratch", socket.gethostname(), *parts)


def sweep_scratch(settings: Settings, area: str) -> list[Path]:
    """Remove what dead processes of this host left in `area` (entries named `<anything>.<pid>`).

    A SIGKILLed worker or API cannot clean up after itself; the next process started on
    the host does. Entries of live processes are left alone.
    """
    removed = []
    base = scratch_dir(settings, area)
    for entry in base.iterdir() if base.is_dir() else []:
        pid = entry.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
