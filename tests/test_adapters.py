"""Adapters: shared and per-loop LoRA, saving/loading, inference and fuse."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from ouro_mlx.adapters import (
    LoopLoRALinear,
    adapter_config,
    apply_adapters,
    load_adapters,
    save_adapters,
)
from ouro_mlx.loading import load_model

TOKENS = mx.array([[5, 17, 42, 99, 3, 250, 7, 64]])


def logits(model, **kw):
    return np.array(model(TOKENS, **kw).astype(mx.float32))


def randomize_b(model, seed=0, per_step_same=False):
    """Give every lora_b a random value (same for each loop step when asked)."""
    mx.random.seed(seed)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            shape = m.lora_b.shape
            if per_step_same and isinstance(m, LoopLoRALinear):
                one = 0.05 * mx.random.normal(shape[1:])
                m.lora_b = mx.repeat(one[None], shape[0], axis=0)
            else:
                m.lora_b = 0.05 * mx.random.normal(shape)
    mx.eval(model.parameters())


def copy_shared_into_per_loop(shared, per_loop):
    """Per-loop adapters holding the shared (A, B) at every loop step."""
    T = per_loop.ut_steps
    flat = dict(tree_flatten(shared.trainable_parameters()))
    per_loop.load_weights(
        [(k, mx.repeat(v[None], T, axis=0)) for k, v in flat.items()], strict=False)


def test_zero_initialised_adapters_leave_logits_unchanged(tiny_dir):
    base = logits(load_model(tiny_dir))
    for per_loop in (False, True):
        for ftype in ("lora", "dora") if not per_loop else ("lora",):
            model = load_model(tiny_dir)
            apply_adapters(model, fine_tune_type=ftype, per_loop=per_loop)
            np.testing.assert_allclose(logits(model), base, atol=1e-5)


def test_only_adapters_are_trainable(tiny_dir):
    model = load_model(tiny_dir)
    apply_adapters(model, num_layers=1, per_loop=True, train_gate=True)
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    last = len(model.layers) - 1
    assert "model.early_exit_gate.weight" in names
    assert all(k.startswith(f"model.layers.{last}.") or "early_exit_gate" in k for k in names)
    a = dict(tree_flatten(model.trainable_parameters()))[
        f"model.layers.{last}.self_attn.q_proj.lora_a"]
    assert a.shape == (model.ut_steps, model.args.hidden_size, 8)


def test_per_loop_with_identical_adapters_equals_shared(tiny_dir):
    shared = load_model(tiny_dir)
    apply_adapters(shared, lora_parameters={"rank": 4, "scale": 2.0, "dropout": 0.0})
    randomize_b(shared)
    per_loop = load_model(tiny_dir)
    apply_adapters(per_loop, lora_parameters={"rank": 4, "scale": 2.0, "dropout": 0.0},
                   per_loop=True)
    copy_shared_into_per_loop(shared, per_loop)
    base = logits(load_model(tiny_dir))
    assert np.abs(logits(shared) - base).max() > 1e-3  # the adapter does something
    np.testing.assert_allclose(logits(per_loop), logits(shared), atol=1e-5)
    for kw in ({"exit_at_step": 1}, {"weighted_exit": True}):
        np.testing.assert_allclose(logits(per_loop, **kw), logits(shared, **kw), atol=1e-5)
    # A different B at each loop step changes the result.
    randomize_b(per_loop, seed=3)
    assert np.abs(logits(per_loop) - logits(shared)).max() > 1e-3


def test_per_loop_step_beyond_adapters_is_refused(tiny_dir):
    model = load_model(tiny_dir)
    apply_adapters(model, per_loop=True, ut_steps=2)
    model(TOKENS, ut_steps=2)
    with pytest.raises(ValueError, match="hold 2 loop steps"):
        model(TOKENS, ut_steps=3)


def quantized(tiny_or_small):
    model = load_model(tiny_or_small)
    nn.quantize(model, group_size=64, bits=4, class_predicate=lambda p, m: (
        hasattr(m, "to_quantized") and model.quant_predicate(p, m)))
    return model


@pytest.mark.parametrize("per_loop", [False, True])
def test_qlora_on_a_quantized_base(small_dir, per_loop):
    model = quantized(small_dir)
    base = logits(model)
    apply_adapters(model, per_loop=per_loop, num_layers=1)
    np.testing.assert_allclose(logits(model), base, atol=1e-5)
    lin = model.layers[-1].self_attn.q_proj
    assert isinstance(lin.linear, nn.QuantizedLinear)
    randomize_b(model)
    assert np.abs(logits(model) - base).max() > 1e-3
    # Gradients reach the adapters only.
    def loss(m):
        return m(TOKENS).astype(mx.float32).square().mean()
    grads = nn.value_and_grad(model, loss)(model)[1]
    flat = dict(tree_flatten(grads))
    assert any(k.endswith("lora_a") for k in flat) and not any("scales" in k for k in flat)


def test_per_loop_dora_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="LoRA only"):
        apply_adapters(load_model(tiny_dir), fine_tune_type="dora", per_loop=True)


@pytest.mark.parametrize("per_loop,ftype,train_gate", [
    (False, "lora", False), (True, "lora", True), (False, "dora", False),
    (False, "full", True)])
def test_save_then_load_gives_the_same_model(tiny_dir, tmp_path, per_loop, ftype, train_gate):
    model = load_model(tiny_dir)
    apply_adapters(model, fine_tune_type=ftype, num_layers=1, per_loop=per_loop,
                   train_gate=train_gate)
    randomize_b(model)
    if ftype == "full" or train_gate:  # move every trainable weight a little
        model.update(tree_map(lambda p: p + 0.01, model.trainable_parameters()))
    config = adapter_config({"fine_tune_type": ftype, "num_layers": 1, "model": tiny_dir,
                             "per_loop_adapters": per_loop, "ut_steps": 4,
                             "train_gate": train_gate})
    save_adapters(tmp_path / "a", model, config)
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["per_loop_adapters"] is per_loop and saved["train_gate"] is train_gate
    assert saved["lora_parameters"] == {"rank": 8, "dropout": 0.0, "scale": 20.0}
    assert saved["model"] == str(tiny_dir)
    loaded = load_model(tiny_dir)
    config = load_adapters(loaded, tmp_path / "a")
    assert config["fine_tune_type"] == ftype
    np.testing.assert_allclose(logits(loaded), logits(model), atol=1e-6)
    assert not list((tmp_path / "a").glob(".*tmp*"))  # no temporary files left


def saved_adapters(tiny_dir, path, per_loop=False, **kw):
    model = load_model(tiny_dir)
    apply_adapters(model, num_layers=1, per_loop=per_loop, **kw)
    randomize_b(model)
    save_adapters(path, model, adapter_config({"num_layers": 1, "per_loop_adapters": per_loop}))
    return model


def edit_config(path, **changes):
    file = path / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


@pytest.mark.parametrize("changes,message", [
    ({"fine_tune_type": "qlora"}, "fine_tune_type must be one of"),
    ({"num_layers": 99}, "num_layers must be -1"),
    ({"num_layers": "2"}, "num_layers must be -1"),
    ({"lora_parameters": {"rank": 10**9}}, "rank must be an integer"),
    ({"lora_parameters": {"rank": 8, "scale": "big"}}, "scale must be a finite number"),
    ({"lora_parameters": {"rank": 8, "scale": 1e38}}, r"scale 1e\+38 is far outside"),
    ({"lora_parameters": {"rank": 8, "scale": -2e4}}, r"scale -20000.0 is far outside"),
    ({"lora_parameters": {"rank": 8, "keys": ["__class__"]}}, "keys must be a list"),
    ({"lora_parameters": {"rank": 4}}, "has shape"),
    ({"per_loop_adapters": "yes"}, "per_loop_adapters must be true or false"),
    ({"per_loop_adapters": True, "ut_steps": 10**6}, "ut_steps"),
    ({"per_loop_adapters": True, "ut_steps": 4}, "has shape"),
    ({"train_gate": True}, "tensor model.early_exit_gate.bias is missing"),
])
def test_untrusted_adapter_config_is_refused_in_one_line(tiny_dir, tmp_path, changes, message):
    saved_adapters(tiny_dir, tmp_path / "a")
    edit_config(tmp_path / "a", **changes)
    with pytest.raises(ValueError, match=message) as e:
        load_adapters(load_model(tiny_dir), tmp_path / "a")
    assert "\n" not in str(e.value) and "adapter" in str(e.value)


def test_untrusted_adapter_files_are_refused(tiny_dir, tmp_path):
    saved_adapters(tiny_dir, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_adapters(load_model(tiny_dir), tmp_path / "a")
    saved_adapters(tiny_dir, tmp_path / "b")
    (tmp_path / "b" / "adapters.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="Cannot read .*adapters.safetensors"):
        load_adapters(load_model(tiny_dir), tmp_path / "b")
    # A link out of the directory is not followed.
    saved_adapters(tiny_dir, tmp_path / "c")
    saved_adapters(tiny_dir, tmp_path / "outside")
    (tmp_path / "c" / "adapters.safetensors").unlink()
    (tmp_path / "c" / "adapters.safetensors").symlink_to(
        tmp_path / "outside" / "adapters.safetensors")
    with pytest.raises(ValueError, match="links outside"):
        load_adapters(load_model(tiny_dir), tmp_path / "c")
    # An extra tensor is named.
    saved_adapters(tiny_dir, tmp_path / "d")
    w = mx.load(str(tmp_path / "d" / "adapters.safetensors"))
    w["model.lm_head.weight"] = mx.zeros((2, 2))
    mx.save_safetensors(str(tmp_path / "d" / "adapters.safetensors"), w)
    with pytest.raises(ValueError, match="tensor model.lm_head.weight is not a parameter"):
        load_adapters(load_model(tiny_dir), tmp_path / "d")
    # A non-finite or integer tensor is named.
    saved_adapters(tiny_dir, tmp_path / "e")
    w = mx.load(str(tmp_path / "e" / "adapters.safetensors"))
    name = sorted(w)[0]
    for bad, message in ((w[name] * mx.nan, "non-finite"), (w[name].astype(mx.int32), "int32")):
        mx.save_safetensors(str(tmp_path / "e" / "adapters.safetensors"), {**w, name: bad})
        with pytest.raises(ValueError, match=f"tensor {name} .*{message}"):
            load_adapters(load_model(tiny_dir), tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_adapters(load_model(tiny_dir), tmp_path / "nowhere")


# --- adapters at inference ------------------------------------------------------------


def per_loop_and_shared(tiny_dir, tmp_path):
    """Saved adapters: shared random B, per-loop holding it at every step, and per-loop
    with a different B per step."""
    lp = {"rank": 4, "scale": 2.0, "dropout": 0.0}
    shared = load_model(tiny_dir)
    mx.random.seed(1)  # lora_a's draw
    apply_adapters(shared, lora_parameters=lp)
    randomize_b(shared)
    save_adapters(tmp_path / "shared", shared, adapter_config({"lora_parameters": lp}))
    per_loop = load_model(tiny_dir)
    apply_adapters(per_loop, lora_parameters=lp, per_loop=True)
    copy_shared_into_per_loop(shared, per_loop)
    config = adapter_config({"lora_parameters": lp, "per_loop_adapters": True})
    save_adapters(tmp_path / "same", per_loop, config)
    randomize_b(per_loop, seed=5)
    save_adapters(tmp_path / "distinct", per_loop, config)
    return tmp_path / "shared", tmp_path / "same", tmp_path / "distinct"


RULES = [{}, {"exit_threshold": 0.5}, {"exit_at_step": 1}, {"hidden_eps": 0.05}]


def test_generation_with_adapters_every_rule_and_kv_mode(tiny_dir, tmp_path):
    from ouro_mlx import load
    from ouro_mlx.generation import stream_generate

    shared, same, distinct = per_loop_and_shared(tiny_dir, tmp_path)
    prompt = [5, 17, 42, 99, 3]

    def run(adapter, **kw):
        model, tok = load(tiny_dir, adapter_path=adapter)
        out = list(stream_generate(model, tok, prompt, max_tokens=6, **kw))
        return [r.token for r in out], [r.loops for r in out]

    base = run(None)
    for kv_mode in ("full", "last"):
        for rule in RULES:
            with_shared = run(shared, kv_mode=kv_mode, **rule)
            assert run(same, kv_mode=kv_mode, **rule) == with_shared, (kv_mode, rule)
    assert run(shared) != base  # the adapter changes the completion
    assert run(distinct) != run(same)

    # Full depth with a KV cache per step equals recomputing the whole sequence.
    model, tok = load(tiny_dir, adapter_path=distinct)
    ids = list(prompt)
    for _ in range(6):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1])))
    assert run(distinct)[0] == ids[len(prompt):]


def test_decode_loop_gives_per_loop_adapters_their_step(tiny_dir, tmp_path, monkeypatch):
    """Adaptive exit through the real decode loop: loop step t of every token runs
    adapter t (layer 0's q_proj sees t = 0, 1, ..., loops - 1 per token)."""
    from ouro_mlx import load
    from ouro_mlx.generation import stream_generate

    _, _, distinct = per_loop_and_shared(tiny_dir, tmp_path)
    model, tok = load(tiny_dir, adapter_path=distinct)
    model.model.early_exit_gate.bias = mx.array([0.5])  # exits at varied depths
    seen = []
    q = model.layers[0].self_attn.q_proj
    original = LoopLoRALinear.__call__

    def spy(self, x, t):
        if self is q:
            seen.append(t)
        return original(self, x, t)

    monkeypatch.setattr(LoopLoRALinear, "__call__", spy)
    for kv_mode in ("full", "last"):
        seen.clear()
        out = list(stream_generate(model, tok, [5, 17, 42], max_tokens=8, kv_mode=kv_mode,
                                   exit_threshold=0.5))
        runs = []
        for t in seen:
            runs.append(1) if t == 0 else runs.__setitem__(-1, runs[-1] + 1)
        assert runs[0] == model.ut_steps  # the prompt runs at full depth
        assert runs[1:] == [r.loops for r in out[1:]]
    assert len(set(runs)) > 2  # depth really varies


def test_cli_generate_with_adapter(tiny_dir, tmp_path, capsys):
    from ouro_mlx.cli import main

    shared, _, distinct = per_loop_and_shared(tiny_dir, tmp_path)
    outs = []
    for adapter in (None, shared, distinct):
        extra = [] if adapter is None else ["--adapter-path", str(adapter)]
        assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "-m", "8",
                     "--no-chat-template", "--kv-mode", "last", "--exit-threshold", "0.6",
                     *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] != outs[1] and outs[1] != outs[2]
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "-m", "2",
                 "--adapter-path", str(distinct), "--ut-steps", "5"]) == 1
    err = capsys.readouterr().err
    assert "hold 4 loop steps" in err and err.count("\n") == 1
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi",
                 "--adapter-path", str(tmp_path / "nope")]) == 1
    assert "no such directory" in capsys.readouterr().err


