from __future__ import annotations

import os
from pathlib import Path

# CUDA and Apple M5 run float32 matmuls as TF32; float32 parity needs full float32.
# Set before mlx is imported; subprocesses inherit it (every test's env copies os.environ).
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ouro_mlx.random_model import make_random_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Reference data of the official PyTorch code lives outside the repository:
# OURO_MLX_FIXTURES, or a shared/fixtures folder beside the checkout.
FIXTURES = Path(os.environ.get("OURO_MLX_FIXTURES") or REPO.parent / "shared" / "fixtures")
REFERENCE = FIXTURES / "ouro-reference" / "A"
TOKENIZER = FIXTURES / "ouro-tokenizer"

needs_reference = pytest.mark.skipif(
    not (REFERENCE / "expected.npz").exists(),
    reason=f"reference fixture not found at {REFERENCE} (set OURO_MLX_FIXTURES)",
)
needs_tokenizer = pytest.mark.skipif(
    not (TOKENIZER / "tokenizer.json").exists(),
    reason=f"Ouro tokenizer fixture not found at {TOKENIZER} (set OURO_MLX_FIXTURES)",
)


def to_np(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A random tiny Ouro checkpoint in the HF layout (float32, GQA, T=4)."""
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=1)


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory) -> Path:
    """Hidden 256: wide enough for group-64 quantization of every projection."""
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", "small", seed=2)


class IdsOnly:
    """No tokenizer needed: the engine only needs eos ids and a detokenizer."""

    eos_token_ids: set = set()
    detokenizer = type("D", (), {"reset": lambda s: None, "add_token": lambda s, t: None,
                                 "finalize": lambda s: None, "last_segment": ""})()


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    """The tiny checkpoint, loaded (one per test module)."""
    import ouro_mlx

    model, _ = ouro_mlx.load(tiny_dir)
    return model


@pytest.fixture(scope="module")
def bundled():
    """The bundled demo model and its tokenizer."""
    import ouro_mlx
    from ouro_mlx import demo

    return ouro_mlx.load(demo.model_path())


@pytest.fixture(scope="module")
def agreeing(tiny_dir):
    """The tiny model with its sub-layer outputs scaled by 0.05 (the ``_2`` norms'
    weights) and a unit final norm: loop steps change the state a little, so early
    steps' readouts often but not always match the last step's (about 0.4-0.8)."""
    import ouro_mlx

    model, _ = ouro_mlx.load(tiny_dir)
    model.model.norm.weight = mx.ones_like(model.model.norm.weight)
    for layer in model.model.layers:
        layer.input_layernorm_2.weight = 0.05 * layer.input_layernorm_2.weight
        layer.post_attention_layernorm_2.weight = 0.05 * layer.post_attention_layernorm_2.weight
    return model


def assert_pairs_follow_the_target(run, n: int = 1500) -> None:
    """A vocabulary of 4, depth 2: ``run(model, prompt)`` (3 sampled tokens) n times;
    the empirical distribution of the 2nd and 3rd tokens must match the exact one
    (chi-square, df 15, p = 0.001)."""
    import itertools

    from ouro_mlx.model import Model, ModelArgs

    mx.random.seed(3)
    args = ModelArgs(model_type="ouro", hidden_size=32, num_hidden_layers=1,
                     intermediate_size=64, num_attention_heads=2, vocab_size=4,
                     total_ut_steps=2)
    model = Model(args)
    model.lm_head.weight = model.lm_head.weight * 4  # spread the distributions
    mx.eval(model.parameters())
    prompt, V = [1, 2, 3], 4
    triples = list(itertools.product(range(V), repeat=3))
    lp = model(mx.array([prompt + list(t) for t in triples], dtype=mx.int32))  # no cache
    lp = np.array(lp - mx.logsumexp(lp, axis=-1, keepdims=True))
    exact = np.zeros((V, V))
    P = len(prompt)
    for i, (a, b, c) in enumerate(triples):
        exact[b, c] += np.exp(lp[i, P - 1, a] + lp[i, P, b] + lp[i, P + 1, c])
    counts = np.zeros((V, V))
    for _ in range(n):
        out = run(model, mx.array(prompt, dtype=mx.int32))
        counts[out[1], out[2]] += 1
    expected = exact * n
    assert ((counts - expected) ** 2 / expected).sum() < 37.7


# Files that take minutes each, longest first. With `pytest -n auto` (whole files
# handed to workers, in collection order) they start at once instead of one of them
# being left running alone on one core at the end.
SLOW_FILES = ("test_documented_commands.py", "test_quantize.py", "test_chat.py",
              "test_server.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable otherwise
