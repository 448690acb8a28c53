"""Deterministic demo data a tiny model can visibly learn: arithmetic and string tasks.

Rows are ``{"prompt", "response"}`` like the prompt_response format, so the demo runs the
same tokenization, masking and batching as a real fine-tuning run.
"""

from __future__ import annotations

import random

LETTERS = "abcdefghij"


def _row(rng: random.Random) -> dict[str, str]:
    task = rng.randrange(3)
    if task == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        return {"prompt": f"{a}+{b}", "response": str(a + b)}
    if task == 1:
        a, b = rng.randrange(10, 100), rng.randrange(10)
        return {"prompt": f"{a}-{b}", "response": str(a - b)}
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randrange(3, 7)))
    return {"prompt": f"rev {word}", "response": word[::-1]}


def arithmetic_rows(count: int, seed: int) -> list[dict[str, str]]:
    """``count`` rows of two-digit addition, subtraction and word reversal, seeded."""
    rng = random.Random(seed)
    return [_row(rng) for _ in range(count)]


SYNTHETIC_TASKS = {"arithmetic": arithmetic_rows}
