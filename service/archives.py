"""Safe extraction of an adapter archive (.tar.gz), the one place an archive is unpacked.

Used by the worker (the adapter a job continues from, fetched from storage) and by the
client (`seco download`, an archive from the network); standard library only, so the
client can import it on a laptop. An archive is data from elsewhere: absolute names,
`..`, links and device files could write outside `dest` (or point there later), so any of
them fails the whole extraction before a byte is written.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path, PurePosixPath


class UnsafeArchive(ValueError):
    """The archive holds an entry that is not a plain file or directory inside the destination."""


def safe_extract(archive: Path, dest: Path) -> list[str]:
    """Extract the regular files and directories of a .tar.gz under `dest`; the names of the files.

    UnsafeArchive (naming the entry) when any entry is anything else; tarfile.TarError or
    EOFError when the archive itself is not a valid .tar.gz.
    """
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for m in members:
            parts = PurePosixPath(m.name).parts
            if m.name.startswith(("/", "\\")) or ".." in parts or "\\" in m.name or not (m.isfile() or m.isdir()):
                raise UnsafeArchive(f"refusing to extract {m.name!r}: the adapter archive may only hold plain files")
            if not (dest / m.name).resolve().is_relative_to(dest):
                raise UnsafeArchive(f"refusing to extract {m.name!r}: it would land outside {dest}")
        names = []
        for m in members:
            target = dest / m.name
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None  # a regular file always has content
            with src, target.open("wb") as f:
                shutil.copyfileobj(src, f)
            names.append(str(PurePosixPath(m.name)))
    return names
