"""Files the server writes are readable by its own user only.

The data dir holds every tenant's training data and adapters, the API key, the embedded
Redis's password and append-only file: another user on the host must not read any of it
(or rewrite a record to make one tenant's file id serve another's data). Every server
process sets its umask to 077 before writing anything, so whatever it creates is 0600
(files) or 0700 (directories); the data dir itself is tightened to 0700 at start, which
also closes a data dir created by an older version with open permissions.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)

UMASK = 0o077


def restrict_umask() -> None:
    """New files 0600, new directories 0700 (this process and the ones it starts)."""
    os.umask(UMASK)


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner can enter (created, or tightened if it exists)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & UMASK:
        try:
            path.chmod(mode & ~UMASK)
        except PermissionError:  # e.g. a shared mount owned by another user: say so, do not fail
            log.warning("cannot restrict the permissions of %s (mode %o); other users may read it", path, mode)
    return path


def secret_file(path: Path, prefix: str = "") -> str:
    """The secret kept in `path`, created once (0600, never replaced) with 32 random bytes."""
    if path.exists():
        return path.read_text().strip()
    value = prefix + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value
