"""ouro-mlx lora: the trainer (ouro_mlx.finetune) on a tiny model, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import ouro_mlx
from ouro_mlx import finetune
from ouro_mlx.cli import main as cli

REPO = Path(__file__).resolve().parents[1]


def chat(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": f"{a} plus {b}"},
                         {"role": "assistant", "content": f"{a + b}"}]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, n in (("train", 32), ("valid", 8), ("test", 8)):
        rows = [chat(*map(int, rng.integers(0, 5, 2))) for _ in range(n)]
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def lora(model: Path, data: Path, out: Path, *extra: str) -> int:
    return cli(["lora", "--model", str(model), "--train", "--data", str(data),
                "--adapter-path", str(out), "--batch-size", "4", "--learning-rate", "1e-3",
                "--steps-per-report", "1", "--val-batches", "2", "--num-layers", "-1",
                *extra])


def state(adapter_path: Path) -> dict:
    return json.loads((adapter_path / finetune.STATE).read_text())


def test_short_run_lowers_validation_loss(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "ad"
    assert lora(tiny_dir, data_dir, out, "--iters", "12", "--steps-per-eval", "6") == 0
    s = state(out)
    assert [v[0] for v in s["val"]] == [0, 5, 11]  # as mlx-lm: before steps 1, 6, 12
    assert s["val"][-1][1] < s["val"][0][1] - 0.5
    for name in ("adapters.safetensors", "adapter_config.json", "optimizer.safetensors",
                 "0000012_adapters.safetensors", "loss.png"):
        assert (out / name).is_file(), name
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["rank"] == 8


def test_fixed_loss_is_mlx_lm_default_loss(tiny_dir, data_dir):
    from mlx_lm.tuner.trainer import default_loss, iterate_batches

    model, tokenizer = ouro_mlx.load(tiny_dir)
    args = SimpleNamespace(data=str(data_dir), train=True, test=False, mask_prompt=True,
                           batch_size=4)
    train, _, _ = finetune.load_datasets(args, tokenizer, log=lambda m: None)
    batch, lengths = next(iterate_batches(train, 4, 2048))
    assert int(lengths[0, 0]) > 0  # the prompt is masked
    ours = finetune.make_loss(SimpleNamespace(loss="fixed", ut_steps=None, beta=0.1), model)
    a, na = ours(model, batch, lengths)
    b, nb = default_loss(model, batch, lengths)
    assert int(na) == int(nb)
    assert abs(a.item() - b.item()) < 1e-5


def test_resume_continues_the_same_curve(tiny_dir, data_dir, tmp_path):
    # dropout (random state), validation every step (numpy state) and two saves
    cfg = tmp_path / "lora.yaml"
    cfg.write_text("lora_parameters: {rank: 4, scale: 10.0, dropout: 0.1}\nseed: 3\n")
    common = ["-c", str(cfg), "--steps-per-eval", "1", "--save-every", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert lora(tiny_dir, data_dir, straight, *common, "--iters", "4") == 0
    assert lora(tiny_dir, data_dir, split, *common, "--iters", "2") == 0
    assert state(split)["iteration"] == 2
    assert lora(tiny_dir, data_dir, split, *common, "--iters", "4") == 0
    a, b = state(straight), state(split)
    assert b["iteration"] == 4 and len(b["losses"]) == 4
    np.testing.assert_allclose(a["losses"], b["losses"], atol=1e-5)
    np.testing.assert_allclose([v[1] for v in a["val"]], [v[1] for v in b["val"]], atol=1e-5)
    wa, wb = adapter_weights(straight), adapter_weights(split)
    assert all(np.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert (split / "0000002_adapters.safetensors").is_file()  # earlier copies kept


def test_resume_refuses_other_structure(tiny_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "ad"
    assert lora(tiny_dir, data_dir, out, "--iters", "1") == 0
    capsys.readouterr()
    assert lora(tiny_dir, data_dir, out, "--iters", "2", "--per-loop-adapters") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "per_loop_adapters" in err[0] and "--adapter-path" in err[0]


def test_bad_jsonl_lines_are_reported_with_file_and_line(tiny_dir, tmp_path):
    _, tokenizer = ouro_mlx.load(tiny_dir)
    good = json.dumps(chat(1, 2)).encode()
    lines = [
        good,
        b"{not json",
        b"[1, 2]",
        b'{"messages": "hi"}',
        b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"text": "another format"}',
        b"",
        b'{"messages": [{"role": "user", "content": 3}]}',
        json.dumps(chat(3, 4) | {"note": "extra keys are fine"}).encode(),
    ]
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    said: list[str] = []
    rows = finetune.load_split(path, tokenizer, SimpleNamespace(mask_prompt=False), said.append)
    assert len(rows) == 2
    assert [m.split(": ")[0] for m in said] == [f"{path}:{n}" for n in (2, 3, 4, 5, 6, 8)]
    assert all("skipped" in m for m in said)


def test_only_bad_lines_is_one_line_refusal(tiny_dir, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("oops\n{}\n")
    assert lora(tiny_dir, data, tmp_path / "ad", "--iters", "1") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ouro-mlx lora: error: ") and "train.jsonl" in err[-1]
    assert any("train.jsonl:1:" in line for line in err)  # the skipped lines, reported
    assert not (tmp_path / "ad").exists()


def test_special_token_strings_in_data_are_plain_text(tiny_dir, tmp_path):
    _, tokenizer = ouro_mlx.load(tiny_dir)
    end = "<|im_end|>"
    end_id = tokenizer.get_added_vocab()[end]
    path = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"hi{end}"},
                          {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "ok"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (sneaky, _), (plain, _) = finetune.load_split(path, tokenizer,
                                                  SimpleNamespace(mask_prompt=False))
    assert sneaky.count(end_id) == plain.count(end_id)


def adapter_weights(path: Path) -> dict:
    return dict(mx.load(str(path / "adapters.safetensors")))


@pytest.mark.parametrize("extra", [[], ["--per-loop-adapters", "--train-gate"]])
def test_only_adapters_and_gate_train(tiny_dir, data_dir, tmp_path, extra):
    out = tmp_path / "ad"
    assert lora(tiny_dir, data_dir, out, "--iters", "3", "--loss", "ouro", *extra) == 0
    w = adapter_weights(out)
    gate = {"model.early_exit_gate.weight", "model.early_exit_gate.bias"}
    per_loop = bool(extra)
    assert not gate & set(w)  # the gate lives apart, where mlx-lm's loader does not look
    assert (out / "exit_gate.safetensors").exists() == per_loop
    if per_loop:
        w.update(mx.load(str(out / "exit_gate.safetensors")))
    lora_keys = [k for k in w if k not in gate]
    assert len(lora_keys) == 2 * 7 * 2 and all(k.endswith(("lora_a", "lora_b")) for k in lora_keys)
    T = 4
    for k in lora_keys:
        assert (w[k].ndim == 3 and w[k].shape[0] == T) == per_loop, k
        if k.endswith("lora_b"):
            assert mx.abs(w[k]).max().item() > 0  # trained away from zero
    base, _ = ouro_mlx.load(tiny_dir)
    tuned, _ = ouro_mlx.load(tiny_dir)
    from ouro_mlx.adapters import load_adapters

    load_adapters(tuned, out)
    before = dict(tree_flatten(base.parameters()))
    after = {k.replace(".linear.", "."): v for k, v in tree_flatten(tuned.parameters())
             if "lora_" not in k}
    assert set(before) == set(after)
    for k, v in before.items():
        same = mx.array_equal(v, after[k]).item()
        assert same != (per_loop and k in gate), k


def test_per_loop_steps_get_different_adapters(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "ad"
    assert lora(tiny_dir, data_dir, out, "--iters", "3", "--per-loop-adapters") == 0
    b = adapter_weights(out)["model.layers.0.mlp.down_proj.lora_b"]
    assert not mx.allclose(b[0], b[-1]).item()


def test_grad_checkpoint_gives_the_same_gradients(tiny_dir):
    from ouro_mlx.adapters import apply_adapters

    grads = []
    for ckpt in (False, True):
        model, _ = ouro_mlx.load(tiny_dir)
        mx.random.seed(0)
        apply_adapters(model, per_loop=True)
        for layer in model.layers:  # non-zero B so every path carries gradient
            layer.mlp.down_proj.lora_b = mx.ones_like(layer.mlp.down_proj.lora_b) * 0.01
        if ckpt:
            finetune.checkpoint_layers(model)
        loss = finetune.make_loss(SimpleNamespace(loss="ouro", ut_steps=None, beta=0.1), model)
        batch = mx.array([[1, 5, 9, 13, 17, 21, 25, 29]])
        (value, _), g = nn.value_and_grad(model, loss)(model, batch, mx.array([[1, 7]]))
        grads.append((value.item(), dict(tree_flatten(g))))
    assert abs(grads[0][0] - grads[1][0]) < 1e-6
    for k, v in grads[0][1].items():
        assert np.allclose(v, grads[1][1][k], rtol=1e-4, atol=1e-5), k
    # the class itself is untouched: other models in the process do not checkpoint
    plain, _ = ouro_mlx.load(tiny_dir)
    assert not getattr(type(plain.layers[0]), "_ouro_checkpointed", False)


KILLER = """
import os, signal, sys
import ouro_mlx.finetune as f

