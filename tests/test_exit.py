"""The exit math in isolation (no model)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from ouro_mlx import exit as ex


def reference_pdf(g: np.ndarray) -> np.ndarray:
    """Spec §3.4 written as the official loop, in float64."""
    lam = 1 / (1 + np.exp(-g.astype(np.float64)))
    T = g.shape[-1]
    rem = np.ones(g.shape[:-1])
    out = []
    for t in range(T):
        out.append(lam[..., t] * rem if t < T - 1 else rem)
        rem = rem * (1 - lam[..., t])
    return np.stack(out, -1)


def test_pdf_matches_loop_and_sums_to_one():
    g = np.random.default_rng(0).normal(0, 3, size=(2, 5, 4)).astype(np.float32)
    pdf = ex.exit_pdf(mx.array(g))
    np.testing.assert_allclose(np.array(pdf), reference_pdf(g), atol=1e-6)
    np.testing.assert_allclose(np.array(pdf.sum(-1)), 1.0, atol=1e-6)


def test_list_and_stacked_inputs_agree():
    g = [mx.random.normal((2, 3), key=mx.random.key(i)) for i in range(4)]
    assert mx.array_equal(ex.exit_pdf(g), ex.exit_pdf(mx.stack(g, -1)))


def test_last_step_lambda_is_ignored():
    g = mx.array([[[0.3, -1.0, 2.0, 50.0]]])
    h = mx.array([[[0.3, -1.0, 2.0, -50.0]]])
    assert mx.array_equal(ex.exit_pdf(g), ex.exit_pdf(h))


def test_first_step_over_threshold_else_last():
    cdf = mx.array([[[0.1, 0.6, 0.9, 1.0], [0.1, 0.2, 0.3, 1.0], [0.7, 0.8, 0.9, 1.0]]])
    assert ex.select_exit_step(cdf, 0.5).tolist() == [[1, 3, 0]]
    assert ex.select_exit_step(cdf, 0.0).tolist() == [[0, 0, 0]]
    assert ex.select_exit_step(cdf, 0.9).tolist() == [[2, 3, 2]]


def test_threshold_one_means_last_step_even_with_saturated_gates():
    # In bfloat16 the official code's cdf reaches exactly 1.0 here after step 0 and
    # it would exit there; float32 math with q = 1.0 keeps the full depth.
    g = mx.array([[[8.0, 8.0, 8.0, 0.0]]], dtype=mx.bfloat16)
    cdf = ex.exit_cdf(ex.exit_pdf(g))
    assert cdf.dtype == mx.float32 and cdf[0, 0, 0].item() < 1.0
    bf16_cdf = mx.cumsum(ex.exit_pdf(g).astype(mx.bfloat16), -1)
    assert bf16_cdf[0, 0, 0].item() == 1.0  # what the bf16 computation would see
    assert ex.select_exit_step(cdf, 1.0).tolist() == [[3]]


def test_single_step():
    g = mx.zeros((1, 2, 1))
    pdf = ex.exit_pdf(g)
    assert pdf.tolist() == [[[1.0], [1.0]]]
    assert ex.select_exit_step(ex.exit_cdf(pdf), 0.5).tolist() == [[0, 0]]


@pytest.mark.parametrize("q", [-0.1, 1.5, float("nan")])
def test_threshold_out_of_range(q):
    with pytest.raises(ValueError, match="exit_threshold"):
        ex.select_exit_step(mx.ones((1, 1, 4)), q)


def test_gather_and_expected():
    steps = [mx.full((1, 2, 3), float(t)) for t in range(4)]
    idx = mx.array([[2, 0]])
    assert ex.gather_steps(steps, idx)[..., 0].tolist() == [[2.0, 0.0]]
    pdf = mx.array([[[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]])
    np.testing.assert_allclose(np.array(ex.expected_logits(steps, pdf))[..., 0],
                               [[1.5, 0.0]])
