"""Accuracy of a model on held-out task problems at each fixed loop depth and with
adaptive exit (``ouro-mlx demo-eval``)."""

from __future__ import annotations

from ..encoding import encode_chat
from ..generation import batch_generate
from .task import EVAL_SEED, MAX_SWAPS, eval_problems

__all__ = ["EVAL_SEED", "evaluate"]


def evaluate(model, tokenizer, n: int = 500, *, seed: int = EVAL_SEED,
             exit_threshold: float | None = None, batch_size: int = 100,
             depths: tuple[int, ...] | None = None, kv_mode: str = "full",
             swaps: tuple[int, int] = (1, MAX_SWAPS)) -> dict:
    """Exact-match accuracy at T = 1..T_max (every token, prompt included, runs T loop
    steps) and with adaptive exit (prompt at full depth, each decoded token stops at
    the gate's Q-exit threshold: ``exit_threshold`` or the model's default).
    ``avg_loops_adaptive`` averages the loop steps of decoded tokens (the first answer
    token comes from the full-depth prompt and is not counted). ``depths``: the fixed
    depths to measure (default all). ``kv_mode`` "last": one KV cache shared by
    all loop steps (what ``--kv-mode last`` costs in answers). ``swaps``: the games'
    (min, max) number of swaps, in equal shares; beyond MAX_SWAPS only games held out
    of finetuning data (:func:`ouro_mlx.demo.task.eval_problems`)."""
    probs = eval_problems(n, seed, swaps[1], swaps[0])
    prompts = [encode_chat(tokenizer, p.messages()[:1], add_generation_prompt=True)
               for p in probs]
    T_max = model.args.total_ut_steps
    q = model.exit_threshold if exit_threshold is None else exit_threshold
    if q is None or not 0 <= q <= 1:
        raise ValueError(f"exit_threshold must be in [0, 1], got {q}.")

    def run(**opts):
        texts, loops = [], []
        for i in range(0, n, batch_size):
            out = batch_generate(model, tokenizer, prompts[i:i + batch_size],
                                 max_tokens=swaps[1] + 2, kv_mode=kv_mode, **opts)
            texts += out.texts
            loops += out.loops
        return [t == p.answer for t, p in zip(texts, probs)], loops

    accuracy, by_swaps = {}, {}
    for T in range(1, T_max + 1) if depths is None else depths:
        ok, _ = run(ut_steps=T, exit_threshold=1.0)  # exactly T steps, not Q-exit capped at T
        accuracy[str(T)] = round(sum(ok) / n, 4)
        by_swaps[str(T)] = _by_swaps(ok, probs)
    ok, loops = run(exit_threshold=q)
    accuracy["adaptive"] = round(sum(ok) / n, 4)
    by_swaps["adaptive"] = _by_swaps(ok, probs)
    decoded = [x for row in loops for x in row[1:]]
    return {
        "accuracy": accuracy,
        "avg_loops_adaptive": round(sum(decoded) / max(len(decoded), 1), 3),
        "exit_threshold": q,
        "kv_mode": kv_mode,
        "problems": n,
        "swaps": list(swaps),
        "accuracy_by_swaps": by_swaps,
    }


def _by_swaps(ok: list[bool], probs) -> dict:
    out = {}
    for k in sorted({p.swaps for p in probs}):
        sel = [o for o, p in zip(ok, probs) if p.swaps == k]
        out[str(k)] = round(sum(sel) / len(sel), 4)
    return out
