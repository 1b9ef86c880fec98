"""Converters: round trips, raw PyTorch files, quantization, atomic writes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from ouro_mlx import CheckpointError, load_model
from ouro_mlx.convert import hf_to_mlx, mlx_to_hf

IDS = mx.array([[11, 200, 37, 400, 5, 63, 128, 256, 77, 19, 301, 2]])


def tensors(path: Path) -> dict[str, mx.array]:
    out = {}
    for f in sorted(path.glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def digest(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in path.iterdir()}


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert mx.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_hf_mlx_hf_round_trip_is_identical(tiny_dir, tmp_path, dtype):
    src = tiny_dir
    if dtype:
        src = tmp_path / "hf-bf16"
        hf_to_mlx(tiny_dir, tmp_path / "tmp-mlx", dtype=dtype)
        mlx_to_hf(tmp_path / "tmp-mlx", src)
    before = digest(src)
    hf_to_mlx(src, tmp_path / "mlx")
    mlx_to_hf(tmp_path / "mlx", tmp_path / "hf")
    assert digest(src) == before  # the source is never touched
    assert_same_tensors(tensors(src), tensors(tmp_path / "hf"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "ouro" and cfg["architectures"] == ["OuroForCausalLM"]
    assert "quantization" not in cfg and cfg["total_ut_steps"] == 4
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    gen = json.loads((tmp_path / "mlx" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [0, 2]


def test_verify_reports_zero_for_lossless(tiny_dir, tmp_path):
    result = hf_to_mlx(tiny_dir, tmp_path / "mlx", verify=True)
    assert result.ok and result.diff == 0.0 and result.lossy is None
    assert str(result).startswith("verify: OK — largest |logit difference| written vs ")
    assert "(float32 tolerance " in str(result) and "\n" not in str(result)


def test_raw_torch_bin_and_pt(tiny_dir, tmp_path):
    torch = pytest.importorskip("torch", reason="the torch extra is not installed")
    from ouro_mlx.convert.torch_io import save_state_dict

    weights = tensors(tiny_dir)
    hf_dir = tmp_path / "hf-bin"
    hf_dir.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / f, hf_dir / f)
    bf16 = {k: v.astype(mx.bfloat16) for k, v in weights.items()}
    save_state_dict(bf16, hf_dir / "pytorch_model.bin")
    hf_to_mlx(hf_dir, tmp_path / "from-bin")
    assert_same_tensors(bf16, tensors(tmp_path / "from-bin"))

    pt = tmp_path / "weights.pt"
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}},
               pt)
    hf_to_mlx(pt, tmp_path / "from-pt", config_path=tiny_dir / "config.json")
    assert_same_tensors(weights, tensors(tmp_path / "from-pt"))
    with pytest.raises(ValueError, match="config.json"):
        hf_to_mlx(pt, tmp_path / "no-config")


# Random Gaussian weights are a worst case for 4-bit; the error compounds per loop.
@pytest.mark.parametrize("bits,bound", [(8, 5e-3), (4, 1.0)])
def test_quantization_drift_per_loop_step(small_dir, tmp_path, bits, bound):
    dst = tmp_path / f"q{bits}"
    hf_to_mlx(small_dir, dst, quantize=True, q_bits=bits)
    q = load_model(dst)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization"]["bits"] == bits
    gate = q.model.early_exit_gate
    assert type(gate) is nn.Linear and gate.weight.dtype == mx.float32
    assert all(v.dtype == mx.float32 for k, v in tree_flatten(q.parameters()) if "norm" in k)
    assert isinstance(q.layers[0].mlp.up_proj, nn.QuantizedLinear)
    from ouro_mlx.quantize import quality

    rows = [(row, [1] * len(row)) for row in IDS.tolist()]
    kls = quality(q, load_model(small_dir), rows)["kl_by_step"]
    print(f"{bits}-bit KL per loop step: {[f'{k:.2e}' for k in kls]}")
    assert all(0 <= k < bound for k in kls), kls


def test_mixed_recipe_and_fp_modes(small_dir, tmp_path):
    hf_to_mlx(small_dir, tmp_path / "mixed", quantize=True, q_bits=4, mixed=True)
    m = load_model(tmp_path / "mixed")
    assert m.lm_head.bits == 8 and m.model.embed_tokens.bits == 8
    assert m.layers[0].self_attn.q_proj.bits == 4
    hf_to_mlx(small_dir, tmp_path / "mxfp4", quantize=True, q_mode="mxfp4")
    m = load_model(tmp_path / "mxfp4")
    assert m.layers[0].mlp.down_proj.mode == "mxfp4"
    assert m(IDS).shape == (1, IDS.shape[1], 512)


def test_mlx_community_style_quantized_gate_loads(small_dir, tmp_path):
    """mlx-lm's own quantizer also quantizes the gate; such checkpoints load as is."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    model = load_model(small_dir)
    config = json.loads((small_dir / "config.json").read_text())
    model, config = quantize_model(model, config, 64, 8, quant_predicate=lambda p, m: True)
    dst = tmp_path / "community"
    save_model(dst, model)
    save_config(config, dst / "config.json")
    shutil.copy(small_dir / "tokenizer.json", dst)
    loaded = load_model(dst)
    assert isinstance(loaded.model.early_exit_gate, nn.QuantizedLinear)
    assert mx.array_equal(loaded(IDS), model(IDS))
    mlx_to_hf(dst, tmp_path / "back")  # dequantizes, gate included
    assert tensors(tmp_path / "back")["model.early_exit_gate.weight"].shape == (1, 256)


