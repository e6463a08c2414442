"""The Redis key schema is written once (service/record/redis_keys.py) and every Lua script ships."""

from __future__ import annotations

import re
from pathlib import Path

from service.record import scripts

ROOT = Path(__file__).resolve().parents[3]
LUA = ROOT / "service" / "record" / "lua"


def test_no_key_is_spelled_outside_the_key_module() -> None:
    """A `seco:` key prefix in code or a script is a second copy of the schema, which drifts.

    The client is left out: it talks HTTP only, and `seco:` begins its error messages."""
    found = []
    sources = [*ROOT.glob("service/record/**/*.py"), *ROOT.glob("service/api/**/*.py"), *ROOT.glob("worker/**/*.py")]
    for path in sorted([*sources, *LUA.glob("*.lua")]):
        if path.name == "redis_keys.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""["'`]seco:|\.\. ?["']job:|["']tenant:""", line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


def test_every_script_loads_and_ships_as_package_data() -> None:
    names = sorted(p.stem for p in LUA.glob("*.lua"))
    assert "transition" in names and "queue_snapshot" in names
    for name in names:
        assert "redis.call" in scripts.source(name), name
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; the project runs on 3.10)
    assert re.search(r'^"service\.record" = \["lua/\*\.lua"\]', pyproject, re.M), "the scripts are not package data"


def test_every_script_named_in_code_exists() -> None:
    used: set[str] = set()
    for path in [*ROOT.glob("service/**/*.py"), *ROOT.glob("worker/**/*.py")]:
        used.update(re.findall(r"""(?:script|source)\("([a-z_]+)"\)""", path.read_text()))
    assert used, "no script found in the code"
    missing = sorted(name for name in used if not (LUA / f"{name}.lua").is_file())
    assert not missing, missing