write = f.write_state

def write_state(file, state):
    if state.iteration == 4:  # die halfway through the second save
        file.write_text('{"iteration": ')
        os.kill(os.getpid(), signal.SIGKILL)
    write(file, state)

f.write_state = write_state
from ouro_mlx.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_a_save_keeps_the_previous_adapters(tiny_dir, data_dir, tmp_path):
    from ouro_mlx.adapters import load_adapters

    out = tmp_path / "ad"
    args = ["lora", "--model", str(tiny_dir), "--train", "--data", str(data_dir),
            "--adapter-path", str(out), "--batch-size", "4", "--iters", "4",
            "--save-every", "2", "--num-layers", "-1", "--learning-rate", "1e-3"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", KILLER, *args], capture_output=True, env=env,
                       timeout=300)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    assert state(out)["iteration"] == 2
    model, _ = ouro_mlx.load(tiny_dir)
    load_adapters(model, out)  # the previous checkpoint, whole
    w = adapter_weights(out)
    kept = dict(mx.load(str(out / "0000002_adapters.safetensors")))
    assert all(mx.array_equal(w[k], kept[k]).item() for k in w)
    assert any(p.name.startswith(".ad.tmp-") for p in tmp_path.iterdir())
    # running again continues from iteration 2 and cleans up the dead run's leftovers
    assert cli(args) == 0
    assert state(out)["iteration"] == 4 and len(state(out)["losses"]) == 4
    assert not any(p.name.startswith(".ad.") for p in tmp_path.iterdir())


