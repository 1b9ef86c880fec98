"""ouro-mlx quantize: round-to-nearest, then loop-aware DWQ that trains the scales and
biases so that every loop step and the exit decisions stay close to the float model."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import pytest

import ouro_mlx
from ouro_mlx import quantize as Q
from ouro_mlx.calibrate import demo_data


@pytest.fixture(scope="module")
def demo():
    from ouro_mlx.demo import model_path

    model, tok = ouro_mlx.load(model_path())
    train, valid = demo_data(tok, 400, 40)
    return model, train, valid


def quantized(model, bits=2):
    q = copy.deepcopy(model)
    Q.rtn(q, {}, bits, 32)
    return q


def test_loop_aware_dwq_keeps_every_step_and_the_exits(demo):
    """2 bits, 40 steps: every step's KL falls well below round-to-nearest's, the exit
    decisions agree more, and the final-only objective leaves the early steps behind."""
    teacher, train, valid = demo
    rtn = Q.quality(quantized(teacher), teacher, valid)
    # 40 steps: at 1e-3 (the default, 0.5% of a scale per step, is set for 256 steps)
    opts = dict(num_samples=320, batch_size=8, seed=0, learning_rate=1e-3)
    aware = quantized(teacher)
    report = Q.dwq(aware, teacher, train, valid[:16], Q.DWQOptions(**opts))
    assert report["valid_after"] < report["valid_before"]
    final = quantized(teacher)
    Q.dwq(final, teacher, train, valid[:16], Q.DWQOptions(loop_aware=False, **opts))
    got, only = Q.quality(aware, teacher, valid), Q.quality(final, teacher, valid)
    assert all(a < r / 3 for a, r in zip(got["kl_by_step"], rtn["kl_by_step"]))
    assert got["exit_agreement"] > rtn["exit_agreement"]
    assert got["kl_by_step"][0] < only["kl_by_step"][0] / 3  # step 1: only one targets it
    # only the scales and biases moved: the gate and norms are the float model's
    gate = aware.model.early_exit_gate
    assert mx.array_equal(gate.weight, teacher.model.early_exit_gate.weight).item()
    assert mx.array_equal(aware.model.norm.weight, teacher.model.norm.weight).item()


def test_quantize_cli_writes_a_loadable_model(tmp_path):
    out = tmp_path / "q"
    run = subprocess.run([sys.executable, "-m", "ouro_mlx", "quantize", "--mlx-path", str(out),
                          "--bits", "3", "--group-size", "32", "--num-samples", "32"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout[:run.stdout.rindex("}") + 1])
    assert set(report) == {"rtn", "gptq", "train", "dwq"}  # dwq starts from gptq
    assert len(report["dwq"]["kl_by_step"]) == 4
    # 4 steps of 3 bits: the total falls (the late steps' KL, ~1e-6, is rounding noise)
    assert sum(report["dwq"]["kl_by_step"]) < sum(report["rtn"]["kl_by_step"])
    # one size line, ours, not mlx-lm's note for each model quantized on the way
    assert "[INFO] Quantized model" not in run.stdout + run.stderr
    wrote = run.stdout.strip().splitlines()[-1]
    assert wrote.startswith(f"Wrote {out}: 3-bit weights in groups of 32; ")
    assert "bits per parameter overall" in wrote
    import mlx_lm

    mlx_lm.load(str(out))  # stock mlx-lm reads it too (through our model class)
    model, tok = ouro_mlx.load(out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 3
    assert type(model.model.early_exit_gate).__name__ == "Linear"  # full precision
    assert ouro_mlx.generate(model, tok, "2,23", max_tokens=4) is not None
    # refusals: one line, before any work; the source is never a destination
    for argv, flag in [(["--mlx-path", str(out)], "--mlx-path"),  # exists, no --force
                       (["--mlx-path", str(tmp_path / "x"), "--num-samples", "0"],
                        "--num-samples"),
                       (["--mlx-path", str(tmp_path / "y"), "--model", str(out)], "--model"),
                       # the shell games' answers start after their chat prompt
                       (["--mlx-path", str(tmp_path / "z"), "--max-seq-length", "4"],
                        "--max-seq-length")]:
        bad = subprocess.run([sys.executable, "-m", "ouro_mlx", "quantize", *argv],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode != 0 and flag in bad.stderr.strip().splitlines()[-1], bad.stderr


def test_samples_whose_answer_lies_beyond_the_length_are_left_out_with_a_warning():
    from ouro_mlx.calibrate import cut_to
    from ouro_mlx.data import DataError

    late, early = ([1] * 10, [0] * 8 + [1] * 2), ([1] * 10, [0, 1] + [0] * 8)
    notes = []
    train, valid = cut_to([late, early], [early], 6, "data/", warn=notes.append)
    assert (train, valid) == ([early], [early])
    assert notes == ["1 of 2 training samples of data/ have no answer token within "
                     "--max-seq-length 6 and are left out"]
    with pytest.raises(DataError, match="^--max-seq-length 6: no validation sample of data/"):
        cut_to([early], [late], 6, "data/")
    assert cut_to([late], [late], 10, "data/") == ([late], [late])  # the last token counts


def test_bench_quality_compares_a_quantized_directory(tmp_path, capsys):
    """`bench --quality --quantized DIR` adds a row for DIR next to round-to-nearest at
    DIR's own bits and group size; a directory quantized by RTN matches that row (up to
    bench rounding its reference to bfloat16 first)."""
    from ouro_mlx.commands import bench

    out = tmp_path / "rtn3"
    run = subprocess.run([sys.executable, "-m", "ouro_mlx", "quantize", "--mlx-path", str(out),
                          "--bits", "3", "--group-size", "32", "--method", "rtn",
                          "--num-samples", "16"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    js = tmp_path / "q.json"
    assert bench.main(["--quality", "--model", "demo", "--dtype", "float32",
                       "--quantized", str(out), "--json-out", str(js)]) == 0
    text = capsys.readouterr().out
    assert "rtn3 KL per loop step" in text and "exit step agrees" in text
    table = json.loads(js.read_text())["runs"]["float32"]["quality"]
    assert set(table) == {"8-bit", "4-bit", "3-bit g32", "rtn3"}
    ours, bench_rtn = table["rtn3"], table["3-bit g32"]
    assert ours["kl_by_step"] == pytest.approx(bench_rtn["kl_by_step"], rel=0.2)
    assert abs(ours["exit_agreement"] - bench_rtn["exit_agreement"]) < 0.05
    for method in ("gptq", "awq"):  # written as a normal quantized directory
        dst = tmp_path / method
        run = subprocess.run([sys.executable, "-m", "ouro_mlx", "quantize", "--mlx-path",
                              str(dst), "--bits", "2", "--group-size", "32", "--method",
                              method, "--num-samples", "32"],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout[:run.stdout.rindex("}") + 1])
        assert set(report) == {"rtn", method}
        model, _ = ouro_mlx.load(dst)
        assert Q.quantized_bits(model) == (2, 32)
    from ouro_mlx.convert import mlx_to_hf

    mlx_to_hf(tmp_path / "gptq", tmp_path / "hf")  # back to float, in the HF layout
    assert not isinstance(ouro_mlx.load(tmp_path / "hf")[0].lm_head, nn.QuantizedLinear)
    with pytest.raises(ValueError, match="--quantized"):
        bench.main(["--quality", "--random", "tiny", "--quantized", str(out)])


def test_step_kl_in_spans_equals_at_once_with_its_gradient(small_dir, monkeypatch):
    """The loss and gradient made span by span (as a 49k vocabulary at 512 tokens
    needs) are the ones made at once, for the scales of lm_head and of the body; the
    KL of a model against itself is exactly 0."""
    teacher, _ = ouro_mlx.load(small_dir)
    student = quantized(teacher, 3)
    Q.make_trainable(student)
    inputs = mx.random.randint(0, teacher.args.vocab_size, (2, 9), key=mx.random.key(0))
    mask = mx.array([[0, 0, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0, 0, 0]]) > 0
    t_h, t_lam = Q.step_states(teacher, inputs, 4)
    opts = Q.DWQOptions()

    def run():
        return Q.loss_and_grad(student, teacher, inputs, mask, t_h, t_lam, opts)

    whole, grads = run()
    monkeypatch.setattr(Q, "LOGIT_ELEMENTS", 4 * teacher.args.vocab_size * 3)  # 3 rows
    spans, span_grads = run()
    assert abs(whole.item() - spans.item()) < 1e-4 * abs(whole.item())
    from mlx.utils import tree_flatten

    flat, span_flat = dict(tree_flatten(grads)), dict(tree_flatten(span_grads))
    assert set(flat) == set(span_flat) and "lm_head.scales" in flat
    for k, a in flat.items():
        assert mx.allclose(a, span_flat[k], rtol=1e-3, atol=1e-6).item(), k
    rows = Q.counted_rows(t_h, mask)
    assert rows.shape[0] == 12
    assert mx.array_equal(Q.step_kl(teacher, teacher, rows, rows), mx.zeros((12, 4))).item()


def test_a_student_shares_the_float_weights_and_never_changes_them(small_dir):
    """``shared_copy`` holds the float arrays once; quantizing the copy (rtn, gptq,
    awq: folds, clips, error feedback) and training it leave the float model as it
    was."""
    import numpy as np
    from mlx.utils import tree_flatten

    from ouro_mlx import quant_stats

    teacher, _ = ouro_mlx.load(small_dir)
    before = {k: np.array(v) for k, v in tree_flatten(teacher.parameters())}
    copy_ = Q.shared_copy(teacher)
    assert all(a is b for (_, a), (_, b) in zip(tree_flatten(teacher.parameters()),
                                                tree_flatten(copy_.parameters())))
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, teacher.args.vocab_size, 12).tolist(), [0] * 4 + [1] * 8)
               for _ in range(4)]
    for method in (quant_stats.gptq, quant_stats.awq):
        method(Q.shared_copy(teacher), {}, samples, 3, 64, batch_size=2)
    student = Q.shared_copy(teacher)
    Q.rtn(student, {}, 3, 64)
    Q.dwq(student, teacher, samples, samples[:2], Q.DWQOptions(num_samples=4, batch_size=2))
    for k, v in tree_flatten(teacher.parameters()):
        assert np.array_equal(np.array(v), before[k]), k
    assert isinstance(teacher.lm_head, nn.Linear)


def test_the_exit_cdf_term_ranks_a_flipped_exit_decision_worse():
    """Of two students, one moves a little mass between two likely steps, so that its
    cdf crosses q = 0.6 a step earlier (a changed exit decision); the other moves as
    much between two unlikely late steps (no decision moves). The exit distributions'
    KL, which divides a change by the probability, ranks the second worse; with the
    cdf term (the default) the objective ranks the first worse, as a Q-exit would."""
    from ouro_mlx import exit as ex

    def lam(pdf):  # λ_t = p_t / P(reach t); the last step takes what is left
        reach = 1 - mx.cumsum(mx.array([[0.0] + pdf[:-1]]), axis=-1)
        return mx.array([pdf]) / reach

    teacher = lam([0.05, 0.54, 0.31, 0.10])
    near = lam([0.05, 0.555, 0.295, 0.10])  # cdf at step 2: 0.59 → 0.605
    far = lam([0.05, 0.54, 0.32, 0.09])  # cdf at step 3: 0.90 → 0.91

    def step(x):
        return ex.select_exit_step(ex.exit_cdf(ex.pdf_from_lambdas(x)), 0.6).item()

    assert (step(teacher), step(near), step(far)) == (2, 1, 2)
    kl = mx.zeros((1, 4))  # the same token distributions: only the exit terms differ

    def cost(student, **opts):
        return Q.objective(kl, student, teacher, 0.6, Q.DWQOptions(**opts))[0].item()

    assert cost(far, cdf_weight=0.0) > cost(near, cdf_weight=0.0)
    assert cost(near) > cost(far)
    assert cost(teacher) < min(cost(near), cost(far))
    with pytest.raises(ValueError, match="cdf_weight"):
        Q.DWQOptions(cdf_weight=-1.0).check()
