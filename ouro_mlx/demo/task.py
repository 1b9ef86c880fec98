"""The bundled model's task: chains of one-digit operations, evaluated left to right,
keeping the last digit (arithmetic mod 10).

    user:       3+4*2-5
    assistant:  =947

The answer lists the running results from the last operation back to the first:
``((3+4)*2-5) mod 10 = 9``, ``(3+4)*2 mod 10 = 4``, ``3+4 = 7``. Each operation needs
the result of the one before it, so the first answer digit of a k-operation chain
needs about k sequential steps of computation and the following digits one fewer
each: a looped model needs depth for the early digits and can stop looping on the
late ones. That is what the bundled model shows (``ouro-mlx chat --show-depth``).

Run as a script to write ChatML JSONL for training:

    python -m ouro_mlx.demo.task --n 100000 --seed 0 --out train.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

OPS = "+-*"
MAX_OPS = 4


@dataclass(frozen=True)
class Problem:
    question: str  # "3+4*2-5"
    answer: str  # "=947"
    ops: int

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question},
                {"role": "assistant", "content": self.answer}]


def solve(question: str) -> str:
    """The answer to a chain like ``3+4*2-5`` (raises ValueError on anything else)."""
    q = question.strip()
    if len(q) < 3 or len(q) % 2 == 0 or not all(c.isdigit() for c in q[::2]) \
            or not all(c in OPS for c in q[1::2]):
        raise ValueError(f"not a chain of one-digit operations: {question!r}")
    v, results = int(q[0]), []
    for op, d in zip(q[1::2], map(int, q[2::2])):
        v = (v + d) % 10 if op == "+" else (v - d) % 10 if op == "-" else (v * d) % 10
        results.append(v)
    return "=" + "".join(map(str, reversed(results)))


def make_problem(rng: random.Random, ops: int) -> Problem:
    q = str(rng.randrange(10)) + "".join(rng.choice(OPS) + str(rng.randrange(10))
                                         for _ in range(ops))
    return Problem(q, solve(q), ops)


def problems(n: int, seed: int, max_ops: int = MAX_OPS, min_ops: int = 1) -> list[Problem]:
    """``n`` problems with 1..max_ops operations in equal shares (deterministic)."""
    rng = random.Random(seed)
    return [make_problem(rng, rng.randint(min_ops, max_ops)) for _ in range(n)]


def write_jsonl(path: str | Path, n: int, seed: int, max_ops: int = MAX_OPS) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for p in problems(n, seed, max_ops):
            f.write(json.dumps({"messages": p.messages()}) + "\n")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-ops", type=int, default=MAX_OPS)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    print(write_jsonl(args.out, args.n, args.seed, args.max_ops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
