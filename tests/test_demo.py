"""The bundled demo model: its task, its shipped weights (what looping buys, checked on
held-out problems), the commands that use it by default, and its recipe end to end."""

from __future__ import annotations

import json
import random

import pytest

import ouro_mlx
from ouro_mlx.demo import MODEL_DIR, model_path, task
from ouro_mlx.demo.evaluate import EVAL_SEED, evaluate
from tests.test_cli import ouro


def test_task_answers_and_generator():
    assert task.solve("2,23,14,31") == "=133"  # 2→3, 3 stays, 3→1; last first
    assert task.solve("1,12") == "=2" and task.solve("4,12,21") == "=44"
    for bad in ["", "1", "1,", "5,12", "1,11", "1,123", "12,34", "1;12", "a,ab"]:
        with pytest.raises(ValueError):
            task.solve(bad)
    a, b = task.problems(400, seed=3), task.problems(400, seed=3)
    assert a == b and a != task.problems(400, seed=4)
    assert {p.swaps for p in a} == set(range(1, task.MAX_SWAPS + 1))
    for p in a[:50]:  # tracking the ball through a list of cups, written independently
        start, *swaps = p.question.split(",")
        cups = {c: c == start for c in task.CUPS}
        seen = []
        for x, y in swaps:
            cups[x], cups[y] = cups[y], cups[x]
            seen.append(next(c for c, ball in cups.items() if ball))
        assert p.answer == "=" + "".join(reversed(seen))
    rng = random.Random(0)
    assert len(task.make_problem(rng, 3).question) == 1 + 3 * 3


def test_shipped_model_shows_what_looping_buys():
    """On held-out problems: T=4 well above T=1; adaptive exit runs clearly fewer
    than 4 loops per decoded token and stays within 2 points of T=4."""
    model, tokenizer = ouro_mlx.load(model_path())
    assert model.args.total_ut_steps == 4
    assert sum((MODEL_DIR / f).stat().st_size for f in ["model.safetensors"]) < 8e6
    r = evaluate(model, tokenizer, 300, seed=EVAL_SEED)
    acc = r["accuracy"]
    assert acc["4"] >= acc["1"] + 0.3, acc
    assert acc["adaptive"] >= acc["4"] - 0.02, acc
    assert r["avg_loops_adaptive"] <= 3.0, r


def test_generate_and_demo_eval_use_the_bundled_model():
    out = ouro("generate", "--prompt", "2,23,14,31", "--exit-at-step", "3")
    assert out.returncode == 0, out.stderr
    assert "bundled demo model" in out.stderr and "--model" in out.stderr
    assert out.stdout.strip() == "=133"
    out = ouro("generate", "--prompt", "2,23,14,31", "--show-depth")
    assert out.returncode == 0 and "loop steps per token:" in out.stderr
    out = ouro("demo-eval", "--json", "--n", "40")
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    assert set(figures) == {"accuracy", "avg_loops_adaptive"}
    assert set(figures["accuracy"]) == {"1", "2", "3", "4", "adaptive"}
    assert ouro("demo-eval", "--n", "0").returncode != 0


def test_shared_kv_cache_costs_the_demo_model_its_answers():
    """--kv-mode last (one cache for all loop steps) is measured, not hidden: the
    bundled model, trained with a cache per step, loses most of its accuracy."""
    model, tokenizer = ouro_mlx.load(model_path())
    full = evaluate(model, tokenizer, 60, depths=(1, 4))
    last = evaluate(model, tokenizer, 60, depths=(1, 4), kv_mode="last")
    assert last["kv_mode"] == "last" and full["kv_mode"] == "full"
    assert last["accuracy"]["1"] == full["accuracy"]["1"]  # one step: the same cache
    assert last["accuracy"]["4"] <= full["accuracy"]["4"] - 0.5, (full, last)
    out = ouro("demo-eval", "--help")
    assert "--kv-mode" in out.stdout and "kv-mode last" in out.stdout


def test_recipe_runs_end_to_end(tmp_path):
    """The recipe at a tiny scale: every stage runs and leaves a loadable model."""
    out = ouro("demo-train", "--out", str(tmp_path / "demo"), "--scale", "0.003", timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    d = tmp_path / "demo"
    for f in ["recipe.json", "stage1.yaml", "stage2.yaml", "eval.json", "threshold_sweep.json",
              "stage1/training.png", "stage2/training.png"]:
        assert (d / f).exists(), f
    figures = json.loads((d / "eval.json").read_text())
    assert set(figures["accuracy"]) == {"1", "2", "3", "4", "adaptive"}
    model, tokenizer = ouro_mlx.load(d / "model")
    from ouro_mlx.demo.recipe import RECIPE

    assert model.exit_threshold in RECIPE["exit_thresholds"]  # chosen on validation games
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "1,12"}],
                                        add_generation_prompt=True, tokenize=False)
    assert ids == "<|im_start|>user\n1,12<|im_end|>\n<|im_start|>assistant\n"
    assert ouro("demo-train", "--out", str(d)).returncode != 0  # not empty: refused


def test_chat_with_the_bundled_model_answers_each_game_afresh():
    games = ["2,23,14,31", "1,12,34", "3,13,24,41"]
    out = ouro("chat", stdin="\n".join(games) + "\n")
    assert out.returncode == 0, out.stderr
    assert "bundled demo model" in out.stderr and "new conversation" in out.stdout
    answers = [line.removeprefix(">> ").strip() for line in out.stdout.splitlines()
               if line.startswith(">> =")]
    assert answers == [task.solve(g) for g in games]