def test_existing_destination_refused_then_forced(tiny_dir, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="keep.txt.* --force replaces only"):
        hf_to_mlx(tiny_dir, dst)
    with pytest.raises(ValueError, match="keep.txt.* --force replaces only"):
        hf_to_mlx(tiny_dir, dst, force=True)  # --force replaces only what ouro-mlx wrote
    (dst / "config.json").write_text("{}")  # a model directory of the user's: still kept
    with pytest.raises(ValueError, match="2 files .* no .ouro-mlx.json"):
        hf_to_mlx(tiny_dir, dst, force=True)
    assert (dst / "keep.txt").read_text() == "mine"
    shutil.rmtree(dst)
    hf_to_mlx(tiny_dir, dst)
    with pytest.raises(ValueError, match="--force"):
        hf_to_mlx(tiny_dir, dst)
    hf_to_mlx(tiny_dir, dst, force=True)
    assert (dst / "model.safetensors").exists() and (dst / ".ouro-mlx.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_conversion_leaves_nothing(tiny_dir, tmp_path):
    src = tmp_path / "broken"
    shutil.copytree(tiny_dir, src)
    w = tensors(src)
    del w["lm_head.weight"]
    mx.save_safetensors(str(src / "model.safetensors"), w)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        hf_to_mlx(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_bad_options(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="--q-mode"):
        hf_to_mlx(tiny_dir, tmp_path / "a", quantize=True, q_mode="int3")
    with pytest.raises(ValueError, match="Unknown dtype"):
        hf_to_mlx(tiny_dir, tmp_path / "b", dtype="float64")
    with pytest.raises(ValueError, match="is the source"):
        hf_to_mlx(tiny_dir, tiny_dir, force=True)
    assert not any(tmp_path.iterdir())


# Issue 10: no lost data, no silent wrong results, one-line refusals.


def test_destination_holding_or_inside_the_source_is_refused(tiny_dir, tmp_path):
    parent = tmp_path / "P"
    src = parent / "src"
    shutil.copytree(tiny_dir, src)
    (parent / "sibling.txt").write_text("keep")
    for d in (parent, tmp_path):  # look like model directories, which --force replaces
        (d / "config.json").write_text("{}")
    hf_to_mlx(src, parent / "mlx")
    before = {p: digest(p) for p in (src, parent / "mlx")}
    cases = [
        (hf_to_mlx, src, parent, "contains the source --hf-path"),
        (hf_to_mlx, src, src, "is the source --hf-path"),
        (hf_to_mlx, src, src / "out", "lies inside the source --hf-path"),
        (hf_to_mlx, src, tmp_path, "contains the source --hf-path"),
        (mlx_to_hf, parent / "mlx", parent, "contains the source --mlx-path"),
        (mlx_to_hf, parent / "mlx", parent / "mlx" / "hf", "lies inside the source"),
    ]
    for convert, a, b, message in cases:
        with pytest.raises(ValueError, match=message):
            convert(a, b, force=True)
    assert {p: digest(p) for p in before} == before
    assert (parent / "sibling.txt").read_text() == "keep"
    assert sorted(p.name for p in parent.iterdir()) == ["config.json", "mlx", "sibling.txt",
                                                         "src"]


def test_raw_weights_file_inside_the_destination_is_refused(tiny_dir, tmp_path):
    src = tmp_path / "P"
    shutil.copytree(tiny_dir, src)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="contains the source"):
        hf_to_mlx(src / "model.safetensors", tmp_path, config_path=src / "config.json",
                  force=True)
    shutil.copy(src / "model.safetensors", tmp_path / "weights.pt")  # never read
    with pytest.raises(ValueError, match="is the source --config"):
        hf_to_mlx(tmp_path / "weights.pt", src, config_path=src, force=True)
    assert digest(src) == digest(tiny_dir)


def test_destination_refused_before_any_work(tiny_dir, tmp_path, monkeypatch):
    import ouro_mlx.convert.convert as C

    def no_work(*args, **kwargs):
        raise AssertionError("the conversion started")

    monkeypatch.setattr(C, "_read_source_weights", no_work)
    monkeypatch.setattr(C, "build_model", no_work)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for dst in (".", str(tmp_path), "./"):
        with pytest.raises(ValueError, match="current directory"):
            hf_to_mlx(tiny_dir, dst, force=True)
        with pytest.raises(ValueError, match="current directory"):
            mlx_to_hf(tiny_dir, dst, force=True)
    monkeypatch.chdir(tmp_path / "..")
    with pytest.raises(ValueError, match="--mlx-path .* --force"):
        hf_to_mlx(tiny_dir, work)
    with pytest.raises(ValueError, match="--hf-path .* --force"):
        mlx_to_hf(tiny_dir, work)
    assert [p.name for p in work.iterdir()] == ["notes.txt"]


def test_cli_refuses_dot_in_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    from ouro_mlx.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["convert", "--hf-path", str(tiny_dir), "--mlx-path", ".", "--force"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ouro-mlx convert: error: --mlx-path . is or contains the current")
    assert err.count("\n") == 1 and not any(tmp_path.iterdir())


@pytest.mark.parametrize("options,message", [
    (dict(quantize=True, q_group_size=3), "--q-group-size 3 is not supported"),
    (dict(quantize=True, q_group_size=0), "--q-group-size 0 is not supported"),
    (dict(quantize=True, q_group_size=-64), "--q-group-size -64 is not supported"),
    (dict(quantize=True, q_bits=7), "--q-bits 7 is not supported by --q-mode affine"),
    (dict(quantize=True, q_bits=0), "--q-bits 0 is not supported"),
    (dict(quantize=True, q_mode="mxfp4", q_bits=8), "--q-bits 8 .* --q-mode mxfp4; choose 4"),
    (dict(quantize=True, q_mode="nvfp4", q_group_size=32), "choose 16"),
    (dict(mixed=True), "--mixed needs -q/--quantize"),
    (dict(q_bits=8), "--q-bits needs -q"),
    (dict(q_group_size=32, q_mode="affine"), "--q-group-size, --q-mode need -q"),
    (dict(quantize=True, q_group_size=16), "choose 32, 64 or 128[.]$"),
])
def test_quantization_options_checked_before_work(tiny_dir, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        hf_to_mlx(tiny_dir, tmp_path / "out", **options)
    assert not any(tmp_path.iterdir())


def test_supported_quantization_table_matches_mlx():
    from ouro_mlx.convert import Q_MODES, Q_SUPPORTED

    w = mx.random.normal((8, 256))
    for mode, (sizes, bit_widths) in Q_SUPPORTED.items():
        assert Q_MODES[mode][0] in sizes and Q_MODES[mode][1] in bit_widths
        for g in sizes:
            for b in bit_widths:
                mx.eval(mx.quantize(w, group_size=g, bits=b, mode=mode))
    for g, b in [(16, 4), (64, 7), (256, 4)]:
        with pytest.raises(ValueError):
            mx.eval(mx.quantize(w, group_size=g, bits=b, mode="affine"))


def test_quantizing_nothing_is_refused(tmp_path):
    from ouro_mlx.random_model import make_random_checkpoint

    narrow = dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                  num_key_value_heads=3, head_dim=16, intermediate_size=80, vocab_size=300,
                  max_position_embeddings=64, rope_theta=10000.0)
    src = make_random_checkpoint(tmp_path / "narrow", narrow)
    with pytest.raises(ValueError, match="-q would quantize no layer: --q-group-size 32 .*48, 80"):
        hf_to_mlx(src, tmp_path / "q", quantize=True, q_group_size=32)
    assert [p.name for p in tmp_path.iterdir()] == ["narrow"]


def test_verify_reports_lossy_drift_and_refuses_a_mismatch(tiny_dir, tmp_path, monkeypatch):
    import ouro_mlx.convert.convert as C

    result = hf_to_mlx(tiny_dir, tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32,
                       verify=True)
    assert result.ok and result.diff == 0.0 and 0 < result.drift < 1
    lines = str(result).splitlines()
    assert lines[0].startswith("verify: OK") and len(lines) == 2
    assert lines[1].startswith("verify: 8-bit affine quantization moves the logits by up to")
    assert result.positions == 16 and result.same_top >= 12
    back = mlx_to_hf(tmp_path / "q8", tmp_path / "hf", dtype="bfloat16", verify=True)
    assert back.ok and back.dtype == "bfloat16" and "dequantization and the bfloat16" in back.lossy

    build = C.build_model

    def corrupted(path, config, **kwargs):
        model = build(path, config, **kwargs)
        model.lm_head.weight = model.lm_head.weight * 1.01
        return model

    monkeypatch.setattr(C, "build_model", corrupted)
    dst = tmp_path / "q8"
    before = digest(dst)
    with pytest.raises(ValueError, match="verify: MISMATCH .*q8 was not written"):
        hf_to_mlx(tiny_dir, dst, force=True, verify=True)
    assert digest(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "q8"]


def test_cli_verify_mismatch_exits_1(tiny_dir, tmp_path, monkeypatch, capsys):
    import ouro_mlx.convert.convert as C
    from ouro_mlx.cli import main

    monkeypatch.setattr(C, "VERIFY_TOLERANCE", {"float32": -1.0})
    args = ["convert", "--hf-path", str(tiny_dir), "--mlx-path", str(tmp_path / "m")]
    assert main(args + ["--verify"]) == 1
    err = capsys.readouterr().err  # progress bars, then the error
    assert err.splitlines()[-1].startswith("ouro-mlx convert: error: verify: MISMATCH")
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flags", [["-q"], ["--q-bits", "4"], ["--mixed"], ["--config", "x"],
                                   ["--revision", "main"], ["-d"]])
