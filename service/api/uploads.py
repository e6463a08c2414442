"""Streaming multipart upload straight to disk, with a byte limit.

Starlette's form parser receives the whole body (spooled to a temp file) before the
handler can look at its size, so a 100 GB upload would fill the disk before a 413.
Here the request stream feeds python-multipart's push parser chunk by chunk, the file
part goes to `files/.<id>.part`, and the upload is cut off as soon as it passes the
limit; the partial file is removed by the caller.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.api.errors import APIError

MAX_FIELD_BYTES = 4096
MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around the file part


class TooLarge(Exception):
    """The file part passed the limit."""


@dataclass
class Upload:
    filename: str = ""
    bytes: int = 0
    fields: dict[str, str] = field(default_factory=dict)
    got_file: bool = False


class _Receiver:
    """Callbacks for MultipartParser: one part at a time, file data to disk."""

    def __init__(self, dest: Path, max_bytes: int) -> None:
        self.dest = dest
        self.max_bytes = max_bytes
        self.out = Upload()
        self._headers: dict[bytes, bytes] = {}
        self._hname = b""
        self._hvalue = b""
        self._name = ""
        self._file: BinaryIO | None = None
        self._value = bytearray()
        self.too_large = False

    def on_part_begin(self) -> None:
        self._headers, self._name, self._value = {}, "", bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._hname.lower()] = self._hvalue
        self._hname, self._hvalue = b"", b""

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        if self._name == "file" and not self.out.got_file:
            self.out.got_file = True
            raw = params.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")
            self.out.filename = os.path.basename(raw.replace("\\", "/"))[:255] or "upload.jsonl"
            self._file = open(self.dest, "wb")  # noqa: SIM115 (closed in on_part_end / close())

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self.out.bytes += end - start
            if self.out.bytes > self.max_bytes:
                self.too_large = True
                return
            self._file.write(data[start:end])
        elif len(self._value) <= MAX_FIELD_BYTES:
            self._value += data[start:end]

    def on_part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self._name and len(self._value) <= MAX_FIELD_BYTES:
            self.out.fields[self._name] = self._value.decode("utf-8", "replace")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def receive_file(request: Request, dest: Path, max_bytes: int) -> Upload:
    """Parse the multipart body, writing the `file` part to `dest`. Raises TooLarge or APIError(400)."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise APIError(400, "Upload files as multipart/form-data with a 'file' part and a 'purpose' field",
                       param="file", retry=False)  # fmt: skip
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes + MULTIPART_OVERHEAD:
        raise TooLarge()
    rx = _Receiver(dest, max_bytes)
    parser = MultipartParser(boundary, callbacks={
        "on_part_begin": rx.on_part_begin, "on_part_data": rx.on_part_data, "on_part_end": rx.on_part_end,
        "on_header_field": rx.on_header_field, "on_header_value": rx.on_header_value,
        "on_header_end": rx.on_header_end, "on_headers_finished": rx.on_headers_finished,
    })  # fmt: skip
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if rx.too_large:
                raise TooLarge()
        parser.finalize()
    except (TooLarge, APIError):
        raise
    except Exception as e:  # python-multipart raises its own parse errors
        raise APIError(400, f"Malformed multipart body: {e}", param="file", retry=False) from None
    finally:
        rx.close()
    if not rx.out.got_file:
        raise APIError(400, "Missing the 'file' part of the upload", param="file", retry=False)
    rx.out.fields.setdefault("purpose", "")
    return rx.out
