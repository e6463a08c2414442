"""A preference a tiny model learns in a few steps, for the DPO tests.

Every pair asks a random short question; both answers share a random body, and the
preferred one always ends with " !!" where the rejected one ends with " ??". A model
that learned the preference ranks held-out pairs (new questions, new bodies) right; an
untrained one ranks them at random.
"""

from __future__ import annotations

import random
from typing import Any

WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "light", "green", "quiet", "paper", "north"]


def preference_records(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    records = []
    for _ in range(n):
        question, body = words(3, 8), words(2, 5)
        records.append(
            {
                "input": {"messages": [{"role": "user", "content": question}]},
                "preferred_output": [{"role": "assistant", "content": body + " !!"}],
                "non_preferred_output": [{"role": "assistant", "content": body + " ??"}],
            }
        )
    return records
