"""`seco chat MODEL`: talk to a base or fine-tuned model from the terminal, the answer streamed.

It calls the API's OpenAI-compatible `POST /v1/chat/completions` with `stream: true` and prints
each `chat.completion.chunk`'s content as it arrives, until `data: [DONE]`. Two ways to use it:

- a conversation (the default): lines from stdin, one user turn each, until end of input or
  `/exit`; the conversation is kept and sent whole each turn (`/reset` starts it again), as
  the API keeps no state between requests;
- one question (`-m TEXT`): the answer on stdout, then exit, for scripts.

An error from the API (a model the key cannot use, a conversation too long for the model)
prints the server's message and exits non-zero, in either mode: the next turn would fail
the same way. Stdlib + httpx only (the client's import budget).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import httpx

from service.client.commands.base import EXIT_OK, command
from service.client.http import Client, ClientError, raise_for_status
from service.client.sse import SSEParser

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"
PROMPT = "> "
STREAM_TIMEOUT = httpx.Timeout(10.0, read=600.0)
"""A long prompt is prefilled before the first token comes: minutes, on a large model's long input."""


def register(sub: Any, conn: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "chat",
        parents=[conn],
        help="chat with a base or fine-tuned model (answers streamed)",
        description=(
            "Without -m: a conversation, one turn per line read from stdin, until end of input or /exit "
            "(/reset forgets the conversation so far). With -m: one question, the answer printed, then exit."
        ),
    )
    p.add_argument("model", help="a base model, or a fine-tuned model or checkpoint of yours (ft:...)")
    p.add_argument("-m", "--message", help="ask this one question, print the answer and exit")
    p.add_argument("--system", help="a system message that starts the conversation")
    p.add_argument("--temperature", type=float, help="sampling temperature (0: always the likeliest token)")
    p.add_argument("--max-tokens", type=int, help="the longest answer, in tokens")
    p.set_defaults(func=cmd_chat)


def request_body(args: argparse.Namespace, messages: list[dict[str, str]]) -> dict[str, Any]:
    """The chat completion request for the conversation so far: only the options given are sent,
    so the server's defaults apply to the rest."""
    body: dict[str, Any] = {"model": args.model, "messages": messages, "stream": True}
    if args.temperature is not None:
        body["temperature"] = args.temperature
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    return body


def chunk_text(data: str) -> str:
    """The content of one `data:` payload of the stream ('' for a chunk without any, e.g. the role
    or the usage); a ClientError for an error the server sent mid-stream or a malformed chunk."""
    try:
        chunk = json.loads(data)
    except ValueError:
        raise ClientError(f"malformed chunk from the server: {data[:200]!r}") from None
    if not isinstance(chunk, dict):
        raise ClientError(f"malformed chunk from the server: {data[:200]!r}")
    error = chunk.get("error")
    if isinstance(error, dict):
        raise ClientError(str(error.get("message") or error), code=error.get("code"))
    text = ""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            text += delta["content"]
    return text


def stream_chat(client: Client, body: dict[str, Any]) -> Iterator[str]:
    """The answer's pieces as the server streams them (OpenAI's SSE: chunks, then `[DONE]`)."""
    parser = SSEParser()
    try:
        with client.http.stream("POST", "/chat/completions", json=body, timeout=STREAM_TIMEOUT) as resp:
            if not resp.is_success:
                resp.read()
                raise_for_status(resp)
            for line in resp.iter_lines():
                msg = parser.feed(line)
                if msg is None:
                    continue
                if msg.data.strip() == "[DONE]":
                    return
                text = chunk_text(msg.data)
                if text:
                    yield text
    except httpx.TransportError as e:
        raise client.unreachable(e) from None
    raise ClientError("the server ended the answer without [DONE] (the stream was cut)")


def answer(client: Client, args: argparse.Namespace, messages: list[dict[str, str]], out: TextIO) -> str:
    """Stream one answer to `out` as it comes; the whole answer."""
    parts = []
    for piece in stream_chat(client, request_body(args, messages)):
        out.write(piece)
        out.flush()
        parts.append(piece)
    out.write("\n")
    out.flush()
    return "".join(parts)


def converse(client: Client, args: argparse.Namespace, inp: TextIO, out: TextIO) -> int:
    """The conversation: one turn per line of `inp`, until its end or /exit."""
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    on_terminal = inp is sys.stdin and inp.isatty() and out.isatty()
    read = _terminal_reader(out) if on_terminal else inp.readline
    while True:
        line = read()
        if not line:  # end of input
            return EXIT_OK
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            return EXIT_OK
        if text == RESET_COMMAND:
            messages = list(start)
            continue
        messages.append({"role": "user", "content": text})
        messages.append({"role": "assistant", "content": answer(client, args, messages, out)})


def _terminal_reader(out: TextIO) -> Callable[[], str]:
    """On a terminal: a prompt, line editing and history (`readline`, where the platform has it);
    end of input (Ctrl-D) as an empty string, like a file's."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (imported for its effect on input())

    def read() -> str:
        try:
            return input(PROMPT) + "\n"
        except EOFError:
            out.write("\n")
            return ""

    return read


@command
def cmd_chat(args: argparse.Namespace, client: Client) -> int:
    if args.message is not None:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        answer(client, args, [*messages, {"role": "user", "content": args.message}], sys.stdout)
        return EXIT_OK
    return converse(client, args, sys.stdin, sys.stdout)
