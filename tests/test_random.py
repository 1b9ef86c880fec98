"""ouro-mlx random: refusals before anything is allocated or written."""

from __future__ import annotations

import pytest

from ouro_mlx import limits
from ouro_mlx.cli import main
from ouro_mlx.random_model import SHAPES, make_random_checkpoint


def tiny(**sizes) -> dict:
    return dict(SHAPES["tiny"], **sizes)


@pytest.mark.parametrize("shape,message", [
    ("huge", "Unknown shape 'huge'; choose one of tiny, small, ouro-1.4b, ouro-2.6b."),
    (tiny(hidden_size=0), "hidden_size must be a positive integer, got 0."),
    (tiny(hidden_size="64"), "hidden_size must be a positive integer, got '64'."),
    (tiny(num_hidden_layers="2"), "num_hidden_layers must be a positive integer"),
    (tiny(vocab_size=100), "vocab_size must be at least 273"),
    (tiny(head_dim=0), "head_dim must be a positive integer"),
    (tiny(hidden_size=10**9), "A random custom model needs about .* GiB but this machine"),
    (tiny(num_hidden_layers=10**6), "A random custom model needs about"),
])
def test_bad_shapes_refused_before_allocating(tmp_path, shape, message):
    with pytest.raises(ValueError, match=message):
        make_random_checkpoint(tmp_path / "out", shape)
    assert not any(tmp_path.iterdir())


def test_memory_check_uses_the_dtype(tmp_path, monkeypatch):
    from ouro_mlx.model import ModelArgs, estimate_model_bytes
    from ouro_mlx.random_model import hf_config

    args = ModelArgs.from_dict(hf_config("tiny"))
    between = (estimate_model_bytes(args, 2) + estimate_model_bytes(args, 4)) // 2
    monkeypatch.setattr(limits, "memory_bytes", lambda: between)
    with pytest.raises(ValueError, match="needs about"):
        make_random_checkpoint(tmp_path / "f32", "tiny")
    make_random_checkpoint(tmp_path / "bf16", "tiny", dtype="bfloat16")
    assert (tmp_path / "bf16" / "model.safetensors").exists()


@pytest.mark.parametrize("flags,message", [
    (["--shape", "huge"], "argument --shape: invalid choice: 'huge' (choose from"),
    (["--ut-steps", "0"], "error: --ut-steps must be an integer >= 1, got 0."),
    (["--ut-steps", "1000000"], "error: --ut-steps is 1000000, above the maximum of 64"),
    (["--seed", "-1"], "argument --seed: must be from 0 to 2**64 - 1, got -1."),
    (["--seed", str(2**64)], "argument --seed: must be from 0 to 2**64 - 1"),
    (["--out", "."], "error: --out . is or contains the current directory"),
])
def test_cli_refusals_are_one_line(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["random", "--out", "r", "--force"] + flags)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err and "Traceback" not in err
    assert err.splitlines()[-1].startswith("ouro-mlx random: error: ")
    assert not any(tmp_path.iterdir())


def test_cli_help_describes_every_flag_with_defaults():
    from ouro_mlx.commands.random import build_parser

    p = build_parser()
    assert all(a.help for a in p._actions)
    text = " ".join(p.format_help().split())
    for default in ("(default: tiny)", "(default: float32)", "(default: 4)", "(default: 0)"):
        assert default in text
