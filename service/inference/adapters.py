"""Where a LoRA adapter's files come from: a local directory, or a location in the service's storage.

`lora_path` is what vLLM takes (a directory holding `adapter_config.json` and
`adapter_model.safetensors`) or one of two storage locations, fetched by this process
itself from the storage the worker writes to (the same `SECO_DATA_DIR` /
`SECO_STORAGE_URL`), into its own cache directory:

- `seco-storage:dir:<prefix>`: the objects under a prefix (a checkpoint's adapter),
- `seco-storage:archive:<key>`: an adapter archive (.tar.gz, extracted by
  `service.archives.safe_extract`, the one safe extraction).

The cache lives in this host's scratch space, one directory per process (`<name>.<pid>`),
so what a killed process left is swept by the next one (`sweep_scratch`).
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from pathlib import Path

from service.archives import UnsafeArchive, safe_extract
from service.inference.errors import OpenAIError, invalid
from service.record.storage import ObjectNotFound, Storage, StorageError
from service.record.storage.keys import check_key

STORAGE_SCHEME = "seco-storage:"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def check_adapter_dir(path: Path, spec: str) -> Path:
    """`path` if it holds an adapter's two files; a 400 naming what is missing otherwise."""
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        raise invalid("lora_path", f"{spec} holds no LoRA adapter: missing {', '.join(missing)}")
    return path


class AdapterFetcher:
    """Turns a `lora_path` into a local adapter directory, fetching storage locations into `cache_dir`."""

    def __init__(self, storage: Storage, cache_dir: Path) -> None:
        self.storage = storage
        self.cache_dir = cache_dir

    def local_dir(self, lora_path: str) -> Path:
        """The local directory of the adapter `lora_path` names (fetched when it is in storage)."""
        if not lora_path.startswith(STORAGE_SCHEME):
            path = Path(lora_path)
            if not path.is_absolute():
                raise invalid(
                    "lora_path", f"lora_path must be an absolute directory or {STORAGE_SCHEME}..., got {lora_path!r}"
                )
            if not path.is_dir():
                raise invalid("lora_path", f"no such adapter directory: {lora_path}")
            return check_adapter_dir(path, lora_path)
        kind, _, key = lora_path[len(STORAGE_SCHEME) :].partition(":")
        if kind not in ("dir", "archive"):
            raise invalid(
                "lora_path", f"a storage location is {STORAGE_SCHEME}dir:<prefix> or {STORAGE_SCHEME}archive:<key>"
            )
        try:
            check_key(key)
        except ValueError as e:
            raise invalid("lora_path", f"{lora_path}: {e}") from None
        dest = self.cache_dir / hashlib.sha256(lora_path.encode()).hexdigest()[:32]
        try:
            if kind == "dir":
                self.storage.fetch_dir(key, dest)
            else:
                self._extract(key, dest, lora_path)
        except ObjectNotFound:
            raise invalid("lora_path", f"nothing is stored at {lora_path}", code="adapter_not_found") from None
        except StorageError as e:
            raise OpenAIError(
                503, f"storage is unavailable: {e.reason}", code="storage_unavailable", type="server_error"
            ) from None
        return check_adapter_dir(dest, lora_path)

    def _extract(self, key: str, dest: Path, spec: str) -> None:
        tmp = dest.with_name(dest.name + ".part")
        archive = self.storage.fetch(key, self.cache_dir / (dest.name + ".tar.gz"))
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            safe_extract(archive, tmp)
        except (UnsafeArchive, tarfile.TarError, EOFError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise invalid("lora_path", f"{spec} is not a valid adapter archive: {e}") from None
        finally:
            if archive.is_relative_to(self.cache_dir):  # a copy we made (the local back-end hands its own file)
                archive.unlink(missing_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)

    def forget(self, local_dir: Path) -> None:
        """Remove a fetched copy (an unloaded adapter's); directories outside the cache are left alone."""
        if local_dir.is_relative_to(self.cache_dir):
            shutil.rmtree(local_dir, ignore_errors=True)