def test_cli_chat_and_bench_with_adapters(tiny_dir, tmp_path, capsys, monkeypatch):
    from ouro_mlx.cli import main
    from ouro_mlx.commands import chat

    shared, _, distinct = per_loop_and_shared(tiny_dir, tmp_path)
    replies = []
    for adapter in (None, shared, distinct):
        lines = iter(["hello there", None])
        monkeypatch.setattr(chat, "read_line", lambda prompt: next(lines))
        extra = [] if adapter is None else ["--adapter-path", str(adapter)]
        assert main(["chat", "--model", str(tiny_dir), "-m", "4", "--kv-mode", "last",
                     *extra]) == 0
        replies.append(capsys.readouterr().out.split("\n", 1)[1])
    assert len(set(replies)) == 3
    assert main(["bench", "--model", str(tiny_dir), "--adapter-path", str(distinct),
                 "--dtype", "float32", "--prompt-tokens", "4", "--gen-tokens", "2",
                 "--repeats", "0", "--no-fixed", "--exits", "q0.5"]) == 0
    out = capsys.readouterr()
    assert "no unrolled peer with per-loop adapters" in out.err and "ouro T=4" in out.out
    assert main(["bench", "--random", "tiny", "--adapter-path", str(shared)]) == 1
    assert "need --model" in capsys.readouterr().err


