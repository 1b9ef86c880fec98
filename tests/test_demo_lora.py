"""The bundled model's new skill: k-swap games for finetuning (mlx-lm's chat JSONL, held-out
games kept out) and demo-eval --swaps / --adapter-path measuring it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import ouro_mlx
from ouro_mlx.demo import model_path, task
from ouro_mlx.demo.evaluate import EVAL_SEED, evaluate
from tests.conftest import REPO
from tests.test_cli import ouro, run


def test_k_swap_games_and_replay():
    games = task.problems(2000, seed=5, max_swaps=4, min_swaps=4)
    assert {p.swaps for p in games} == {4}
    assert all(task.solve(p.question) == p.answer and len(p.answer) == 5 for p in games)
    mixed = task.problems(4000, seed=5, max_swaps=4, min_swaps=4, replay=0.25)
    share = sum(p.swaps < 4 for p in mixed) / len(mixed)
    assert 0.2 < share < 0.3 and {p.swaps for p in mixed} == {1, 2, 3, 4}
    # the shipped default draws exactly the games it always drew (figures comparable)
    assert task.problems(300, seed=7) == task.problems(300, seed=7, max_swaps=3, min_swaps=1,
                                                       replay=0.0)
    assert task.eval_problems(300, seed=7) == task.problems(300, seed=7)
    for bad in [(0, 3), (4, 3), (1, task.LONGEST + 1)]:
        with pytest.raises(ValueError, match="swaps"):
            task.problems(10, seed=0, max_swaps=bad[1], min_swaps=bad[0])
    with pytest.raises(ValueError, match="replay"):
        task.problems(10, seed=0, replay=1.5)


def test_held_out_games_never_reach_finetuning_data(tmp_path):
    held = task.eval_problems(300, max_swaps=4, min_swaps=4)
    assert all(task.held_out(p.question) for p in held)
    d = task.write_finetune_data(tmp_path / "data", 3000, valid=200, test=100)
    rows = {s: [json.loads(line) for line in (d / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "valid", "test")}
    assert [len(r) for r in rows.values()] == [3000, 200, 100]
    questions = set()
    for split in rows.values():
        for r in split:
            user, assistant = r["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert task.solve(user["content"]) == assistant["content"]
            assert not task.held_out(user["content"])
            questions.add(user["content"])
    assert not questions & {p.question for p in held}
    assert sum(r["messages"][0]["content"].count(",") == 4 for r in rows["train"]) > 2000
    with pytest.raises(ValueError, match="seed"):
        task.write_finetune_data(tmp_path / "x", 10, seed=EVAL_SEED)


def test_finetune_data_loads_in_mlx_lm_and_fits_the_model(tmp_path):
    """mlx-lm's own dataset loader reads the directory as chat data; the longest
    allowed game fits the demo model's positions."""
    from mlx_lm.tuner.datasets import load_local_dataset

    model, tokenizer = ouro_mlx.load(model_path())
    d = task.write_finetune_data(tmp_path / "data", 50, valid=10, test=10)
    train, valid, test = load_local_dataset(d, tokenizer, SimpleNamespace(mask_prompt=True))
    assert (len(train), len(valid), len(test)) == (50, 10, 10)
    tokens, offset = train.process(train[0])
    assert 0 < offset < len(tokens)
    longest = task.problems(1, seed=0, max_swaps=task.LONGEST, min_swaps=task.LONGEST)[0]
    ids = tokenizer.apply_chat_template(longest.messages())
    assert len(ids) <= model.args.max_position_embeddings