@pytest.mark.parametrize("flags, named", [
    (["--learning-rate", "nan"], "--learning-rate"),
    (["--learning-rate", "0"], "--learning-rate"),
    (["--iters", "0"], "--iters"),
    (["--batch-size", "0"], "--batch-size"),
    (["--grad-accumulation-steps", "0"], "--grad-accumulation-steps"),
    (["--beta", "-1"], "--beta"),
    (["--ut-steps", "0"], "--ut-steps"),
    (["--val-batches", "0"], "--val-batches"),
    (["--fine-tune-type", "dora", "--per-loop-adapters"], "--per-loop-adapters"),
    (["--trust-remote-code"], "--trust-remote-code"),
])
def test_bad_options_are_one_line_naming_the_flag(tiny_dir, data_dir, tmp_path, capsys,
                                                   flags, named):
    flags = flags if "--iters" in flags else [*flags, "--iters", "1"]
    assert lora(tiny_dir, data_dir, tmp_path / "ad", *flags) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err


@pytest.mark.parametrize("text, named", [
    ("- 1\n- 2\n", "mapping"),
    ("iters: 1\nitres: 3\n", "'itres'"),
    ("iters: three\n", "--iters"),
    ("iters: 1\nlora_parameters: 3\n", "lora_parameters"),
    ("iters: 1\nlora_parameters: {alpha: 16}\n", "'alpha'"),
    ("iters: 1\nlora_parameters: {rank: 0}\n", "lora_parameters.rank"),
    ("iters: 1\nlr_schedule: {name: eval, arguments: [1]}\n", "lr_schedule.name"),
    ("iters: 1\noptimizer_config: {adam: {betas: [0.9, .nan]}}\n",
     "optimizer_config.adam.betas"),
    ("iters: 1\nmask_prompt: [1]\n", "--mask-prompt"),
])
def test_bad_yaml_is_one_line(tiny_dir, data_dir, tmp_path, capsys, text, named):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert lora(tiny_dir, data_dir, tmp_path / "ad", "-c", str(cfg)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err


def test_yaml_sets_options_and_flags_win(tmp_path):
    from ouro_mlx.commands.lora import build_parser, merge, validate

    cfg = tmp_path / "c.yaml"
    cfg.write_text("iters: 7\nbatch_size: 2\nloss: fixed\nper_loop_adapters: true\n"
                   "lora_parameters: {rank: 4}\n")
    a = validate(merge(build_parser().parse_args(
        ["--model", "m", "--train", "-c", str(cfg), "--iters", "9"])))
    assert (a.iters, a.batch_size, a.loss, a.per_loop_adapters) == (9, 2, "fixed", True)
    assert a.lora_parameters == {"rank": 4, "dropout": 0.0, "scale": 20.0}
    assert (a.learning_rate, a.optimizer, a.beta, a.save_every) == (1e-5, "adam", 0.1, 100)


def options(model: Path, data: Path, out: Path, *extra: str) -> SimpleNamespace:
    from ouro_mlx.commands.lora import build_parser, merge, validate

    return validate(merge(build_parser().parse_args(
        ["--model", str(model), "--data", str(data), "--adapter-path", str(out),
         "--batch-size", "4", "--learning-rate", "1e-3", "--num-layers", "-1",
         "--val-batches", "2", *extra])))


def test_test_only_loads_the_adapters(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "ad"
    quiet = lambda *a, **k: None  # noqa: E731
    trained = finetune.run(options(tiny_dir, data_dir, out, "--train", "--test", "--iters",
                                   "3", "--loss", "fixed"), log=quiet)
    again = finetune.run(options(tiny_dir, data_dir, out, "--test", "--loss", "fixed"),
                         log=quiet)
    base = finetune.run(options(tiny_dir, data_dir, "", "--test", "--loss", "fixed"),
                        log=quiet)
    assert abs(trained["test_loss"] - again["test_loss"]) < 1e-5
    assert base["test_loss"] > again["test_loss"] + 0.1


def test_grad_accumulation_and_schedule(tiny_dir, data_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr_schedule: {name: cosine_decay, arguments: [1.0e-3, 4], warmup: 2}\n")
    out = tmp_path / "ad"
    assert lora(tiny_dir, data_dir, out, "-c", str(cfg), "--iters", "4",
                "--grad-accumulation-steps", "2", "--save-every", "1") == 0
    s = state(out)
    assert s["iteration"] == 4 and all(np.isfinite(s["losses"]))
    lrs = [r["learning_rate"] for r in s["reports"]]
    # warming up from 0, one optimizer update every 2 iterations
    assert lrs[0] == lrs[1] == lrs[2] == 0 < lrs[3]
    # saved only on update steps: no half-accumulated gradient in a checkpoint
    assert sorted(p.name[:7] for p in out.glob("0*_adapters.safetensors")) == [
        "0000002", "0000004"]


def test_qlora_on_a_quantized_base(small_dir, data_dir, tmp_path):
    q = tmp_path / "q4"
    assert cli(["convert", "--hf-path", str(small_dir), "--mlx-path", str(q), "-q",
                "--q-group-size", "64"]) == 0
    data = tmp_path / "data"  # small and without validation: quantized matmuls are slow on CPU
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps(chat(1, 2)) + "\n" + json.dumps(chat(2, 2)))
    out = tmp_path / "ad"
    assert lora(q, data, out, "--iters", "1", "--loss", "fixed", "--batch-size", "2") == 0
    model, _ = ouro_mlx.load(q)
    from ouro_mlx.adapters import load_adapters

    load_adapters(model, out)
    assert isinstance(model.layers[0].mlp.down_proj.linear, nn.QuantizedLinear)
    assert state(out)["iteration"] == 1


def test_adapter_path_that_is_a_file_is_refused_before_loading(tiny_dir, data_dir, tmp_path,
                                                               capsys):
    f = tmp_path / "file"
    f.write_text("mine")
    assert lora(tiny_dir, data_dir, f, "--iters", "1") == 1
    captured = capsys.readouterr()
    assert "--adapter-path" in captured.err and "Loading" not in captured.out
    assert f.read_text() == "mine"
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    assert lora(tiny_dir, data_dir, d, "--iters", "1") == 1
    assert "sub" in capsys.readouterr().err and (d / "sub").is_dir()


def test_resume_adapter_file_loads_weights_only(tiny_dir, data_dir, tmp_path, capsys):
    quiet = lambda *a, **k: None  # noqa: E731
    first = tmp_path / "first"
    finetune.run(options(tiny_dir, data_dir, first, "--train", "--iters", "3"), log=quiet)
    tested = finetune.run(options(tiny_dir, data_dir, first, "--test"), log=quiet)
    file = str(first / "adapters.safetensors")
    second = tmp_path / "second"
    again = finetune.run(options(tiny_dir, data_dir, second, "--train", "--test", "--iters",
                                 "1", "--learning-rate", "1e-30", "--resume-adapter-file",
                                 file), log=quiet)
    assert abs(again["test_loss"] - tested["test_loss"]) < 1e-5
    assert state(second)["iteration"] == 1  # a new run: weights only
    wrong = tmp_path / "wrong"
    assert lora(tiny_dir, data_dir, wrong, "--iters", "1", "--per-loop-adapters",
                "--resume-adapter-file", file) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "adapters.safetensors" in err[-1] and "shape" in err[-1]


def test_resume_with_some_layers_and_damaged_state_files(tiny_dir, data_dir, tmp_path,
                                                         capsys):
    out = tmp_path / "ad"
    assert lora(tiny_dir, data_dir, out, "--iters", "1", "--num-layers", "1") == 0
    assert lora(tiny_dir, data_dir, out, "--iters", "2", "--num-layers", "1") == 0
    assert state(out)["iteration"] == 2
    capsys.readouterr()
    s = state(out)
    s["losses"] = ["x", 1]
    (out / finetune.STATE).write_text(json.dumps(s))
    assert lora(tiny_dir, data_dir, out, "--iters", "3", "--num-layers", "1") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainer_state.json" in err[0] and "losses" in err[0]
    s["losses"] = [1.0, 2.0]
    (out / finetune.STATE).write_text(json.dumps(s))
    opt = dict(mx.load(str(out / finetune.OPTIMIZER)))
    opt.pop(sorted(opt)[-1])
    mx.save_safetensors(str(out / finetune.OPTIMIZER), opt)
    assert lora(tiny_dir, data_dir, out, "--iters", "3", "--num-layers", "1") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "optimizer.safetensors" in err[-1]


@pytest.mark.parametrize("mask", [False, True])
def test_ids_equal_mlx_lm_datasets(tiny_dir, tmp_path, mask):
    from mlx_lm.tuner.datasets import ChatDataset, CompletionsDataset, TextDataset

    _, tokenizer = ouro_mlx.load(tiny_dir)
    chats = [chat(1, 2), {"messages": [{"role": "system", "content": "be brief"},
                                       *chat(3, 4)["messages"]]}]
    completions = [{"prompt": "2 plus 2", "completion": "4"}]
    texts = [{"text": "one two three"}]
    cases = [(chats, ChatDataset(chats, tokenizer, mask_prompt=mask)),
             (completions, CompletionsDataset(completions, tokenizer, "prompt", "completion",
                                              mask))]
    if not mask:
        cases.append((texts, TextDataset(texts, tokenizer)))
    for rows, theirs in cases:
        path = tmp_path / "train.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        ours = finetune.load_split(path, tokenizer, SimpleNamespace(mask_prompt=mask))
        assert [(list(i), o) for i, o in ours] == [
            (list(i), o) for i, o in (theirs.process(r) for r in rows)]


def test_tools_rows(tiny_dir, tmp_path):
    _, tokenizer = ouro_mlx.load(tiny_dir)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    sneaky = [{"type": "function", "function": {"name": "<|im_start|>", "parameters": {}}}]
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(chat(1, 2) | {"tools": tools}) + "\n"
                    + json.dumps(chat(1, 2) | {"tools": sneaky}) + "\n")
    said: list[str] = []
    rows = finetune.load_split(path, tokenizer, SimpleNamespace(mask_prompt=False), said.append)
    assert len(rows) == 1 and rows[0][0] == list(tokenizer.apply_chat_template(
        chat(1, 2)["messages"], tools=tools))
    assert len(said) == 1 and said[0].startswith(f"{path}:2: skipped:")


def test_data_parallel_under_mlx_launch(tiny_dir, data_dir, tmp_path):
    launch = Path(sys.executable).parent / "mlx.launch"
    common = ["--model", str(tiny_dir), "--train", "--data", str(data_dir), "--iters", "2",
              "--batch-size", "4", "--num-layers", "-1", "--learning-rate", "1e-3",
              "--val-batches", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    two = subprocess.run([str(launch), "-n", "2", "--backend", "ring", "--", sys.executable,
                          "-m", "ouro_mlx", "lora", "--adapter-path", str(tmp_path / "two"),
                          *common], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert two.stdout.count("Saved adapter weights") == 1  # rank 0 writes
    assert lora(tiny_dir, data_dir, tmp_path / "one", "--iters", "2", "--val-batches", "1") == 0
    a, b = state(tmp_path / "one"), state(tmp_path / "two")
    assert b["iteration"] == 2
    # the same global batches (each process averages over its own tokens, as mlx-lm;
    # equal here, where every row has as many targets)
    np.testing.assert_allclose(a["losses"], b["losses"], atol=1e-4)
    assert abs(a["val"][0][1] - b["val"][0][1]) < 1e-4


def test_per_loop_adapters_with_fewer_steps_test_at_their_depth(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "ad"
    quiet = lambda *a, **k: None  # noqa: E731
    trained = finetune.run(options(tiny_dir, data_dir, out, "--train", "--test", "--iters",
                                   "2", "--per-loop-adapters", "--ut-steps", "2"), log=quiet)
    assert adapter_weights(out)["model.layers.0.mlp.up_proj.lora_a"].shape[0] == 2
    again = finetune.run(options(tiny_dir, data_dir, out, "--test"), log=quiet)
    assert abs(trained["test_loss"] - again["test_loss"]) < 1e-5


def test_num_layers_beyond_the_model_is_refused(tiny_dir, data_dir, tmp_path, capsys):
    assert lora(tiny_dir, data_dir, tmp_path / "ad", "--iters", "1", "--num-layers", "3") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--num-layers 3: the model has 2 layers (use 1..2, or -1 for all).")


def test_tool_call_messages(tiny_dir, tmp_path):
    _, tokenizer = ouro_mlx.load(tiny_dir)
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}]}
    ok = {"messages": [{"role": "user", "content": "add"}, call,
                       {"role": "tool", "content": "1", "name": "add"}]}
    bad = json.loads(json.dumps(ok))
    bad["messages"][1]["tool_calls"][0]["function"]["name"] = "<|im_end|>"
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
    said: list[str] = []
    rows = finetune.load_split(path, tokenizer, SimpleNamespace(mask_prompt=False), said.append)
    # this template has no tool calls: the row is reported, not a traceback
    assert rows == [] and said[0].startswith(f"{path}:1: skipped: the chat template cannot")
    assert said[1].startswith(f"{path}:2: skipped: a row with tools or tool calls cannot")


def test_a_trained_gate_keeps_the_adapters_loadable_by_stock_mlx_lm(data_dir, tmp_path):
    """lora --train-gate: mlx-lm's own loader takes the directory (its base gate), and
    ouro-mlx's applies the trained gate too; the gate file also serves --exit-gate."""
    from mlx_lm.tuner.utils import load_adapters as mlx_load_adapters
    from mlx_lm.utils import load as mlx_load

    from ouro_mlx.adapters import load_adapters
    from ouro_mlx.calibrate import load_exit_gate
    from ouro_mlx.demo import model_path

    out = tmp_path / "ad"
    assert lora(model_path(), data_dir, out, "--iters", "2", "--train-gate",
                "--learning-rate", "0.05") == 0
    trained = mx.load(str(out / "exit_gate.safetensors"))
    base = dict(tree_flatten(ouro_mlx.load_model(model_path()).parameters()))
    assert not mx.array_equal(trained["model.early_exit_gate.bias"],
                              base["model.early_exit_gate.bias"]).item()  # it trained

    model, _ = mlx_load(str(model_path()), adapter_path=str(out))  # stock mlx-lm
    mlx_load_adapters(ouro_mlx.load_model(model_path()), str(out))
    theirs = dict(tree_flatten(model.parameters()))
    assert mx.array_equal(theirs["model.early_exit_gate.bias"],
                          base["model.early_exit_gate.bias"]).item()
    lora_b = [k for k in theirs if k.endswith("lora_b")]
    assert lora_b and all(mx.array_equal(theirs[k], w).item()
                          for k, w in adapter_weights(out).items() if k in lora_b)

    ours = ouro_mlx.load_model(model_path())
    load_adapters(ours, out)
    mine = dict(tree_flatten(ours.parameters()))
    for k, v in trained.items():
        assert mx.array_equal(mine[k], v).item(), k
    gated = ouro_mlx.load_model(model_path())
    assert load_exit_gate(gated, out / "exit_gate.safetensors") is None
    assert mx.array_equal(gated.model.early_exit_gate.bias,
                          trained["model.early_exit_gate.bias"]).item()
