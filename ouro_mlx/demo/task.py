"""The bundled model's task: the shell game. A ball lies under one of four cups
(1, 2, 3, 4); cups are swapped in pairs; where is the ball?

    user:       2,23,14,31
    assistant:  =133

The prompt is the ball's first cup, then the swaps. The answer lists where the ball
is after each swap, from the last swap back to the first: after ``31`` it is under
``1``, after ``14`` under ``3``, after ``23`` under ``3``. Cups are digits so that every
cup is one token (the tokenizer splits digits). Each position depends on the
one before it (tracking a permutation: no shortcut by counting), so the first answer
letter of a k-swap game needs k lookups one after the other, and each following
letter one fewer: a looped model needs depth for the early letters and can stop
looping on the late ones. That is what the bundled model shows
(``ouro-mlx chat --show-depth``).

Run as a script to write ChatML JSONL for training:

    python -m ouro_mlx.demo.task --n 100000 --seed 0 --out train.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

CUPS = "1234"
MAX_SWAPS = 3


@dataclass(frozen=True)
class Problem:
    question: str  # "2,23,14,31"
    answer: str  # "=133"
    swaps: int

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question},
                {"role": "assistant", "content": self.answer}]


def solve(question: str) -> str:
    """The answer to a game like ``2,23,14,31`` (raises ValueError on anything else)."""
    start, *swaps = question.strip().split(",")
    if start not in CUPS or len(start) != 1 or not swaps or any(
            len(s) != 2 or s[0] not in CUPS or s[1] not in CUPS or s[0] == s[1] for s in swaps):
        raise ValueError(f"not a shell game like 2,23,14,31 (cups {', '.join(CUPS)}): "
                         f"{question!r}")
    ball, seen = start, []
    for x, y in swaps:
        ball = y if ball == x else x if ball == y else ball
        seen.append(ball)
    return "=" + "".join(reversed(seen))


def make_problem(rng: random.Random, swaps: int) -> Problem:
    parts = [rng.choice(CUPS)]
    for _ in range(swaps):
        x, y = rng.sample(CUPS, 2)
        parts.append(x + y)
    q = ",".join(parts)
    return Problem(q, solve(q), swaps)


def problems(n: int, seed: int, max_swaps: int = MAX_SWAPS, min_swaps: int = 1) -> list[Problem]:
    """``n`` games with min_swaps..max_swaps swaps in equal shares (deterministic)."""
    rng = random.Random(seed)
    return [make_problem(rng, rng.randint(min_swaps, max_swaps)) for _ in range(n)]


def write_jsonl(path: str | Path, n: int, seed: int, max_swaps: int = MAX_SWAPS) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps({"messages": p.messages()}) + "\n"
                     for p in problems(n, seed, max_swaps))
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-swaps", type=int, default=MAX_SWAPS)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    print(write_jsonl(args.out, args.n, args.seed, args.max_swaps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
