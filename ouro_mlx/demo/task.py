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

or a finetuning data directory for ``ouro-mlx lora --data DIR`` (mlx-lm's chat format,
``{"messages": [...]}`` per line in ``train.jsonl``, ``valid.jsonl``, ``test.jsonl``):
4-swap games, a new skill for the shipped model (trained on 1 to 3 swaps), with a
quarter of 1-3-swap games replayed so that the old skill is kept:

    python -m ouro_mlx.demo.task --data data4 --n 20000 --min-swaps 4 --max-swaps 4 \\
        --replay 0.25

One game in ten (by a hash of its question, :func:`held_out`) never appears in
finetuning data: the held-out games that ``ouro-mlx demo-eval --swaps 4`` measures.
"""

from __future__ import annotations

import argparse
import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

CUPS = "1234"
MAX_SWAPS = 3  # what the shipped model was trained on
LONGEST = 12  # a 12-swap game, prompt and answer, is 61 tokens: the demo model has 64 positions
HELD_OUT = 10  # one game in HELD_OUT is held out of finetuning data
EVAL_SEED = 10_000  # held-out evaluation games; training data uses seeds below this


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


def held_out(question: str) -> bool:
    """Whether a game is held out of finetuning data (fixed by its text alone)."""
    return zlib.crc32(question.encode()) % HELD_OUT == 0


def check_swaps(min_swaps: int, max_swaps: int) -> None:
    if not 1 <= min_swaps <= max_swaps <= LONGEST:
        raise ValueError(f"swaps must satisfy 1 <= min <= max <= {LONGEST} (longer games "
                         f"outgrow the demo model's 64 positions), got {min_swaps}-{max_swaps}.")


def problems(n: int, seed: int, max_swaps: int = MAX_SWAPS, min_swaps: int = 1, *,
             replay: float = 0.0, keep=None) -> list[Problem]:
    """``n`` games with min_swaps..max_swaps swaps in equal shares (deterministic).
    ``replay``: the share of games drawn with 1..MAX_SWAPS swaps instead (the shipped
    skill, kept while learning a new one). ``keep(question)``: games it refuses are
    drawn again with the same number of swaps."""
    check_swaps(min_swaps, max_swaps)
    if not 0 <= replay <= 1:
        raise ValueError(f"replay must be in [0, 1], got {replay}.")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lo, hi = (1, MAX_SWAPS) if replay and rng.random() < replay else (min_swaps, max_swaps)
        k = rng.randint(lo, hi)
        for _ in range(1000):
            p = make_problem(rng, k)
            if keep is None or keep(p.question):
                break
        else:
            raise ValueError(f"no {k}-swap game passes the filter.")
        out.append(p)
    return out


def eval_problems(n: int, seed: int = EVAL_SEED, max_swaps: int = MAX_SWAPS,
                  min_swaps: int = 1) -> list[Problem]:
    """Evaluation games: beyond MAX_SWAPS swaps only held-out ones (never in finetuning
    data); up to MAX_SWAPS any game, as the shipped model's figures were measured
    (its 100,000 training games covered nearly all 7,536 such games anyway)."""
    return problems(n, seed, max_swaps, min_swaps,
                    keep=lambda q: q.count(",") <= MAX_SWAPS or held_out(q))


def write_jsonl(path: str | Path, n: int, seed: int, max_swaps: int = MAX_SWAPS,
                min_swaps: int = 1, *, replay: float = 0.0, keep=None) -> Path:
    path = Path(path)
    games = problems(n, seed, max_swaps, min_swaps, replay=replay, keep=keep)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps({"messages": p.messages()}) + "\n" for p in games)
    tmp.replace(path)
    return path


def write_finetune_data(out: str | Path, n: int, *, seed: int = 0, min_swaps: int = 4,
                        max_swaps: int = 4, replay: float = 0.25, valid: int = 500,
                        test: int = 500, force: bool = False) -> Path:
    """``train.jsonl`` (``n`` games, ``seed``), ``valid.jsonl`` (seed + 1) and
    ``test.jsonl`` (seed + 2) in mlx-lm's chat format, none holding a held-out game.
    The directory appears whole or not at all (``force``: replace a non-empty one)."""
    from ..loading import atomic_directory

    check_swaps(min_swaps, max_swaps)
    if not 0 <= replay <= 1:
        raise ValueError(f"replay must be in [0, 1], got {replay}.")
    if n < 1 or valid < 1 or test < 1:
        raise ValueError(f"every split needs a game: n={n}, valid={valid}, test={test}.")
    if not 0 <= seed < EVAL_SEED - 2:
        raise ValueError(f"seed must be in [0, {EVAL_SEED - 3}] (evaluation uses "
                         f"{EVAL_SEED}), got {seed}.")
    out = Path(out)
    with atomic_directory(out, force) as tmp:
        for i, (split, size) in enumerate((("train", n), ("valid", valid), ("test", test))):
            write_jsonl(tmp / f"{split}.jsonl", size, seed + i, max_swaps, min_swaps,
                        replay=replay, keep=lambda q: not held_out(q))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000, help="games (in --data: training games)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-swaps", type=int, default=1)
    p.add_argument("--max-swaps", type=int, default=MAX_SWAPS)
    p.add_argument("--replay", type=float, default=0.0,
                   help=f"share of games with 1..{MAX_SWAPS} swaps instead")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="one JSONL file of games (any game)")
    out.add_argument("--data", help="a directory for train/valid/test.jsonl without held-out "
                                    "games (ouro-mlx lora --data)")
    p.add_argument("--valid", type=int, default=500, help="with --data: validation games")
    p.add_argument("--test", type=int, default=500, help="with --data: test games")
    p.add_argument("--force", action="store_true", help="with --data: replace a non-empty one")
    args = p.parse_args(argv)
    try:
        if args.data:
            path = write_finetune_data(args.data, args.n, seed=args.seed,
                                       min_swaps=args.min_swaps, max_swaps=args.max_swaps,
                                       replay=args.replay, valid=args.valid, test=args.test,
                                       force=args.force)
        else:
            path = write_jsonl(args.out, args.n, args.seed, args.max_swaps, args.min_swaps,
                               replay=args.replay)
    except (ValueError, OSError) as e:
        p.error(str(e))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
