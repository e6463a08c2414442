"""Streaming multipart upload straight to disk, with a byte limit.

Starlette's form parser receives the whole body (spooled to a temp file) before the
handler can look at its size, so a 100 GB upload would fill the disk before a 413.
Here the request stream feeds python-multipart's push parser chunk by chunk, the file
part goes to `files/.<id>.part`, and the upload is cut off as soon as it passes the
limit; the partial file is removed by the caller.

Everything else in the body is bounded too, since the file's limit alone let an upload
carry 100 MB of extra form fields: every byte of the body (part headers, boundaries and
fields included) counts against the limit plus a small allowance, only the documented
fields are accepted (`FIELDS`, each once, so a body has at most four parts, each with a
few KiB of headers (bounded by python-multipart) and of value). An unknown or repeated field is refused when its headers
arrive, so the rest of the body is never read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.api.errors import APIError

FIELDS = frozenset({"file", "purpose", "expires_after[anchor]", "expires_after[seconds]"})
"""The parts an upload may have (OpenAI's `files.create`), each at most once."""
MAX_FIELD_BYTES = 4096
"""Largest value of a field other than the file."""
MULTIPART_OVERHEAD = 64 * 1024
"""Body bytes allowed beyond the file's limit: the fields, part headers and boundaries."""


class TooLarge(Exception):
    """The file part passed the limit."""


@dataclass
class Upload:
    filename: str = ""
    bytes: int = 0
    fields: dict[str, str] = field(default_factory=dict)
    got_file: bool = False


UNREAD_BODY = {"connection": "close"}
"""Headers of an answer given before the whole body was read: the connection is closed
instead of being kept alive, which would make the server read (and discard) the rest."""


def _refuse(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_upload", retry=False, headers=UNREAD_BODY)


class _Receiver:
    """Callbacks for MultipartParser: one part at a time, file data to disk, fields bounded."""

    def __init__(self, dest: Path, max_bytes: int) -> None:
        self.dest = dest
        self.max_bytes = max_bytes
        self.out = Upload()
        self._headers: dict[bytes, bytes] = {}
        self._hname = b""
        self._hvalue = b""
        self._name = ""
        self._seen: set[str] = set()
        self._file: BinaryIO | None = None
        self._value = bytearray()
        self.too_large = False

    def on_part_begin(self) -> None:
        self._headers, self._name, self._value = {}, "", bytearray()

    # python-multipart bounds a part's headers (8 headers of 4 KiB at most)
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
        if self._name not in FIELDS:
            shown = self._name if len(self._name) <= 64 else self._name[:64] + "…"
            raise _refuse(
                f"Unknown form field {shown!r}: an upload has a 'file' part, a 'purpose' field and "
                "optionally 'expires_after[anchor]' and 'expires_after[seconds]'",
                shown or "file",
            )
        if self._name in self._seen:
            raise _refuse(f"The form field {self._name!r} appears more than once", self._name)
        self._seen.add(self._name)
        if self._name == "file":
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
            return
        self._value += data[start:end]
        if len(self._value) > MAX_FIELD_BYTES:
            raise _refuse(f"The form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes", self._name)

    def on_part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        else:
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
        raise APIError(
            400,
            "Upload files as multipart/form-data with a 'file' part and a 'purpose' field",
            param="file",
            retry=False,
        )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes + MULTIPART_OVERHEAD:
        raise TooLarge()
    rx = _Receiver(dest, max_bytes)
    parser = MultipartParser(
        boundary,
        callbacks={
            "on_part_begin": rx.on_part_begin,
            "on_part_data": rx.on_part_data,
            "on_part_end": rx.on_part_end,
            "on_header_field": rx.on_header_field,
            "on_header_value": rx.on_header_value,
            "on_header_end": rx.on_header_end,
            "on_headers_finished": rx.on_headers_finished,
        },
    )
    received = 0
    try:
        async for chunk in request.stream():
            parser.write(chunk)  # first: a bad part in this chunk is named, not just counted
            received += len(chunk)
            if rx.too_large or received > max_bytes + MULTIPART_OVERHEAD:  # every part counts, not only the file
                raise TooLarge()
        parser.finalize()
    except (TooLarge, APIError):
        raise
    except Exception as e:  # python-multipart raises its own parse errors
        raise _refuse(f"Malformed multipart body: {e}", "file") from None
    finally:
        rx.close()
    if not rx.out.got_file:
        raise APIError(400, "Missing the 'file' part of the upload", param="file", retry=False)
    rx.out.fields.setdefault("purpose", "")
    return rx.out
