"""`seco download`: a job's adapter, extracted safely (`service.archives`) into a new directory."""

from __future__ import annotations

import argparse
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from service.archives import UnsafeArchive, safe_extract
from service.client.commands.base import EXIT_OK, command, emit
from service.client.format import human_bytes
from service.client.http import Client, ClientError


def register(sub: Any, conn: argparse.ArgumentParser) -> None:
    p = sub.add_parser("download", parents=[conn], help="download and extract a job's LoRA adapter")
    p.add_argument("job_id")
    p.add_argument("-o", "--output", type=Path, help="directory to extract into (default ./<job id>-adapter)")
    p.add_argument("--force", action="store_true", help="extract into a non-empty directory")
    p.set_defaults(func=cmd_download)


@command
def cmd_download(args: argparse.Namespace, client: Client) -> int:
    job = client.job(args.job_id)
    dest: Path = args.output or Path(f"{job['id']}-adapter")
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not args.force)):
        raise ClientError(f"{dest} exists and is not empty (choose another -o, or pass --force)")
    parent = dest.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    # Download next to the destination and create it only once the archive is here: a
    # refused or interrupted download leaves nothing behind.
    with tempfile.TemporaryDirectory(prefix=".seco-download-", dir=parent) as tmp:
        archive = Path(tmp) / "adapter.tar.gz"
        with archive.open("wb") as f:
            size = client.download_adapter(job["id"], f)
        dest.mkdir(exist_ok=True)
        try:
            names = safe_extract(archive, dest)
        except UnsafeArchive as e:
            raise ClientError(str(e)) from None
        except (tarfile.TarError, EOFError) as e:
            raise ClientError(f"the downloaded adapter is not a valid .tar.gz: {e}") from None
    emit(f"Extracted {len(names)} files ({human_bytes(size)}) to {dest}/: {', '.join(sorted(names))}")
    emit(
        f"Load it (BASE: the weights of {job['model']!r}): "
        f'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "{dest}")'
    )
    return EXIT_OK
