"""Adapters the inference process has loaded for this API process, and loading the others.

An adapter is loaded once per name (`POST /v1/load_lora_adapter`, remembered here); the
caller loads it again when the process answers 404 for it (restarted, or it forgot it).
`lora_path` depends on the engine (SECO_INFERENCE_ENGINE): `seco serve` takes the adapter's
storage location and fetches it itself; a vLLM server reads local directories only, so the
adapter is unpacked under `<data dir>/serving/<lora_name>/` first (through
`service.archives.safe_extract`, like every archive), a directory the vLLM server must see at
the same path. Several API processes may load the same name: the contract's load is
idempotent for the same name and path, and a vLLM that refuses a second load still lists the
adapter in `GET /v1/models`, which is checked before a refusal is believed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
from pathlib import Path

from fastapi.concurrency import run_in_threadpool

from service.api.errors import APIError
from service.api.inference import Inference
from service.api.served_models import StoredAdapter, Target
from service.archives import safe_extract
from service.record.private import private_dir
from service.record.settings import Settings
from service.record.storage import Storage

log = logging.getLogger(__name__)

SERVING_DIR = "serving"
"""Under the data dir: adapters unpacked for a vLLM server."""


def materialise(storage: Storage, data_dir: Path, adapter: StoredAdapter) -> Path:
    """The adapter as a local PEFT directory `<data_dir>/serving/<lora_name>/` (kept once made).

    Written under a temporary name and renamed, so a concurrent API process (or a vLLM server
    reading it) never sees half an adapter; the loser of a race keeps the winner's copy.
    """
    root = private_dir(data_dir / SERVING_DIR)
    dest = root / adapter.lora_name
    if (dest / "adapter_config.json").is_file():
        return dest
    token = secrets.token_hex(4)
    tmp = root / f".{adapter.lora_name}.{token}"
    archive = root / f".{adapter.lora_name}.{token}.tar.gz"
    try:
        if adapter.kind == "dir":
            storage.fetch_dir(adapter.key, tmp)
        else:
            safe_extract(storage.fetch(adapter.key, archive), tmp)
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / "adapter_config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        archive.unlink(missing_ok=True)  # the local back-end hands out its own file instead: untouched
    return dest


class Adapters:
    """The adapters the inference process has loaded for us, and how to load one."""

    def __init__(self, inference: Inference, storage: Storage, settings: Settings) -> None:
        self.inference = inference
        self.storage = storage
        self.settings = settings
        self.loaded: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    async def ensure(self, target: Target, *, reload: bool = False) -> None:
        """Load `target`'s adapter unless it is loaded (`reload`: load it anyway)."""
        adapter = target.adapter
        if adapter is None or (adapter.lora_name in self.loaded and not reload):
            return
        lock = self._locks.setdefault(adapter.lora_name, asyncio.Lock())
        async with lock:
            if adapter.lora_name in self.loaded and not reload:
                return  # loaded by the request this one waited for
            self.loaded.discard(adapter.lora_name)
            await self._load(target, adapter)
            self.loaded.add(adapter.lora_name)

    async def _load(self, target: Target, adapter: StoredAdapter) -> None:
        vllm = self.settings.inference_engine == "vllm"
        if vllm:
            path = str(await run_in_threadpool(materialise, self.storage, Path(self.settings.data_dir), adapter))
        else:
            path = adapter.storage_path
        resp = await self.inference.load_adapter(adapter.lora_name, path, None if vllm else target.base)
        if resp.status_code == 200:
            log.info("adapter loaded", extra={"lora_name": adapter.lora_name, "base": target.base})
            return
        if adapter.lora_name in await self.inference.served_models():
            return  # another API process loaded it first (vLLM refuses a second load of a name)
        message, code = "no details", None
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            error = resp.json()["error"]
            message, code = str(error["message"]), error.get("code")
        message = message.replace(path, "<adapter>").replace(adapter.lora_name, target.model)
        log.warning("adapter not loaded", extra={"lora_name": adapter.lora_name, "status": resp.status_code})
        # The process's own condition (no free adapter slot, no memory left) keeps its status, code
        # and Retry-After; a refusal of what we sent is our failure, a 502.
        own = resp.status_code >= 500
        raise APIError(
            resp.status_code if own else 502,
            f"The inference server could not load model {target.model!r} ({resp.status_code}: {message})",
            type="server_error",
            code=str(code) if own and isinstance(code, str) else "adapter_load_failed",
            headers={k: v for k, v in resp.headers.items() if k.lower() == "retry-after"},
        )
