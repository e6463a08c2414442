"""The Lua scripts of the system of record, read once from `service/record/lua/`.

Each state change of a job (and each of the API's hot reads) is one script, so the check
and the change happen atomically in Redis. They live in `.lua` files (package data, so an
installed package has them) where an editor highlights them and a reader finds them by
name; each file's header says its KEYS and ARGV. A script that needs the queue snapshot
gets `queue_snapshot.lua` prepended (`PRELUDES`).
"""

from __future__ import annotations

import functools
from importlib import resources

PRELUDES: dict[str, tuple[str, ...]] = {
    "queue_order": ("queue_snapshot",),
    "read_job": ("queue_snapshot",),
    "read_jobs": ("queue_snapshot",),
}
"""Scripts that call a function of another file, and which files define it."""


@functools.cache
def source(name: str) -> str:
    """The text of script `name` (the file `lua/<name>.lua`, after the files it needs)."""
    lua = resources.files("service.record").joinpath("lua")
    parts = [*PRELUDES.get(name, ()), name]
    return "\n".join(lua.joinpath(f"{part}.lua").read_text(encoding="utf-8") for part in parts)
