"""The tiny arithmetic tasks' data: held-out rows of the SFT demo's task (``adapter.data.
synthetic``), with three wrong answers each for the 4-choice variant.

``tiny_arithmetic.jsonl`` beside this file is ``python adapter/eval_tasks/tiny_arithmetic/
utils.py`` 's output (a test checks that it still is). It is read by path from this file, so
the tasks work from any working directory (a ``dataset_kwargs.data_files`` path would be
read relative to the working directory).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

DATA_FILE = Path(__file__).with_name("tiny_arithmetic.jsonl")
ROWS = 200
SEED = 2026
"""Not the demo's seeds (model.seed 1234 for training, 1235 for validation)."""
DEMO_SEED, DEMO_ROWS = 1234, 8000
"""The SFT demo's training rows (tiny_llama_sft): no evaluated prompt is among them."""


def wrong_answers(row: dict[str, str], rng: random.Random) -> list[str]:
    """Three distinct answers close to the right one (a number off by a little, a word
    with two letters swapped)."""
    answer = row["response"]
    wrong: list[str] = []
    while len(wrong) < 3:
        if answer.lstrip("-").isdigit():
            candidate = str(int(answer) + rng.choice([-10, -2, -1, 1, 2, 10]))
        else:
            letters = list(answer)
            i, j = rng.sample(range(len(letters)), 2)
            letters[i], letters[j] = letters[j], letters[i]
            candidate = "".join(letters)
            if candidate == answer:
                candidate = answer[::-1] + rng.choice("abcdefghij")
        if candidate != answer and candidate not in wrong:
            wrong.append(candidate)
    return wrong


def make_rows() -> list[dict[str, Any]]:
    """``ROWS`` demo-task rows not in the demo's training data, each with its 4 choices and
    the index of the right one."""
    from adapter.data.synthetic import arithmetic_rows

    seen = {row["prompt"] for row in arithmetic_rows(DEMO_ROWS, DEMO_SEED)}
    rng = random.Random(SEED)
    rows: list[dict[str, Any]] = []
    candidates = iter(arithmetic_rows(50 * ROWS, SEED))
    while len(rows) < ROWS:
        row = next(candidates)
        if row["prompt"] in seen or any(r["prompt"] == row["prompt"] for r in rows):
            continue
        choices = [row["response"], *wrong_answers(row, rng)]
        rng.shuffle(choices)
        rows.append({**row, "choices": choices, "answer": choices.index(row["response"])})
    return rows


def load(**_: Any) -> Any:
    """lm-eval's ``custom_dataset``: the rows as a ``datasets.DatasetDict`` (split ``test``)."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(DATA_FILE)})


if __name__ == "__main__":
    text = "".join(json.dumps(row) + "\n" for row in make_rows())
    DATA_FILE.write_text(text)
    sys.stdout.write(f"wrote {ROWS} rows to {DATA_FILE}\n")