# --- fuse and mlx-lm -------------------------------------------------------------------


def trained(model_dir, path, ftype="lora", train_gate=False, per_loop=False, num_layers=-1):
    model = load_model(model_dir)
    mx.random.seed(1)  # lora_a's draw
    apply_adapters(model, fine_tune_type=ftype, num_layers=num_layers, per_loop=per_loop,
                   train_gate=train_gate)
    randomize_b(model)
    if ftype != "lora" or train_gate:
        model.update(tree_map(lambda p: p + 0.01, model.trainable_parameters()))
    save_adapters(path, model, adapter_config({"fine_tune_type": ftype,
                                               "num_layers": num_layers}))
    return path


@pytest.mark.parametrize("ftype,train_gate", [("lora", False), ("dora", True), ("full", False)])
def test_fused_equals_unfused(tiny_dir, tmp_path, ftype, train_gate):
    from ouro_mlx.cli import main

    adapters = trained(tiny_dir, tmp_path / "a", ftype, train_gate, num_layers=1)
    assert main(["fuse", "--model", str(tiny_dir), "--adapter-path", str(adapters),
                 "--save-path", str(tmp_path / "fused")]) == 0
    unfused = load_model(tiny_dir, adapter_path=adapters)
    fused = load_model(tmp_path / "fused")
    assert not any("lora" in k for k, _ in tree_flatten(fused.parameters()))
    for kw in ({}, {"exit_threshold": 0.5}, {"weighted_exit": True}):
        np.testing.assert_allclose(logits(fused, **kw), logits(unfused, **kw), atol=1e-4)
    assert (tmp_path / "fused" / "tokenizer.json").exists()