def test_cli_to_hf_refuses_hf_to_mlx_flags(tiny_dir, tmp_path, flags, capsys):
    from ouro_mlx.commands.convert import main

    with pytest.raises(SystemExit) as e:
        main(["--to-hf", "--mlx-path", str(tiny_dir), "--hf-path", str(tmp_path / "h")]
             + flags)
    assert e.value.code == 2
    assert f"error: {flags[0]}: not with --to-hf" in capsys.readouterr().err


def test_cli_accepts_mlx_lm_flag_names(tiny_dir, tmp_path, capsys):
    from ouro_mlx.commands.convert import build_parser, main

    assert main(["--model", str(tiny_dir), "--mlx-path", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").exists()
    text = " ".join(build_parser().format_help().split())
    assert "(default: affine)" in text and "(default: as stored)" in text
    for action in build_parser()._actions:
        assert action.help, action.option_strings


def fail_writes(monkeypatch, kind):
    """Make every safetensors write fail as a full disk does, after a partial write."""
    import errno

    def full(file, *args, **kwargs):
        Path(file).write_bytes(b"\0" * 1000)
        if kind == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device", file)
        raise RuntimeError("[write] Unable to write 8 bytes to file.")  # what MLX raises

    monkeypatch.setattr(mx, "save_safetensors", full)
    if kind == "runtime":
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 0))


