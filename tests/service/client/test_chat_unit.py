"""`seco chat`'s pieces that need no model server: the request it sends, how it reads OpenAI's
chunk stream, the conversation it keeps, and its errors. The server side is an httpx transport
answering as the API does (`data: {chat.completion.chunk}` ... `data: [DONE]`); the command
through the real API and inference process is tests/service/client/test_chat_service.py."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from service.client import cli
from service.client.commands import chat
from service.client.http import Client, ClientError


def chunks(*pieces: str) -> str:
    """An SSE body as an OpenAI-compatible server streams one answer."""
    out = [{"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}]
    out += [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    out += [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    events = [json.dumps({"object": "chat.completion.chunk", "id": "chatcmpl-1", **c}) for c in out]
    return "".join(f"data: {e}\n\n" for e in events) + "data: [DONE]\n\n"


class Server:
    """Answers each POST /v1/chat/completions with `reply(body)` and records the bodies."""

    def __init__(self, reply: Callable[[dict[str, Any]], httpx.Response]) -> None:
        self.reply = reply
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert request.method == "POST" and request.url.path == "/v1/chat/completions", request.url
        body = json.loads(request.content)
        self.bodies.append(body)
        return self.reply(body)

    def client(self) -> Client:
        c = Client("http://seco.test", "sk-test")
        c.http = httpx.Client(base_url=c.url + "/v1", transport=httpx.MockTransport(self))
        return c


def sse(text: str) -> httpx.Response:
    return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


def args(*argv: str) -> Any:
    return cli.build_parser().parse_args(["chat", *argv])


def test_chat_is_registered_with_its_options() -> None:
    a = args("ft:tiny:org::abc", "-m", "hi", "--system", "be brief", "--temperature", "0", "--max-tokens", "5")
    assert a.func.__name__ == "cmd_chat" and a.model == "ft:tiny:org::abc" and a.message == "hi"
    assert chat.request_body(a, [{"role": "user", "content": "hi"}]) == {
        "model": "ft:tiny:org::abc",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "temperature": 0.0,
        "max_tokens": 5,
    }
    assert set(chat.request_body(args("tiny"), [])) == {"model", "messages", "stream"}, "server defaults apply"


def test_a_conversation_keeps_its_turns_and_streams_each_answer() -> None:
    server = Server(lambda body: sse(chunks("answer ", str(len(body["messages"])))))
    out = io.StringIO()
    inp = io.StringIO("first question\n\nsecond one\n/reset\nthird\n/exit\nnever sent\n")
    with server.client() as client:
        assert chat.converse(client, args("tiny", "--system", "S"), inp, out) == 0
    assert out.getvalue() == "answer 2\nanswer 4\nanswer 2\n"
    assert [[(m["role"], m["content"]) for m in b["messages"]] for b in server.bodies] == [
        [("system", "S"), ("user", "first question")],
        [("system", "S"), ("user", "first question"), ("assistant", "answer 2"), ("user", "second one")],
        [("system", "S"), ("user", "third")],  # /reset keeps the system message only
    ]
    assert all(b["stream"] is True for b in server.bodies)


def test_the_end_of_input_ends_the_conversation() -> None:
    server = Server(lambda body: sse(chunks("ok")))
    out = io.StringIO()
    with server.client() as client:
        assert chat.converse(client, args("tiny"), io.StringIO("only line"), out) == 0
    assert out.getvalue() == "ok\n" and len(server.bodies) == 1


def test_the_pieces_are_written_as_they_arrive() -> None:
    """Streamed, not buffered: each piece reaches the output before the next one is read."""
    seen: list[str] = []

    class Out(io.StringIO):
        def flush(self) -> None:
            seen.append(self.getvalue())

    server = Server(lambda body: sse(chunks("a", "b", "c")))
    with server.client() as client:
        chat.answer(client, args("tiny"), [{"role": "user", "content": "x"}], Out())
    assert seen[:3] == ["a", "ab", "abc"]


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (
            httpx.Response(
                404,
                json={"error": {"message": "The model 'nope' does not exist", "type": "x", "code": "model_not_found"}},
            ),
            "The model 'nope' does not exist",
        ),
        (sse('data: {"error": {"message": "engine died", "code": "server_error"}}\n\n'), "engine died"),
        (sse("data: not json\n\n"), "malformed chunk"),
        (sse(chunks("cut")[: -len("data: [DONE]\n\n")]), "without [DONE]"),
    ],
)
def test_errors_become_the_servers_message(reply: httpx.Response, message: str) -> None:
    server = Server(lambda body: reply)
    with server.client() as client, pytest.raises(ClientError, match=message.replace("[", r"\[")):
        "".join(chat.stream_chat(client, chat.request_body(args("nope"), [])))


def test_an_error_exits_non_zero_with_the_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through `seco chat -m` itself, against a port nothing listens on: one line, exit 1."""
    monkeypatch.delenv("SECO_API_KEY", raising=False)
    code = cli.main(["chat", "tiny", "-m", "hi", "--url", "http://127.0.0.1:9", "--api-key", "k"])
    assert code == 1
    assert "cannot reach the seco server at http://127.0.0.1:9" in capsys.readouterr().err
