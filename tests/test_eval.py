"""ouro-mlx eval and perplexity: every loop depth from one pass (ouro_mlx.scoring),
equal to running the model at each depth, to mlx_lm.evaluate and to demo-eval."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import mlx.core as mx
import numpy as np
import pytest

from ouro_mlx import cli
from ouro_mlx import exit as ex
from ouro_mlx.scoring import Depths, score


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def logprobs(logits: mx.array, row: list[int]) -> np.ndarray:
    """log p(row[i] | row[:i]) for i >= 1, from logits [1, S, V] of row."""
    lp = logits[0, :-1].astype(mx.float32)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    return np.array(mx.take_along_axis(lp, mx.array(row[1:])[:, None], axis=-1)[:, 0])


def test_one_pass_scores_equal_a_run_at_each_depth(tiny):
    rng = np.random.default_rng(0)
    V = tiny.args.vocab_size
    rows = [rng.integers(0, V, n).tolist() for n in (9, 5, 7)]
    masks = [[0, 0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]]
    depths = Depths((1, 2, 6), (0.3, 0.7), mixture=True)  # 6: beyond the trained 4
    assert depths.passes(tiny) == 6 and depths.keys() == ["1", "2", "6", "q0.3", "q0.7", "mix"]
    got = score(tiny, rows, masks, depths)  # right-padded together
    T = tiny.ut_steps
    for b, (row, mask) in enumerate(zip(rows, masks)):
        x = mx.array(row)[None]
        m = np.array(mask[1:], bool)
        for t in (1, 2, 6):
            logits = tiny(x, ut_steps=t, exit_threshold=1.0)
            want = logprobs(logits, row)[m].sum()
            np.testing.assert_allclose(got[str(t)].logprob[b], want, rtol=1e-5, atol=1e-5)
            greedy = np.array(mx.argmax(logits[0, :-1], -1))[m] == np.array(row[1:])[m]
            assert got[str(t)].greedy[b] == greedy.all()
            assert got[str(t)].tokens[b] == m.sum()
        out = tiny.loop_outputs(x, ut_steps=T)
        pdf = ex.exit_pdf(out.gate_logits)
        for q in (0.3, 0.7):
            want = logprobs(tiny(x, exit_threshold=q), row)[m].sum()  # Model.__call__'s Q-exit
            np.testing.assert_allclose(got[f"q{q}"].logprob[b], want, rtol=1e-5, atol=1e-5)
            steps = np.array(ex.select_exit_step(ex.exit_cdf(pdf), q))[0, :-1] + 1
            assert got[f"q{q}"].loops[b] == steps[m].sum()
        per_step = np.stack([logprobs(tiny(x, exit_at_step=t), row) for t in range(T)], -1)
        p = np.array(pdf)[0, :-1]
        want = np.log((p * np.exp(per_step)).sum(-1))[m].sum()
        np.testing.assert_allclose(got["mix"].logprob[b], want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["mix"].loops[b], (p @ np.arange(1, T + 1))[m].sum(),
                                   rtol=1e-5)


def test_long_rows_are_scored_in_spans(tiny, monkeypatch):
    """The logits of a long row are made a few positions at a time: same scores."""
    from ouro_mlx import scoring

    rng = np.random.default_rng(1)
    rows = [rng.integers(0, tiny.args.vocab_size, n).tolist() for n in (11, 6)]
    masks = [[0] + [1] * (len(r) - 1) for r in rows]
    depths = Depths((1, 3), (0.5,), mixture=True)
    whole = score(tiny, rows, masks, depths)
    monkeypatch.setattr(scoring, "LOGIT_ELEMENTS", 2 * 3 * tiny.args.vocab_size)  # 3 positions
    spans = score(tiny, rows, masks, depths)
    for key, s in whole.items():
        np.testing.assert_allclose(spans[key].logprob, s.logprob, rtol=1e-6, atol=1e-6)
        if s.greedy is not None:
            assert (spans[key].greedy == s.greedy).all()


def test_depths_refuse_nonsense():
    with pytest.raises(ValueError, match="Nothing to score"):
        Depths()
    with pytest.raises(ValueError, match="ut_steps"):
        Depths((0,))
    with pytest.raises(ValueError, match="exit_threshold"):
        Depths((1,), (1.5,))


# ---------------------------------------------------------------- perplexity


@pytest.fixture(scope="module")
def games_data(tmp_path_factory):
    from ouro_mlx.demo.task import eval_problems

    d = tmp_path_factory.mktemp("ppl")
    games = eval_problems(30)
    with open(d / "pc.jsonl", "w") as f:
        for g in games:
            f.write(json.dumps({"prompt": g.question, "completion": g.answer}) + "\n")
        f.write("not json\n")
    with open(d / "chat.jsonl", "w") as f:
        f.writelines(json.dumps({"messages": g.messages()}) + "\n" for g in games)
    (d / "text.txt").write_text("\n\n".join(f"{g.question} {g.answer}" for g in games))
    (d / "dir").mkdir()
    shutil.copy(d / "chat.jsonl", d / "dir" / "train.jsonl")
    return d


def test_perplexity_answers_by_depth(capsys, games_data):
    rc, out, err = run_cli(capsys, "perplexity", "--data-path", str(games_data / "pc.jsonl"),
                           "--ut-steps", "1-4,6", "--exit-threshold", "0.5", "0.9", "--json")
    assert rc == 0, err
    assert "pc.jsonl:31: skipped, not valid JSON" in err
    r = json.loads(out)
    assert list(r["perplexity"]) == ["1", "2", "3", "4", "6", "q0.5", "q0.9", "mix"]
    ppl = r["perplexity"]
    # the bundled model answers at 3 loops, not at 1 (answer tokens only)
    assert ppl["1"] > 1.1 and ppl["3"] < 1.01 and ppl["4"] < 1.01
    assert ppl["q0.9"] < 1.01 and 1 <= r["avg_loops"]["q0.5"] < r["avg_loops"]["q0.9"] <= 4
    assert r["rows"] == r["samples"] == 30 and r["all_data"]
    # prompt/completion and the same games as chat read the same answer tokens
    rc, out, _ = run_cli(capsys, "perplexity", "--data-path", str(games_data / "dir"), "--json")
    chat = json.loads(out)
    assert chat["tokens"] == r["tokens"]
    assert chat["perplexity"]["4"] == pytest.approx(ppl["4"], rel=1e-5)
    # every token scored: the questions are random, so far less predictable
    rc, out, _ = run_cli(capsys, "perplexity", "--data-path", str(games_data / "pc.jsonl"),
                         "--no-mask-prompt", "--json")
    assert json.loads(out)["perplexity"]["4"] > 2 * ppl["4"]


def test_perplexity_text_and_how_much_data(capsys, games_data):
    rc, out, err = run_cli(capsys, "perplexity", "--data-path", str(games_data / "text.txt"),
                           "--sequence-length", "16", "--num-samples", "5")
    assert rc == 0, err
    assert "5 rows from the first" in out and "more data left" in out
    assert out.splitlines()[1].split() == ["depth", "perplexity", "avg", "loops"]
    rc, out, _ = run_cli(capsys, "perplexity", "--data-path", str(games_data / "text.txt"),
                         "--sequence-length", "16", "--num-samples", "-1", "--json")
    r = json.loads(out)
    assert r["all_data"] and r["samples"] == 30 and r["rows"] > 5


@pytest.mark.parametrize("argv, message", [
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--data-path", "missing.jsonl"], "missing.jsonl: no such file"),
])
def test_perplexity_refuses_bad_input(capsys, games_data, argv, message):
    base = ["perplexity", "--data-path", str(games_data / "pc.jsonl")]
    rc, _, err = run_cli(capsys, *base, *argv)
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1


def test_perplexity_refuses_bad_depths(capsys, games_data):
    with pytest.raises(SystemExit):
        cli.main(["perplexity", "--data-path", str(games_data / "pc.jsonl"), "--ut-steps", "0"])
    assert "depths are >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------- eval

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (the eval extra)")


@needs_lm_eval
def test_eval_matches_mlx_lm_evaluate_and_demo_eval(capsys, tmp_path, bundled):
    """At each depth: the bundled tasks score as mlx_lm.evaluate does with the config
    set to that depth, and the generation task as demo-eval on the same games."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from mlx_lm.evaluate import MLXLM

    from ouro_mlx.demo import TASKS, model_path
    from ouro_mlx.demo.evaluate import evaluate

    n = 40
    rc, out, err = run_cli(capsys, "eval", "--tasks", "shell_game_mc", "shell_game",
                           "--limit", str(n), "--ut-steps", "1,2,4", "--json")
    assert rc == 0, err
    ours = json.loads(out)["results"]
    assert list(ours["shell_game"]) == ["1", "2", "4", "q0.6"]  # the model's threshold

    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    for key in ("2", "q0.6"):
        d = tmp_path / key
        shutil.copytree(model_path(), d)
        if key == "2":
            cfg = json.loads((d / "config.json").read_text())
            cfg.update(total_ut_steps=2, early_exit_threshold=1.0)
            (d / "config.json").write_text(json.dumps(cfg))
        lm = MLXLM(str(d), batch_size=8)
        r = lm_eval.simple_evaluate(model=lm, tasks=["shell_game_mc", "shell_game"],
                                    task_manager=manager, limit=n, log_samples=False,
                                    apply_chat_template=lm.use_chat_template)["results"]
        assert r["shell_game_mc"]["acc,none"] == ours["shell_game_mc"][key]["acc"]
        assert r["shell_game"]["exact_match,none"] == ours["shell_game"][key]["exact_match"]

    demo = evaluate(*bundled, n, depths=(1, 2, 4))
    for key, acc in demo["accuracy"].items():
        assert ours["shell_game"]["q0.6" if key == "adaptive" else key]["exact_match"] == acc
    assert ours["shell_game"]["q0.6"]["avg_loops"] == pytest.approx(
        demo["avg_loops_adaptive"], abs=1e-3)
    assert ours["shell_game_mc"]["1"]["acc"] < ours["shell_game_mc"]["4"]["acc"] == 1.0
    assert 1 < ours["shell_game_mc"]["q0.6"]["avg_loops"] < 4


