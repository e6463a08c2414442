"""The one archive extraction (service/archives.py): plain files in, everything else refused whole."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest

from service.archives import UnsafeArchive, safe_extract


def _tar(tmp_path: Path, members: list[dict[str, Any]]) -> Path:
    """A .tar.gz of `members` (TarInfo attributes; regular files hold b"x")."""
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for attrs in members:
            info = tarfile.TarInfo(attrs["name"])
            data = attrs.get("data", b"x")
            for k, v in attrs.items():
                if k != "data":
                    setattr(info, k, v)
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def test_safe_extract_writes_plain_files(tmp_path: Path) -> None:
    archive = _tar(tmp_path, [{"name": "adapter_config.json", "data": b"{}"}, {"name": "sub/w.bin", "data": b"12"}])
    names = safe_extract(archive, tmp_path / "out")
    assert sorted(names) == ["adapter_config.json", "sub/w.bin"]
    assert (tmp_path / "out" / "sub" / "w.bin").read_bytes() == b"12"


@pytest.mark.parametrize(
    "evil",
    [
        {"name": "../escape.txt"},
        {"name": "/tmp/abs.txt"},
        {"name": "a/../../escape.txt"},
        {"name": "link", "type": tarfile.SYMTYPE, "linkname": "/etc/passwd"},
        {"name": "hard", "type": tarfile.LNKTYPE, "linkname": "../x"},
        {"name": "dev", "type": tarfile.CHRTYPE},
    ],
)
def test_safe_extract_refuses_path_traversal_and_links(tmp_path: Path, evil: dict[str, Any]) -> None:
    archive = _tar(tmp_path, [{"name": "adapter_config.json"}, evil])
    out = tmp_path / "out"
    with pytest.raises(UnsafeArchive, match="refusing to extract"):
        safe_extract(archive, out)
    assert not (out / "adapter_config.json").exists(), "nothing is written when any member is refused"
    assert not (tmp_path / "escape.txt").exists()
