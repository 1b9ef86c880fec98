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