def test_task_script_writes_a_data_directory(tmp_path):
    out = run("-m", "ouro_mlx.demo.task", "--data", str(tmp_path / "d"), "--n", "40",
              "--min-swaps", "4", "--max-swaps", "4", "--replay", "0.5", "--valid", "5",
              "--test", "5")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        ".ouro-mlx.json", "test.jsonl", "train.jsonl", "valid.jsonl"]
    out = run("-m", "ouro_mlx.demo.task", "--data", str(tmp_path / "e"), "--max-swaps", "13")
    assert out.returncode == 2 and "swaps" in out.stderr.splitlines()[-1]
    assert not (tmp_path / "e").exists()
    out = run("-m", "ouro_mlx.demo.task", "--data", str(tmp_path / "d"), "--n", "10")
    assert out.returncode == 2 and "--force" in out.stderr  # not empty: refused
    out = run("-m", "ouro_mlx.demo.task", "--data", str(tmp_path / "d"), "--n", "10", "--force")
    assert out.returncode == 0 and len((tmp_path / "d/train.jsonl").read_text().splitlines()) == 10


def test_the_shipped_model_cannot_play_four_swaps():
    """What the LoRA figure starts from: 1-3 swaps solved, held-out 4-swap games not."""
    model, tokenizer = ouro_mlx.load(model_path())
    r = evaluate(model, tokenizer, 60, depths=(4,), swaps=(3, 4))
    by = r["accuracy_by_swaps"]
    assert set(by["4"]) == {"3", "4"} and r["swaps"] == [3, 4]
    assert by["4"]["3"] == 1.0 and by["4"]["4"] <= 0.2, by


def test_demo_eval_swaps_flag():
    out = ouro("demo-eval", "--n", "20", "--swaps", "4", "--json", "--details")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["swaps"] == [4, 4] and set(r["accuracy_by_swaps"]["adaptive"]) == {"4"}
    for bad in ["0", "3-2", "13", "x"]:
        out = ouro("demo-eval", "--swaps", bad)
        assert out.returncode == 2 and "--swaps" in out.stderr.splitlines()[-1], bad


def test_demo_eval_measures_a_model_with_adapters(tmp_path):
    """--adapter-path applies ouro-mlx lora's adapters (here freshly initialised per-loop
    ones: LoRA B = 0, so the answers are the bundled model's); a bad path is one line."""
    from ouro_mlx.adapters import adapter_config, apply_adapters, save_adapters

    model, _ = ouro_mlx.load(model_path())
    lora = {"rank": 2, "scale": 20.0, "dropout": 0.0}
    apply_adapters(model, per_loop=True, lora_parameters=lora)
    save_adapters(tmp_path / "ad", model, adapter_config({"lora_parameters": lora}))
    args = ("demo-eval", "--n", "24", "--swaps", "2-3", "--json")
    plain, adapted = ouro(*args), ouro(*args, "--adapter-path", str(tmp_path / "ad"))
    assert adapted.returncode == 0, adapted.stderr
    assert json.loads(adapted.stdout) == json.loads(plain.stdout)
    out = ouro(*args, "--adapter-path", str(tmp_path / "missing"))
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "missing" in out.stderr


@pytest.mark.parametrize("script", ["demo_lora.py", "lora_vs_mlx_lm.py", "qlora_memory.py"])
def test_figure_scripts_print_usage(script):
    out = run(str(REPO / "examples" / script), "--help")
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr


def test_demo_lora_example_shows_progress_as_it_goes(tmp_path):
    """Every long step says so when it starts, and lora's bar streams live (the
    script's first line arrives while it still runs)."""
    import subprocess
    import sys

    from tests.test_cli import ENV

    p = subprocess.Popen([sys.executable, str(REPO / "examples" / "demo_lora.py"), "--out",
                          str(tmp_path / "out"), "--iters", "2", "--eval", "20",
                          "--train-games", "32", "--batch-size", "4", "--loss", "fixed"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**ENV, "OURO_MLX_NO_PRELOAD": "1"})
    first = p.stdout.readline()
    assert first.startswith("writing 32 finetuning games") and p.poll() is None
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    lines = out.replace("\r", "\n").splitlines()
    assert sum(line.startswith("measuring ") for line in lines) == 3
    assert sum(line.startswith("  done in ") for line in lines) == 3
    assert sum(line.startswith("$ ouro-mlx lora") for line in lines) == 2
    assert any(line.startswith("lora: ") and "2/2" in line for line in lines)
