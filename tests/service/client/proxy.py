"""A TCP proxy that cuts event streams short, to test that followers resume without gaps or repeats."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

EVENT_START = b"\nid: "  # every event of the API's stream begins with its id line
CUT_DELAY = 0.5
"""Seconds between the last whole event and the torn one that ends the connection. A browser
may drop data that reached it in the same moment as a network error (Chromium does, for a
fetch body); the client then resumes from an earlier event, which is correct, but a proxy
that always cut at that moment would let a fast replay make no progress at all."""


class DroppingProxy:
    """Forwards connections to `upstream`; an SSE response is cut after `events` events.

    The cut falls in the middle of the next event (its id line and a few bytes of data),
    the worst case for a client: it must neither dispatch the torn event nor resume after
    its id. The torn event follows the whole ones after `CUT_DELAY`. Other responses pass
    through untouched. `drops` counts the cuts.
    """

    def __init__(self, upstream_port: int, events: int = 3) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.events = events
        self.drops = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()
        sse, seen, tail = False, 0, b""
        try:
            while data := upstream.recv(65536):
                sse = sse or b"text/event-stream" in data
                if sse:
                    window = tail + data
                    cut = None
                    start = 0
                    while (i := window.find(EVENT_START, start)) >= 0:
                        start = i + 1
                        seen += 1
                        if seen > self.events:  # the (events+1)th event begins here: send part of it, then cut
                            cut = i - len(tail) + len(EVENT_START) + 24
                            break
                    tail = window[-(len(EVENT_START) - 1) :]
                    if cut is not None:
                        whole = max(cut - len(EVENT_START) - 24 + 1, 0)  # just after the last whole event
                        client.sendall(data[:whole])
                        time.sleep(CUT_DELAY)
                        client.sendall(data[whole : max(cut, 0)])
                        with self._lock:
                            self.drops += 1
                        return
                client.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
