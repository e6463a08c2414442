"""A fault-injecting HTTP proxy in front of the test session's S3 server.

Requests pass through unchanged (the Host header too, so SigV4 signatures still match)
unless a rule matches the method and key: then the proxy answers 403 AccessDenied as S3
does ("deny"), drops the connection without an answer, like a store that is down
("down"), or holds the request until the rule is released ("hang"; a worker killed
while its upload hangs dies in the middle of it). Faults at the protocol level, the
counterpart of a full or read-only disk for the local back-end; nothing in the service
knows the proxy is there.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

ACCESS_DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>'
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


@dataclass
class Rule:
    methods: set[str]
    contains: str  # substring of the object key
    action: str  # "deny", "down" or "hang"
    hits: int = 0
    released: threading.Event = field(default_factory=threading.Event)
    hit: threading.Event = field(default_factory=threading.Event)


class FaultProxy:
    """`with FaultProxy(upstream) as proxy:`; `proxy.endpoint` goes into AWS_ENDPOINT_URL."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rules: list[Rule] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        for rule in self.rules:
            rule.released.set()
        self.server.shutdown()
        self.server.server_close()

    def add(self, action: str, contains: str, methods: tuple[str, ...] = ("PUT", "POST")) -> Rule:
        rule = Rule(set(methods), contains, action)
        with self._lock:
            self.rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        with self._lock:
            self.rules.remove(rule)
        rule.released.set()

    def _match(self, method: str, path: str) -> Rule | None:
        key = unquote(urlsplit(path).path)
        with self._lock:
            for rule in self.rules:
                if method in rule.methods and rule.contains in key:
                    rule.hits += 1
                    rule.hit.set()
                    return rule
        return None

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        rule = self._match(req.command, req.path)
        if rule is not None and rule.action == "hang":
            rule.released.wait(600)
            rule = Rule(set(), "", "down")  # whoever waited for the answer is gone by now
        if rule is not None and rule.action == "deny":
            req.send_response(403)
            req.send_header("Content-Type", "application/xml")
            req.send_header("Content-Length", str(len(ACCESS_DENIED)))
            req.end_headers()
            req.wfile.write(ACCESS_DENIED)
            return
        if rule is not None:  # "down": no answer at all
            req.close_connection = True
            return
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.putrequest(req.command, req.path, skip_host=True, skip_accept_encoding=True)
            for name, value in req.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            req.send_response(resp.status, resp.reason)
            for name, value in resp.getheaders():
                if name.lower() in HOP_BY_HOP or (name.lower() == "content-length" and req.command != "HEAD"):
                    continue
                req.send_header(name, value)
            if req.command != "HEAD":
                req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            if req.command != "HEAD":
                req.wfile.write(data)
        finally:
            conn.close()
