"""Hostile inputs to the engine: absurd configs through stock mlx-lm, NaN weights,
chat templates Jinja refuses, lone surrogates, ChatSession options of the wrong type,
and the end-of-turn token declared where stock mlx-lm reads eos ids."""

from __future__ import annotations

import json
import shutil
import time

import mlx.core as mx
import pytest

import ouro_mlx
from ouro_mlx import ChatSession, cli, limits
from ouro_mlx.demo import model_path
from ouro_mlx.generation import batch_generate, generate, stream_generate
from ouro_mlx.sampling import NonFiniteLogits


def demo_copy(tmp_path, name="model"):
    dst = tmp_path / name
    shutil.copytree(model_path(), dst)
    return dst


def edit_json(file, **changes):
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


# -- an absurd config through stock mlx-lm --------------------------------------------


def test_absurd_layer_count_is_refused_by_stock_mlx_lm_load(tmp_path, monkeypatch):
    import mlx_lm.utils

    d = demo_copy(tmp_path)
    edit_json(d / "config.json", num_hidden_layers=1_000_000)
    # a fixed machine size, so the test means the same on any machine
    monkeypatch.setattr(limits, "memory_bytes", lambda: 64 * 2**30)
    start = time.monotonic()
    with pytest.raises(ValueError, match="num_hidden_layers 1,000,000") as e:
        mlx_lm.utils.load(str(d))
    assert time.monotonic() - start < 20  # not minutes later, in the allocator
    assert "this machine has 64.0 GiB" in str(e.value) and "\n" not in str(e.value)
    # the same config through ouro_mlx's loader: its own one-line message
    with pytest.raises(ValueError, match="config.json"):
        ouro_mlx.load(d)


# -- NaN weights ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nan_model(tiny_dir):
    model, tokenizer = ouro_mlx.load(tiny_dir)
    w = model.model.layers[0].mlp.down_proj.weight
    model.model.layers[0].mlp.down_proj.weight = w * mx.nan
    mx.eval(model.parameters())
    return model, tokenizer


@pytest.mark.parametrize("opts", [
    {}, {"exit_threshold": 1.0}, {"exit_threshold": 1.0, "compile_step": True},
    {"exit_threshold": 1.0, "draft_loops": 1},
    {"exit_threshold": 1.0, "draft_loops": 2, "compile_step": True},
    {"exit_threshold": 1.0, "pipeline": True},
], ids=["adaptive", "fixed", "compiled", "speculative", "speculative-compiled", "pipeline"])
def test_nan_weights_stop_every_decoding_path(nan_model, opts):
    model, tokenizer = nan_model
    with pytest.raises(NonFiniteLogits, match="non-finite logits .* weights") as e:
        generate(model, tokenizer, "hello", max_tokens=12, **opts)
    assert "\n" not in str(e.value)


def test_non_finite_logits_midway_stop_at_that_token(tiny_dir):
    model, tokenizer = ouro_mlx.load(tiny_dir)
    prompt = [5, 6, 7]

    def broken_after(n, value):  # a logits processor that breaks the n+1-th token
        return lambda tokens, logits: logits + (value if tokens.size > len(prompt) + n - 1
                                                else 0.0)

    for value in (mx.nan, mx.inf):
        seen = []
        with pytest.raises(NonFiniteLogits, match="at generated token 4"):
            for r in stream_generate(model, tokenizer, prompt, max_tokens=20,
                                     logits_processors=[broken_after(3, value)]):
                seen.append(r.token)
        assert len(seen) == 3 and all(0 <= t < model.args.vocab_size for t in seen)
    # -inf logits (a banned token) are not an error
    ban = lambda tokens, logits: mx.where(mx.arange(logits.shape[-1]) == 0, -mx.inf, logits)
    assert len(list(stream_generate(model, tokenizer, prompt, max_tokens=5,
                                     logits_processors=[ban]))) >= 1


