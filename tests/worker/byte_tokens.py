"""The demo byte tokenizer and token ids of text pieces, for tests that check records token by token."""

from __future__ import annotations

from benchmarks.demo import byte_tokenizer

TOK = byte_tokenizer()
EOS = TOK.eos_token_id


def ids(*pieces: str) -> list[int]:
    """Token ids of pieces: a special token ("<|user|>") is one id, other text one id per byte."""
    out: list[int] = []
    for piece in pieces:
        if piece.startswith("<|"):
            token_id = TOK.convert_tokens_to_ids(piece)
            assert isinstance(token_id, int)
            out.append(token_id)
        else:
            out += TOK(piece)["input_ids"]
    return out