@pytest.mark.parametrize("kind", ["runtime", "oserror"])
@pytest.mark.parametrize("verb", ["convert", "to-hf", "random"])
def test_disk_full_leaves_previous_output(tiny_dir, tmp_path, monkeypatch, capsys, verb, kind):
    from ouro_mlx.cli import main

    dst = tmp_path / "out"
    args = {
        "convert": ["convert", "--hf-path", str(tiny_dir), "--mlx-path", str(dst)],
        "to-hf": ["convert", "--to-hf", "--mlx-path", str(tiny_dir), "--hf-path", str(dst)],
        "random": ["random", "--out", str(dst)],
    }[verb]
    assert main(args) == 0
    before = digest(dst)
    capsys.readouterr()
    fail_writes(monkeypatch, kind)
    for _ in range(2):  # a retry leaves nothing behind either
        assert main(args + ["--force"]) == 1
        err = capsys.readouterr().err  # progress bars, then the error
        last = err.splitlines()[-1]
        assert last.startswith(f"ouro-mlx {args[0]}: error: ") and "Traceback" not in err
        assert last.endswith(f"error: no space left on the device writing {dst}.")
        assert [p.name for p in tmp_path.iterdir()] == ["out"] and digest(dst) == before


@pytest.fixture
def bin_dir(tiny_dir, tmp_path) -> Path:
    pytest.importorskip("torch", reason="the torch extra is not installed")
    from ouro_mlx.convert.torch_io import save_state_dict

    hf_dir = tmp_path / "hf-bin"
    hf_dir.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / f, hf_dir / f)
    save_state_dict(tensors(tiny_dir), hf_dir / "pytorch_model.bin")
    return hf_dir


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[: len(b) // 2], "failed finding central directory"),
    (lambda b: b"", "EOFError"),
    (lambda b: bytes(range(256)) * 8, "Weights only load failed"),
])
def test_damaged_torch_file_is_one_line_naming_it(bin_dir, tmp_path, damage, message):
    file = bin_dir / "pytorch_model.bin"
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(CheckpointError) as e:
        hf_to_mlx(bin_dir, tmp_path / "out")
    assert str(e.value).startswith(f"Cannot read PyTorch weights from {file} (truncated")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_torch_index_checked(bin_dir, tmp_path):
    outside = tmp_path / "outside.bin"
    shutil.copy(bin_dir / "pytorch_model.bin", outside)
    (bin_dir / "pytorch_model.bin").unlink()
    index = bin_dir / "pytorch_model.bin.index.json"
    for text, message in [
        ("{not json", "is not valid JSON"),
        ('{"metadata": {}}', "has no weight_map"),
        (json.dumps({"weight_map": {"lm_head.weight": "../outside.bin"}}),
         "outside.bin lies outside .*hf-bin; weight files must lie inside"),
        (json.dumps({"weight_map": {"lm_head.weight": str(outside)}}), "lies outside"),
        (json.dumps({"weight_map": {"lm_head.weight": "gone.bin"}}), "missing files: gone.bin"),
    ]:
        index.write_text(text)
        with pytest.raises(CheckpointError, match=message):
            hf_to_mlx(bin_dir, tmp_path / "out")
    (bin_dir / "pytorch_model.bin").symlink_to(outside)
    index.unlink()
    with pytest.raises(CheckpointError, match="lies outside"):
        hf_to_mlx(bin_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_raw_safetensors_file_with_config(tiny_dir, tmp_path):
    hf_to_mlx(tiny_dir / "model.safetensors", tmp_path / "out", config_path=tiny_dir)
    assert_same_tensors(tensors(tiny_dir), tensors(tmp_path / "out"))


def test_dequantize_a_quantized_mlx_directory(tiny_dir, tmp_path):
    q8 = tmp_path / "q8"
    hf_to_mlx(tiny_dir, q8, quantize=True, q_bits=8, q_group_size=32)
    with pytest.raises(CheckpointError, match="quantized MLX checkpoint: pass -d/--dequantize"):
        hf_to_mlx(q8, tmp_path / "x")
    with pytest.raises(CheckpointError, match="-d/--dequantize: .*tiny/config.json is not"):
        hf_to_mlx(tiny_dir, tmp_path / "x", dequantize=True)
    with pytest.raises(ValueError, match="exclude each other"):
        hf_to_mlx(q8, tmp_path / "x", dequantize=True, quantize=True)
    result = hf_to_mlx(q8, tmp_path / "dq", dequantize=True, verify=True)
    assert result.ok and result.diff == 0.0
    config = json.loads((tmp_path / "dq" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    dq = load_model(tmp_path / "dq")
    assert type(dq.layers[0].mlp.up_proj) is nn.Linear
    assert mx.allclose(dq(IDS), load_model(q8)(IDS), atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dq", "q8"]


@pytest.mark.parametrize("text,message", [
    ("{bad", "tokenizer.json is not valid JSON"),
    ("[1, 2]", "tokenizer.json holds"),
    ('{"added_tokens": [1, "x"]}', "added_tokens must be a list of objects"),
    ('{"added_tokens": 5}', "added_tokens must be a list of objects"),
])
def test_damaged_tokenizer_json_is_one_line(tiny_dir, tmp_path, monkeypatch, text, message):
    import ouro_mlx.convert.convert as C

    monkeypatch.setattr(C, "_read_source_weights", None)  # refused before any work
    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    (src / "tokenizer.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        hf_to_mlx(src, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_force_never_replaces_a_file(tiny_dir, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    for dst in (file, tmp_path / "link"):
        with pytest.raises(ValueError, match="is a (file, not a directory|link)"):
            hf_to_mlx(tiny_dir, dst, force=True)
        with pytest.raises(ValueError, match="is a (file, not a directory|link)"):
            mlx_to_hf(tiny_dir, dst, force=True)
    from ouro_mlx.random_model import make_random_checkpoint

    with pytest.raises(ValueError, match="--out .* is a file"):
        make_random_checkpoint(file, force=True)
    assert file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [
        "link", "notes.txt"]
