"""The bundled demo: a small Ouro model trained by this package's own training path
on a task where depth matters (:mod:`ouro_mlx.demo.task`), shipped inside the package
so that ``ouro-mlx chat`` and ``ouro-mlx generate`` work offline at once.

- :mod:`.task` — the synthetic task and its generator;
- :mod:`.evaluate` — accuracy at each fixed depth and with adaptive exit
  (``ouro-mlx demo-eval``);
- ``tasks/`` — the task as lm-eval tasks (``ouro-mlx eval --tasks shell_game
  shell_game_mc``);
- :mod:`.recipe` — the recipe that trains it from nothing (``ouro-mlx demo-train``).
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
TASKS = Path(__file__).parent / "tasks"  # lm-eval task files, always on ouro-mlx eval's path

NOTE = ("(bundled demo model: the shell game, e.g. 2,23,14,31 -> =133; "
        "real checkpoints are one flag away: --model ByteDance/Ouro-1.4B-Thinking)")


def model_path() -> Path:
    """The shipped model's directory (an ordinary checkpoint directory)."""
    if not (MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"The bundled demo model is missing from {MODEL_DIR}; reinstall ouro-mlx or "
            "pass --model.")
    return MODEL_DIR


def shell_game_vocab() -> dict[str, int]:
    """The bundled demo model's vocabulary (token -> id); empty if it is missing."""
    import json

    try:
        data = json.loads((MODEL_DIR / "tokenizer.json").read_text(encoding="utf-8"))
        return {**data["model"]["vocab"],
                **{t["content"]: t["id"] for t in data.get("added_tokens") or []}}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def plays_the_shell_game(tokenizer) -> bool:
    """Whether the model reads the bundled demo model's vocabulary, which was made for
    its shell game: the bundled model, or one made from it (lora + fuse, quantize,
    convert), all trained on single games. The tokenizer files travel with every
    such model unchanged, so this needs no marker of its own."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, TypeError):
        return False
    return bool(vocab) and vocab == shell_game_vocab()
