"""The local back-end: objects are files under one directory (SECO_DATA_DIR).

What `seco up` uses, and what several hosts can share over NFS or a ReadWriteMany
volume. Writes go to a hidden temporary name in the destination directory and are
renamed into place, so readers (and `list`) never see half an object; a directory is
published by one rename, so a checkpoint appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from service.record.storage.base import CHUNK_BYTES, Download, ObjectInfo, ObjectNotFound, Storage, StorageError


def _failure(exc: OSError) -> StorageError:
    """An OSError as a StorageError that names the failure, not the path."""
    reason = os.strerror(exc.errno).lower() if exc.errno else "input/output error"
    return StorageError(reason)


def _copy_tree(src: Path, dest: Path) -> None:
    """Copy a directory, failing on the first error with its own errno (copytree collects
    errors into one `shutil.Error` without an errno, hiding "no space left on device")."""
    for path in sorted(src.rglob("*")):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    dest.mkdir(parents=True, exist_ok=True)


class LocalStorage(Storage):
    kind = "local"
    setting = "SECO_DATA_DIR"
    remedy = "Check the free space and permissions of the data directory (SECO_DATA_DIR)."

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path(self, key: str) -> Path:
        """The file of `key`; keys are checked, so the result is always under the root."""
        return self.root / self.key(key)

    # ---------------------------------------------------------------- writes

    def put_file(self, key: str, src: Path, *, move: bool = False) -> int:
        dest = self.path(key)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            size = src.stat().st_size
            if move:
                try:
                    os.replace(src, tmp)  # same filesystem: no copy
                except OSError as e:
                    if e.errno != errno.EXDEV:
                        raise
                    shutil.copyfile(src, tmp)
                    src.unlink()
            else:
                shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
            return size
        except OSError as e:
            raise _failure(e) from e
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self.path(key)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        except OSError as e:
            raise _failure(e) from e
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)

    def put_dir(self, prefix: str, src: Path, marker: str, *, move: bool = False) -> list[str]:
        """One rename publishes the whole directory (moved or copied under a temporary name first)."""
        if not (src / marker).is_file():
            raise ValueError(f"{src.name} has no marker file {marker!r}")
        dest = self.path(prefix)
        tmp = dest.with_name(f".tmp-{dest.name}.{os.getpid()}")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                if not move:
                    raise OSError(errno.EXDEV, "copy requested")
                os.rename(src, tmp)  # scratch and data dir on one filesystem: no copy
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                _copy_tree(src, tmp)
                if move:
                    shutil.rmtree(src)
            shutil.rmtree(dest, ignore_errors=True)  # a copy a killed worker published earlier
            tmp.rename(dest)
        except OSError as e:
            raise _failure(e) from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return [f"{prefix}/{p.relative_to(dest).as_posix()}" for p in sorted(dest.rglob("*")) if p.is_file()]

    # ---------------------------------------------------------------- reads

    def local_path(self, key: str) -> Path | None:
        return self.path(key)

    def size(self, key: str) -> int | None:
        path = self.path(key)
        return path.stat().st_size if path.is_file() else None

    def open(self, key: str) -> Download:
        path = self.path(key)
        try:
            fh = path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        except OSError as e:
            raise _failure(e) from e

        def chunks() -> Iterator[bytes]:
            with fh:
                while block := fh.read(CHUNK_BYTES):
                    yield block

        return Download(size=os.fstat(fh.fileno()).st_size, chunks=chunks())

    def fetch(self, key: str, dest: Path) -> Path:
        """The stored file itself: on a local disk there is nothing to copy."""
        path = self.path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path

    def list_under(self, prefix: str) -> list[ObjectInfo]:
        base = self.path(prefix)
        if not base.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # temporaries are not objects
            for name in filenames:
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                with contextlib.suppress(FileNotFoundError):
                    out.append(ObjectInfo(key=path.relative_to(self.root).as_posix(), size=path.stat().st_size))
        return sorted(out, key=lambda o: o.key)

    # ---------------------------------------------------------------- deletes

    def delete(self, key: str) -> None:
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError as e:
            raise _failure(e) from e

    def delete_under(self, prefix: str) -> int:
        n = len(self.list_under(prefix))
        try:
            shutil.rmtree(self.path(prefix))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _failure(e) from e
        return n

    # ---------------------------------------------------------------- moves

    def copy(self, src: str, dest: str) -> None:
        source = self.path(src)
        if not source.is_file():
            raise ObjectNotFound(src)
        self.put_file(dest, source)

    def move_under(self, src: str, dest: str) -> int:
        """One rename when nothing is at `dest` yet (a directory on one filesystem); object by
        object otherwise (a move cut short before)."""
        n = len(self.list_under(src))
        source, target = self.path(src), self.path(dest)
        try:
            if source.is_dir() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                source.rename(target)
                return n
        except OSError as e:
            raise _failure(e) from e
        return super().move_under(src, dest)

    def describe(self) -> str:
        return f"local directory {self.root}"
