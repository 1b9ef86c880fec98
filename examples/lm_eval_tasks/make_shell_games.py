"""Write the shell-game data that the lm-eval tasks in this directory read.

    python examples/lm_eval_tasks/make_shell_games.py --n 500

writes ``shell_game.jsonl`` next to this script, one held-out evaluation game a line
(the games ``ouro-mlx demo-eval`` measures, :func:`ouro_mlx.demo.task.eval_problems`):

    {"question": "2,23,14,31", "prompt": "<|im_start|>user\\n2,23,14,31<|im_end|>\\n
     <|im_start|>assistant\\n", "answer": "=133", "swaps": 3,
     "choices": ["=311", "=133", ...], "label": 1}

``prompt`` is the question in the bundled model's chat template, ending in the
generation prompt: a completions endpoint applies no template, so the tasks send this
text. ``choices`` are the answers for each of the four start cups with the same swaps
(all different: a permutation moves every cup), ``label`` the real start's.

The tasks' ``data_files`` are relative to the directory lm-eval runs in: run
``lm_eval`` from the repository root.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ouro_mlx.demo import model_path
from ouro_mlx.demo.task import CUPS, EVAL_SEED, MAX_SWAPS, eval_problems, solve
from ouro_mlx.encoding import apply_template, encode_chat
from ouro_mlx.loading import load_tokenizer

HERE = Path(__file__).parent


def record(tokenizer, question: str, answer: str, swaps: int) -> dict:
    messages = [{"role": "user", "content": question}]
    prompt = apply_template(
        tokenizer, messages, add_generation_prompt=True, tokenize=False
    )
    # lm-eval tokenizes the prompt text (tokenizer=DIR: transformers' encode, special
    # tokens split out); it must give the ids demo-eval feeds the model.
    ids = encode_chat(tokenizer, messages, add_generation_prompt=True)
    if tokenizer.encode(prompt, add_special_tokens=False) != ids:
        raise ValueError(f"the chat-templated text of {question!r} does not tokenize "
                         "back to the ids of encode_chat.")
    start, moves = question.split(",", 1)
    choices = [solve(f"{cup},{moves}") for cup in CUPS]
    return {"question": question, "prompt": prompt, "answer": answer, "swaps": swaps,
            "choices": choices, "label": CUPS.index(start)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500, help="games")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--min-swaps", type=int, default=1)
    p.add_argument("--max-swaps", type=int, default=MAX_SWAPS)
    p.add_argument("--out", type=Path, default=HERE / "shell_game.jsonl")
    args = p.parse_args(argv)

    tokenizer = load_tokenizer(model_path())  # mlx-lm's wrapper, as demo-eval has it
    try:
        games = eval_problems(args.n, args.seed, args.max_swaps, args.min_swaps)
    except ValueError as e:
        p.error(str(e))
    tmp = args.out.with_name(args.out.name + ".tmp")
    with open(tmp, "w") as f:
        for g in games:
            f.write(json.dumps(record(tokenizer, g.question, g.answer, g.swaps)) + "\n")
    tmp.replace(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
