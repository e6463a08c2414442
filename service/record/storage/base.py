"""The storage interface shared by the API and the workers, and its errors.

Operations are whole objects addressed by key (see `keys.py`): publish a finished local
file or directory, stream an object, list, measure and delete under a prefix. Every
write is atomic (a reader sees the old state or the complete new object, never part of
one), and a directory is published with its marker object last, so "the marker exists"
means "everything else is there". Both implementations keep these promises: the local
one with temporary names and renames, the S3 one because a PUT (single or multipart) is
atomic per object.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from service.record.storage.keys import check_key

CHUNK_BYTES = 1 << 20
"""Granularity of streamed reads: small enough to keep memory flat, large enough to be fast."""


class StorageError(Exception):
    """Storage could not do what was asked.

    `reason` is safe to show to a user: it never holds a URL, a server path or a
    credential (the underlying error, kept as `__cause__`, goes to the logs only).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ObjectNotFound(StorageError):
    """No object under that key."""

    def __init__(self, key: str) -> None:
        super().__init__("no such object")
        self.key = key


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


@dataclass
class Download:
    """An object being read: its size (for Content-Length) and its bytes, chunk by chunk."""

    size: int
    chunks: Iterator[bytes]


class Storage(ABC):
    """Files, checkpoints, adapters and result files, by key."""

    kind: str
    """"local" or "s3"."""
    setting: str
    """The variable an operator fixes when storage fails (named in error messages)."""
    remedy: str
    """What to check, in a sentence, for `storage_error` messages."""

    # ---------------------------------------------------------------- writes

    @abstractmethod
    def put_file(self, key: str, src: Path, *, move: bool = False) -> int:
        """Publish the finished local file `src` at `key`; returns its size. `move` lets it consume `src`."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Publish a small object."""

    def put_dir(self, prefix: str, src: Path, marker: str, *, move: bool = False) -> list[str]:
        """Publish every file under `src` at `prefix/<relative path>`, the `marker` file last.

        A reader that finds `prefix/marker` finds the whole directory. A writer killed
        midway leaves objects without a marker, which `complete_dirs` ignores and a later
        `put_dir` of the same prefix overwrites. `move` lets it consume `src`.
        """
        files = sorted(p for p in src.rglob("*") if p.is_file())
        rel = {p: p.relative_to(src).as_posix() for p in files}
        if marker not in rel.values():
            raise ValueError(f"{src.name} has no marker file {marker!r}")
        keys = []
        for p in sorted(files, key=lambda p: rel[p] == marker):  # the marker last
            keys.append(f"{prefix}/{rel[p]}")
            self.put_file(keys[-1], p)
        if move:
            shutil.rmtree(src, ignore_errors=True)
        return keys

    # ---------------------------------------------------------------- reads

    @abstractmethod
    def open(self, key: str) -> Download:
        """Stream an object; ObjectNotFound if there is none."""

    @abstractmethod
    def list_under(self, prefix: str) -> list[ObjectInfo]:
        """Every object under `prefix/` (recursively), sorted by key."""

    def local_path(self, key: str) -> Path | None:
        """Where the object already is on this host's disk, if it is (local back-end only)."""
        return None

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The object's size in bytes, None if there is no such object."""

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def fetch(self, key: str, dest: Path) -> Path:
        """A local file holding the object: `dest`, written via a temporary name.

        The local back-end overrides this to return the stored file itself (no copy);
        callers treat the result as read-only.
        """
        download = self.open(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            with tmp.open("wb") as fh:
                for chunk in download.chunks:
                    fh.write(chunk)
            tmp.replace(dest)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        return dest

    def fetch_dir(self, prefix: str, dest: Path) -> Path:
        """Copy every object under `prefix/` into `dest` (replaced whole, via a temporary name)."""
        objects = self.list_under(prefix)
        if not objects:
            raise ObjectNotFound(prefix)
        tmp = dest.with_name(f".{dest.name}.part")
        _rmtree(tmp)
        for obj in objects:
            target = tmp / obj.key[len(prefix) + 1 :]
            download = self.open(obj.key)
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as fh:
                for chunk in download.chunks:
                    fh.write(chunk)
        _rmtree(dest)
        tmp.rename(dest)
        return dest

    def complete_dirs(self, prefix: str, marker: str) -> list[str]:
        """Names of the directories under `prefix/` whose `marker` object exists, sorted."""
        names = set()
        for obj in self.list_under(prefix):
            rest = obj.key[len(prefix) + 1 :]
            name, _, tail = rest.partition("/")
            if tail == marker:
                names.add(name)
        return sorted(names)

    def size_under(self, prefix: str) -> int:
        """Total bytes under `prefix/` (quota accounting of a job's outputs)."""
        return sum(o.size for o in self.list_under(prefix))

    # ---------------------------------------------------------------- deletes

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; nothing happens if it is already gone."""

    def delete_under(self, prefix: str) -> int:
        """Remove every object under `prefix/`; returns how many there were."""
        objects = self.list_under(prefix)
        for obj in objects:
            self.delete(obj.key)
        return len(objects)

    # ---------------------------------------------------------------- moves

    @abstractmethod
    def copy(self, src: str, dest: str) -> None:
        """Copy one object to another key (replacing what is there)."""

    def move_under(self, src: str, dest: str) -> int:
        """Move every object under `src/` to the same place under `dest/`; returns how many.

        Object by object, each copied before it is deleted: a move cut short leaves every
        object under one prefix or the other, and running it again finishes it.
        """
        objects = self.list_under(src)
        for obj in objects:
            self.copy(obj.key, f"{dest}/{obj.key[len(src) + 1 :]}")
            self.delete(obj.key)
        return len(objects)

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def key(key: str) -> str:
        return check_key(key)

    def describe(self) -> str:
        """For logs: where objects go, without credentials."""
        return self.kind


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        os.unlink(path)