def test_fuse_a_quantized_base(small_dir, tmp_path):
    from ouro_mlx.cli import main
    from ouro_mlx.convert import hf_to_mlx

    hf_to_mlx(small_dir, tmp_path / "q", quantize=True, q_bits=4, q_group_size=64)
    adapters = trained(tmp_path / "q", tmp_path / "a", num_layers=1)
    unfused = load_model(tmp_path / "q", adapter_path=adapters)
    assert main(["fuse", "--model", str(tmp_path / "q"), "--adapter-path", str(adapters),
                 "--save-path", str(tmp_path / "fq")]) == 0
    still = load_model(tmp_path / "fq")  # stays quantized: re-quantized, so close only
    assert isinstance(still.layers[-1].self_attn.q_proj, nn.QuantizedLinear)
    assert json.loads((tmp_path / "fq" / "config.json").read_text())["quantization"]
    assert main(["fuse", "--model", str(tmp_path / "q"), "--adapter-path", str(adapters),
                 "--save-path", str(tmp_path / "fd"), "--dequantize"]) == 0
    deq = load_model(tmp_path / "fd")
    assert isinstance(deq.layers[-1].self_attn.q_proj, nn.Linear)
    assert "quantization" not in json.loads((tmp_path / "fd" / "config.json").read_text())
    np.testing.assert_allclose(logits(deq), logits(unfused), atol=1e-4)


