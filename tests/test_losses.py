"""Training objectives against plain NumPy versions of the paper's formulas."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.trainer import default_loss

from ouro_mlx import load_model
from ouro_mlx.losses import (
    fixed_depth_loss,
    loss_report,
    make_loss,
    stage1_loss,
    stage2_loss,
)

BATCH = mx.array([[5, 17, 300, 42, 7, 99, 128, 3], [1, 2, 3, 4, 5, 6, 7, 8]])
LENGTHS = mx.array([[1, 7], [3, 6]])  # row 0: every target; row 1: targets 3..6


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(tiny_dir)


def numpy_terms(model):
    out = model.loop_outputs(BATCH[:, :-1])
    targets = np.array(BATCH[:, 1:])
    ce = []
    for h in out.hidden:
        logits = np.array(model.lm_head(h), dtype=np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ce.append(-np.take_along_axis(logp, targets[..., None], -1)[..., 0])
    ce = np.stack(ce, -1)
    g = np.stack([np.array(x, dtype=np.float64) for x in out.gate_logits], -1)
    lam = 1 / (1 + np.exp(-g))
    T = g.shape[-1]
    pdf, surv = np.zeros_like(lam), np.ones(lam.shape[:-1])
    for t in range(T):
        pdf[..., t] = lam[..., t] * surv if t < T - 1 else surv
        surv = surv * (1 - lam[..., t])
    steps = np.arange(1, targets.shape[1] + 1)
    L = np.array(LENGTHS)
    mask = (steps >= L[:, :1]) & (steps <= L[:, 1:])
    return ce, g, lam, pdf, mask


def test_stage1_matches_formula(model):
    ce, _, _, pdf, mask = numpy_terms(model)
    for beta in (0.0, 0.1):
        H = -(pdf * np.log(pdf)).sum(-1)
        want = (((pdf * ce).sum(-1) - beta * H) * mask).sum() / mask.sum()
        loss, ntoks = stage1_loss(model, BATCH, LENGTHS, beta=beta)
        assert ntoks.item() == mask.sum() == 11
        assert loss.item() == pytest.approx(want, abs=1e-4)


def test_stage2_matches_formula(model):
    ce, g, lam, _, mask = numpy_terms(model)
    T = ce.shape[-1]
    total = 0.0
    for t in range(1, T):
        w = 1 / (1 + np.exp(-50 * (np.maximum(ce[..., t - 1] - ce[..., t], 0) - 0.005)))
        total = total - (w * np.log(1 - lam[..., t]) + (1 - w) * np.log(lam[..., t]))
    want = (total / T * mask).sum() / mask.sum()
    loss, _ = stage2_loss(model, BATCH, LENGTHS)
    assert loss.item() == pytest.approx(want, abs=1e-4)


def test_stage2_trains_only_the_gate(model):
    grads = nn.value_and_grad(model, lambda m: stage2_loss(m, BATCH, LENGTHS)[0])(model)[1]
    flat = dict(tree_flatten(grads))
    assert float(mx.abs(flat["model.early_exit_gate.weight"]).sum()) > 0
    # the LM losses are detached: no gradient reaches lm_head
    assert float(mx.abs(flat["lm_head.weight"]).sum()) == 0


def test_fixed_depth_equals_mlx_lm_default_loss(model):
    loss, n = fixed_depth_loss(model, BATCH, LENGTHS)
    want, n2 = default_loss(model, BATCH, LENGTHS)
    assert loss.item() == pytest.approx(want.item(), abs=1e-5) and n.item() == n2.item()
    one, _ = fixed_depth_loss(model, BATCH, LENGTHS, ut_steps=1)
    assert one.item() != pytest.approx(loss.item())


def test_report(model):
    ce, _, _, pdf, mask = numpy_terms(model)
    r = loss_report(model, BATCH, LENGTHS)
    np.testing.assert_allclose(r["step_losses"], (ce * mask[..., None]).sum((0, 1)) / mask.sum(),
                               atol=1e-4)
    np.testing.assert_allclose(sum(r["exit_dist"]), 1.0, atol=1e-5)
    assert 1.0 <= r["expected_loops"] <= 4.0 and r["ntoks"] == 11


def test_losses_plug_into_mlx_lm_trainer(tiny_dir, tmp_path):
    """mlx-lm's own trainer runs Ouro with the Stage-I loss and lowers it."""
    from mlx_lm.tuner.trainer import TrainingArgs, train

    model = load_model(tiny_dir)
    rng = np.random.default_rng(0)
    pattern = rng.integers(20, 200, size=8).tolist()
    data = [(pattern * 4, 0)] * 16  # (tokens, offset) items, as mlx-lm's datasets give
    loss = make_loss("stage1", beta=0.1)
    before = loss(model, mx.array([pattern * 4]), mx.array([[1, 31]]))[0].item()
    args = TrainingArgs(batch_size=4, iters=30, steps_per_report=100, steps_per_eval=1000,
                        steps_per_save=1000, val_batches=1, max_seq_length=64,
                        adapter_file=str(tmp_path / "a.safetensors"))
    train(model, optim.Adam(learning_rate=3e-3), data, data, args, loss=loss)
    after = loss(model, mx.array([pattern * 4]), mx.array([[1, 31]]))[0].item()
    assert after < before * 0.7


def test_unknown_loss():
    with pytest.raises(ValueError, match="Unknown loss"):
        make_loss("stage3")
