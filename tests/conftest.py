from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from ouro_mlx.random_model import make_random_checkpoint

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