@needs_lm_eval
def test_eval_one_pass_outputs_and_plot(capsys, tmp_path):
    dest = tmp_path / "results"
    argv = ["eval", "--tasks", "shell_game_mc", "--limit", "20", "--batch-size", "8",
            "--ut-steps", "1-4", "--exit-threshold", "0.5", "0.9", "--output-dir", str(dest)]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert "shell_game_mc" in out and "q0.9" in out
    report = json.loads((dest / "eval.json").read_text())
    # 20 games x 4 choices, 8 a batch: 10 passes for all six depths
    assert report["passes"] == 10
    assert set(report["results"]["shell_game_mc"]) == {"1", "2", "3", "4", "q0.5", "q0.9"}
    for key in report["results"]["shell_game_mc"]:
        lm = json.loads((dest / key / "results.json").read_text())
        assert lm["results"]["shell_game_mc"]["acc,none"] == \
            report["results"]["shell_game_mc"][key]["acc"]
    assert (dest / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 1 and "pass --force" in err
    assert run_cli(capsys, *argv, "--force")[0] == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    rc, _, err = run_cli(capsys, *argv[:-1], str(tmp_path / "mine"), "--force")
    assert rc == 1 and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    inside = tmp_path / "tasks"
    inside.mkdir()
    rc, _, err = run_cli(capsys, *argv[:-1], str(inside / "out"), "--include-path", str(inside))
    assert rc == 1 and "--output-dir" in err and "--include-path" in err


@needs_lm_eval
def test_eval_local_task_files_and_rolling(capsys, tmp_path):
    """--include-path: YAML tasks on local JSONL; rolling loglikelihood by depth."""
    from ouro_mlx.demo.task import eval_problems

    data = tmp_path / "games.jsonl"
    with open(data, "w") as f:
        for g in eval_problems(12):
            f.write(json.dumps({"text": f"{g.question}{g.answer}"}) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "games_ppl.yaml").write_text(f"""task: games_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    rc, out, err = run_cli(capsys, "eval", "--tasks", "games_ppl", "--include-path", str(tasks),
                           "--ut-steps", "1,4", "--exit-threshold", "--json")
    assert rc == 0, err
    r = json.loads(out)["results"]["games_ppl"]
    assert set(r) == {"1", "4"}
    assert all(np.isfinite(v) for row in r.values() for v in row.values())
    rc, _, err = run_cli(capsys, "eval", "--tasks", "no_such_task", "--include-path", str(tasks))
    assert rc == 1 and "--tasks: no task named no_such_task" in err


def test_eval_without_lm_eval_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    rc, _, err = run_cli(capsys, "eval", "--tasks", "shell_game")
    assert rc == 1
    assert err.strip() == "ouro-mlx eval: error: lm-eval is not installed: " \
                          'pip install "lm-eval>=0.4.9,<0.5" (or pip install ".[eval]" ' \
                          "in a checkout of ouro-mlx)"


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--include-path", "no-such-dir"], "--include-path no-such-dir: not a directory"),
])
def test_eval_refuses_bad_flags(capsys, argv, message):
    rc, _, err = run_cli(capsys, "eval", "--tasks", "shell_game", *argv)
    assert rc == 1 and message in err