def test_nan_weights_in_batch_generate_and_chat_session(nan_model):
    model, tokenizer = nan_model
    with pytest.raises(NonFiniteLogits):
        batch_generate(model, tokenizer, ["hi", "hello"], max_tokens=4)
    session = ChatSession(model, tokenizer)
    with pytest.raises(NonFiniteLogits):
        list(session.send("hi"))
    assert session.messages == []  # the refused turn is not kept


def test_nan_weights_in_the_cli_are_one_line(tmp_path, capsys):
    d = demo_copy(tmp_path)
    weights = mx.load(str(d / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name] = weights[name] * mx.nan
    mx.save_safetensors(str(d / "model.safetensors"), weights, metadata={"format": "pt"})
    assert cli.main(["generate", "--model", str(d), "-p", "4,34,12,23"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ouro-mlx generate: error: The model produced non-finite logits")
    assert "\n" not in err


# -- chat templates that Jinja's sandbox refuses ----------------------------------------


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_a_template_jinja_refuses_is_one_line_naming_its_file(tmp_path, capsys, where):
    d = demo_copy(tmp_path)
    bad = "{{ ''.__class__.__mro__ }}"
    if where == "chat_template.jinja":
        (d / where).write_text(bad)
    else:
        edit_json(d / where, chat_template=bad)
    for extra in ([], ["--raw-special-tokens"]):
        assert cli.main(["generate", "--model", str(d), "-p", "hi", *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"ouro-mlx generate: error: {d / where}: the chat template")
        assert "sandbox" in err and "\n" not in err
    session = ChatSession.load(d)
    with pytest.raises(ValueError, match=f"{d / where}: the chat template .*sandbox"):
        list(session.send("hi"))
    assert session.messages == []


def test_a_template_jinja_refuses_is_a_500_saying_so_in_the_server(tmp_path):
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    from ouro_mlx.server import create_app

    d = demo_copy(tmp_path)
    where = "chat_template.jinja"
    (d / where).write_text("{{ ''.__class__.__mro__ }}")
    with TestClient(create_app(*ouro_mlx.load(d))) as client:
        r = client.post("/v1/chat/completions", json={"messages": [
            {"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 500
    assert r.json()["error"]["message"].startswith(f"{d / where}: the chat template")


def test_a_broken_template_is_one_line_too(tmp_path):
    d = demo_copy(tmp_path)
    edit_json(d / "tokenizer_config.json", chat_template="{% for m in messages %}")
    with pytest.raises(ValueError, match="tokenizer_config.json: the chat template failed"):
        list(ChatSession.load(d).send("hi"))


# -- lone surrogates --------------------------------------------------------------------


def test_lone_surrogates_are_one_line_errors(bundled):
    from ouro_mlx.encoding import encode_chat, encode_text

    model, tokenizer = bundled
    session = ChatSession(model, tokenizer)
    text = json.loads('"4,34\\ud80012"')
    with pytest.raises(ValueError, match=r"send: text holds a lone surrogate \(\\ud800\)"):
        list(session.send(text))
    assert session.messages == []
    with pytest.raises(ValueError, match=r"messages\[0\].content holds a lone surrogate"):
        encode_chat(tokenizer, [{"role": "user", "content": text}],
                    add_generation_prompt=True)
    with pytest.raises(ValueError, match="the prompt holds a lone surrogate"):
        encode_text(tokenizer, text)


# -- ChatSession options ----------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,name", [
    ({"loop": {"ut_steps": "3"}}, TypeError, "loop: ut_steps"),
    ({"loop": {"exit_threshold": "0.5"}}, TypeError, "loop: exit_threshold"),
    ({"loop": {"min_loops": 0}}, ValueError, "loop: min_loops"),
    ({"loop": "fast"}, TypeError, "loop must be a dict"),
    ({"sampling": {"max_tokens": None}}, TypeError, "sampling: max_tokens"),
    ({"sampling": {"max_tokens": "8"}}, TypeError, "sampling: max_tokens"),
    ({"sampling": {"max_tokens": 2.5}}, TypeError, "sampling: max_tokens"),
    ({"sampling": {"max_tokens": True}}, TypeError, "sampling: max_tokens"),
    ({"sampling": {"sampler": "greedy"}}, TypeError, "sampling: sampler must be callable"),
    ({"sampling": {"logits_processors": [1]}}, TypeError, "sampling: logits_processors"),
    ({"decoding": {"draft_loops": "2"}}, TypeError, "decoding: draft_loops"),
    ({"stop": [1, 2]}, TypeError, "stop must be a str or a list of str"),
    ({"stop": 5}, TypeError, "stop must be a str or a list of str"),
    ({"system_prompt": 5}, TypeError, "system_prompt must be a str"),
    ({"kv_group_size": "64"}, TypeError, "kv_group_size"),
])
def test_session_options_of_the_wrong_type_are_refused_at_construction(
        bundled, kwargs, error, name):
    model, tokenizer = bundled
    with pytest.raises(error, match=name):
        ChatSession(model, tokenizer, **kwargs)


@pytest.mark.parametrize("call,name", [
    (lambda s: s.set_loops("3"), "set_loops: n must be an integer"),
    (lambda s: s.set_loops(2.0), "set_loops: n must be an integer"),
    (lambda s: s.set_threshold("0.5"), "set_threshold: q must be a number"),
    (lambda s: setattr(s, "messages", "hello"), "messages must be a list"),
    (lambda s: setattr(s, "messages", [5]), r"messages\[0\] must be a dict"),
    (lambda s: setattr(s, "messages", [{"role": "user"}]), r"messages\[0\] must be a dict"),
    (lambda s: setattr(s, "messages", [{"role": "user", "content": 3}]), r"messages\[0\]"),
    (lambda s: setattr(s, "messages", [{"role": "user", "content": "a", "x": 1}]),
     r"messages\[0\]\['x'\]"),
    (lambda s: setattr(s, "system_prompt", ["a"]), "system_prompt must be a str"),
])
def test_session_settings_of_the_wrong_type_are_refused_when_set(bundled, call, name):
    session = ChatSession(*bundled)
    with pytest.raises(TypeError, match=name):
        call(session)
    assert session.loop == {} and session.messages == []
    assert "".join(e.text for e in session.send("4,34,12,23"))  # still usable


def test_a_str_stop_is_one_stop_string(bundled):
    model, tokenizer = bundled
    answer = "".join(e.text for e in ChatSession(model, tokenizer).send("4,34,12,23"))
    assert len(answer) >= 2
    stop = answer[1:]
    # as characters, "<stop>☃" would end the answer at its second character
    session = ChatSession(model, tokenizer, stop=stop + "☃")
    assert session.stop == [stop + "☃"]
    assert "".join(e.text for e in session.send("4,34,12,23")) == answer
    session = ChatSession(model, tokenizer, stop=stop)
    assert "".join(e.text for e in session.send("4,34,12,23")) == answer[:1]
    assert session.stats.finish_reason == "stop_string"


# -- <|im_end|> where stock mlx-lm reads eos ids ------------------------------------------


def test_stock_mlx_lm_stops_at_the_end_of_turn(tmp_path):
    import mlx_lm.utils

    from ouro_mlx.loading import copy_support_files
    from ouro_mlx.random_model import make_random_checkpoint

    written = make_random_checkpoint(tmp_path / "random", "tiny", seed=3)
    copied = tmp_path / "copied"  # what fuse / calibrate-exit / convert / train write
    copied.mkdir()
    source = demo_copy(tmp_path, "source")
    (source / "generation_config.json").unlink()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, copied / name)
    copy_support_files(source, copied)
    for d in (model_path(), written, copied):
        _, tokenizer = mlx_lm.utils.load(str(d))
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert im_end in tokenizer.eos_token_ids, d
        assert 0 in tokenizer.eos_token_ids  # the config's own eos stays
        _, ours = ouro_mlx.load(d)
        assert set(ours.eos_token_ids) == set(tokenizer.eos_token_ids)