def test_fused_export_hf_reimports_identically(tiny_dir, tmp_path):
    from ouro_mlx.cli import main
    from ouro_mlx.convert import hf_to_mlx

    adapters = trained(tiny_dir, tmp_path / "a")
    assert main(["fuse", "--model", str(tiny_dir), "--adapter-path", str(adapters),
                 "--save-path", str(tmp_path / "fused"), "--export-hf",
                 str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["OuroForCausalLM"]
    fused = logits(load_model(tmp_path / "fused"))
    np.testing.assert_array_equal(logits(load_model(tmp_path / "hf")), fused)
    hf_to_mlx(tmp_path / "hf", tmp_path / "back")
    np.testing.assert_array_equal(logits(load_model(tmp_path / "back")), fused)
    np.testing.assert_allclose(fused, logits(load_model(tiny_dir, adapter_path=adapters)),
                               atol=1e-4)


def test_fuse_refusals_are_one_line(tiny_dir, tmp_path, capsys):
    from ouro_mlx.cli import main

    per_loop = trained(tiny_dir, tmp_path / "p", per_loop=True)
    shared = trained(tiny_dir, tmp_path / "s")
    cases = [
        (["--adapter-path", str(per_loop)], "cannot be fused into shared weights"),
        (["--adapter-path", str(tmp_path / "none")], "no such directory"),
        (["--adapter-path", str(shared), "--save-path", str(tiny_dir), "--force"],
         "is the source --model"),
        (["--adapter-path", str(shared), "--save-path", str(shared / "x")],
         "lies inside the source --adapter-path"),
    ]
    for flags, message in cases:
        argv = ["fuse", "--model", str(tiny_dir), "--save-path", str(tmp_path / "out"), *flags]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    assert (tiny_dir / "config.json").exists()


def test_stock_mlx_lm_generate_loads_our_shared_adapter(tiny_dir, tmp_path):
    import subprocess
    import sys

    from ouro_mlx import load
    from ouro_mlx.generation import stream_generate

    adapters = trained(tiny_dir, tmp_path / "a", num_layers=1)
    out = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(tiny_dir),
         "--adapter-path", str(adapters), "--prompt", "hi", "--max-tokens", "3",
         "--temp", "0", "--ignore-chat-template"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    theirs = out.stdout.split("==========\n")[1].removesuffix("\n")
    model, tok = load(tiny_dir, adapter_path=adapters)
    ours = "".join(r.text for r in stream_generate(model, tok, tok.encode("hi"), max_tokens=3))
    base, _ = load(tiny_dir)
    plain = "".join(r.text for r in stream_generate(base, tok, tok.encode("hi"), max_tokens=3))
    assert theirs == ours and ours != plain


# --- --exit-gate ------------------------------------------------------------------------


def test_exit_gate_flag_on_generate_chat_and_bench(tiny_dir, tmp_path, capsys, monkeypatch):
    from ouro_mlx.calibrate import save_gate
    from ouro_mlx.cli import main
    from ouro_mlx.commands import chat

    model = load_model(tiny_dir)
    model.model.early_exit_gate.bias = mx.array([30.0])  # always exits at step 1
    gate = save_gate(tmp_path / "gate.safetensors", model, threshold=0.5)
    shared = trained(tiny_dir, tmp_path / "a", num_layers=1)

    def depths(*flags):
        assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "-m", "6",
                     "--show-depth", "--no-chat-template", *flags]) == 0
        err = capsys.readouterr().err
        return err.split("loop steps per token: ")[1].split("\n")[0].split()

    assert depths() == ["4"] * 6  # the config's threshold 1.0: full depth
    # The gate file's threshold (0.5) applies: every token stops at step 1.
    assert depths("--exit-gate", str(gate)) == ["1"] * 6
    assert depths("--exit-gate", str(gate), "--adapter-path", str(shared)) == ["1"] * 6
    # An explicit --exit-threshold wins over the file's.
    assert depths("--exit-gate", str(gate), "--exit-threshold", "1.0") == ["4"] * 6

    lines = iter(["/stats", None])
    monkeypatch.setattr(chat, "read_line", lambda prompt: next(lines))
    assert main(["chat", "--model", str(tiny_dir), "--exit-gate", str(gate)]) == 0
    capsys.readouterr()
    assert main(["bench", "--model", str(tiny_dir), "--exit-gate", str(gate), "--dtype",
                 "float32", "--prompt-tokens", "4", "--gen-tokens", "2", "--repeats", "0",
                 "--no-fixed", "--no-peer", "--exits", "q0.5",
                 "--json-out", str(tmp_path / "b.json")]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["runs"]["float32"]["ouro"]
    assert [r["avg_loops"] for r in rows if r["name"] == "ouro adaptive q0.5"] == [1.0]
    capsys.readouterr()

    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi",
                 "--exit-gate", str(tmp_path / "bad.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "bad.safetensors: cannot read the gate file" in err and err.count("\n") == 1


def test_fuse_help_describes_every_flag_with_mlx_lm_defaults(capsys):
    from ouro_mlx.commands import fuse

    parser = fuse.build_parser()
    assert all(a.help for a in parser._actions)
    defaults = {a.dest: a.default for a in parser._actions}
    assert defaults["save_path"] == "fused_model" and defaults["adapter_path"] == "adapters"
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "Per-loop adapters" in capsys.readouterr().out


def test_gradients_reach_adapters_through_q_exit_logits(tiny_dir):
    """model(x) with a threshold < 1 (the bundled demo's config: 0.6) picks each
    token's step discretely; training through it (e.g. stock mlx_lm.lora) must work."""
    model = load_model(tiny_dir, exit_threshold=0.5)
    apply_adapters(model, per_loop=True, train_gate=True)
    randomize_b(model)

    def loss(m):
        return m(TOKENS).astype(mx.float32).square().mean()

    value, grads = nn.value_and_grad(model, loss)(model)
    flat = dict(tree_flatten(grads))
    assert np.isfinite(value.item())
    assert all(np.isfinite(np.array(g)).all() for g in flat.values())
    assert any(np.abs(np.array(g)).max() > 0 for k, g in flat.items() if k.endswith("lora_a"))
