"""The shell game's held-out games as an lm-eval dataset (the tasks in this directory).

The first N games are those ``ouro-mlx demo-eval --n N`` plays: ``ouro-mlx eval
--tasks shell_game --limit N`` scores the same games. ``choices`` are the answers for
each of the four start cups with the same swaps (all different: a permutation moves
every cup), ``label`` the real start's.
"""

from __future__ import annotations

from ouro_mlx.demo.task import CUPS, EVAL_SEED, MAX_SWAPS, eval_problems, solve


def records(games: int = 1000, seed: int = EVAL_SEED, max_swaps: int = MAX_SWAPS) -> list[dict]:
    out = []
    for g in eval_problems(games, seed, max_swaps):
        start, moves = g.question.split(",", 1)
        out.append({"question": g.question, "answer": g.answer, "swaps": g.swaps,
                    "choices": [solve(f"{cup},{moves}") for cup in CUPS],
                    "label": CUPS.index(start)})
    return out


def dataset(games: int = 1000, **_):
    """lm-eval's ``custom_dataset``: {"test": the games} (other metadata ignored)."""
    from datasets import Dataset

    return {"test": Dataset.from_list(records(int(games)))}
