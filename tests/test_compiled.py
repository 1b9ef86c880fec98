"""The compiled decode step (ouro_mlx.decoding.compiled): the same tokens as the plain path,
buffers that grow, a prompt cache kept up to date, clear refusals."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import CacheList, QuantizedKVCache

import ouro_mlx
from ouro_mlx import demo, stream_generate
from ouro_mlx.decoding.compiled import CompiledDecoder, check_compilable

PROMPT = [5, 17, 300, 42, 7, 99, 128]


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    model, tok = ouro_mlx.load(tiny_dir)
    tok._eos_token_ids = set()  # exactly max_tokens on random weights
    return model, tok


def run(model, tok, prompt=PROMPT, n=12, **kw):
    return [r.token for r in stream_generate(model, tok, prompt, max_tokens=n, **kw)]


@pytest.mark.parametrize("opts", [dict(), dict(exit_at_step=1), dict(exit_at_step=0),
                                  dict(ut_steps=2)])
def test_same_tokens_as_plain_path(loaded, opts):
    model, tok = loaded
    assert run(model, tok, compile_step=True, **opts) == run(model, tok, **opts)


def test_same_tokens_on_the_bundled_model():
    model, tok = ouro_mlx.load(demo.model_path())
    prompt = "the cat sat on"
    plain = run(model, tok, prompt, 16, exit_threshold=1.0)  # full depth: a fixed one
    assert run(model, tok, prompt, 16, exit_threshold=1.0, compile_step=True) == plain


def test_logits_match_and_buffers_grow(loaded):
    """A chunk of 8 positions: the buffers grow (and the graph is traced again) three
    times in 20 tokens; logits stay those of the plain path."""
    model, _ = loaded
    plain, comp = model.make_cache(), model.make_cache()
    ids = mx.array([PROMPT])
    model(ids, plain)
    model(ids, comp)
    dec = CompiledDecoder(model, comp, model.ut_steps, chunk=8)
    y = mx.array([[3]])
    for i in range(20):
        want = model(y, plain)[:, -1]
        got = dec(y)
        assert mx.allclose(got, want, atol=1e-5).item(), i
        y = mx.argmax(want, axis=-1)[:, None]
    assert dec.buffers[0][0][0].shape[2] == 32
    dec.sync()
    for pc, cc in zip(plain, comp):
        for a, b in zip(pc.caches, cc.caches):
            assert a.offset == b.offset == len(PROMPT) + 20
            for x, y in zip(a.keys_and_values(), b.keys_and_values()):
                assert mx.allclose(x, y, atol=1e-5).item()


def test_prompt_cache_continues_a_conversation(loaded):
    model, tok = loaded
    cache = model.make_cache()
    first = run(model, tok, PROMPT, 4, prompt_cache=cache, compile_step=True)
    second = run(model, tok, [first[-1], 11, 12], 5, prompt_cache=cache, compile_step=True)
    assert second == run(model, tok, PROMPT + first + [11, 12], 5)


def test_skipped_steps_hold_copies_like_the_plain_path(loaded):
    model, tok = loaded
    plain, comp = model.make_cache(), model.make_cache()
    run(model, tok, PROMPT, 6, prompt_cache=plain, exit_at_step=1)
    run(model, tok, PROMPT, 6, prompt_cache=comp, exit_at_step=1, compile_step=True)
    for pc, cc in zip(plain, comp):
        for a, b in zip(pc.caches, cc.caches):
            assert a.offset == b.offset
            for x, y in zip(a.keys_and_values(), b.keys_and_values()):
                assert mx.allclose(x, y, atol=1e-5).item()


@pytest.mark.parametrize("opts,message", [
    (dict(exit_threshold=0.5), "fixed depth"),
    (dict(kv_mode="last"), "kv_mode 'full'"),
])
def test_refusals_name_the_option(loaded, opts, message):
    model, tok = loaded
    with pytest.raises(ValueError, match=message):
        run(model, tok, compile_step=True, **opts)


def test_quantized_kv_is_refused():
    cache = [CacheList(*(QuantizedKVCache(group_size=32, bits=8) for _ in range(4)))]
    with pytest.raises(ValueError, match="kv_bits"):
        check_compilable(cache, 4)


def test_generate_cli_flag_gives_the_same_text(capsys):
    from ouro_mlx.commands.generate import main

    args = ["-p", "2,23,14,31", "-m", "12", "--exit-threshold", "1.0", "--no-chat-template"]
    main(args)
    plain = capsys.readouterr().out
    main(args + ["--compile-step"])
    assert capsys.readouterr().out == plain and plain.strip()


@pytest.mark.parametrize("flags,message", [(["--kv-mode", "last"], "--kv-mode last"),
                                           (["--no-compile"], "--no-compile")])
def test_generate_cli_refusals(flags, message):
    from ouro_mlx.commands.generate import main

    with pytest.raises(ValueError, match=f"--compile-step cannot be combined with {message}"):
        main(["-p", "hi", "--compile-step", *flags])


def test_per_loop_adapters_and_a_quantized_model(tiny_dir, small_dir):
    """Per-loop LoRA (each step picks its adapter by t) and 4-bit weights."""
    from mlx.utils import tree_flatten

    from ouro_mlx.adapters import apply_adapters
    from ouro_mlx.bench import quantize
    from ouro_mlx.random_model import hf_config

    model, tok = ouro_mlx.load(tiny_dir)
    tok._eos_token_ids = set()
    apply_adapters(model, per_loop=True)
    mx.random.seed(0)
    model.load_weights([(k, 0.05 * mx.random.normal(v.shape)) for k, v in
                        tree_flatten(model.trainable_parameters()) if "lora_b" in k],
                       strict=False)
    assert run(model, tok, compile_step=True) == run(model, tok)
    model, tok = ouro_mlx.load(small_dir)
    tok._eos_token_ids = set()
    model = quantize(model, hf_config("small"), 4)
    assert run(model, tok, compile_step=True) == run(model, tok)


def test_bench_reports_compiled_against_plain_and_peer(tmp_path, capsys):
    import json

    from ouro_mlx.commands import bench as cmd

    out = tmp_path / "bench.json"
    assert cmd.main(["--random", "tiny", "--dtype", "float32", "--prompt-tokens", "6",
                     "--gen-tokens", "8", "--exits", "", "--no-fixed", "--repeats", "2",
                     "--compile-step", "--json-out", str(out)]) == 0
    assert "ouro T=4 compiled" in capsys.readouterr().out
    run = json.loads(out.read_text())["runs"]["float32"]
    assert [r["name"] for r in run["ouro"]][:2] == ["ouro T=4", "ouro T=4 compiled"]
    assert len(run["target_ratio_runs"]["runs_tok_per_s"]["compiled"]) == 2
    for k in ("compiled decode speed-up over full depth", "compiled decode vs unrolled peer"):
        assert run["summary"][k] == run["target_ratio_runs"][k] > 0
    with pytest.raises(ValueError, match="--compile-step cannot be combined"):
        cmd.main(["--random", "tiny", "--compile-step", "--kv-bits", "8"])


def test_logits_processors_and_sampling_see_the_same_logits(loaded):
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    model, tok = loaded
    procs = make_logits_processors(repetition_penalty=1.5)
    assert (run(model, tok, logits_processors=procs, compile_step=True)
            == run(model, tok, logits_processors=procs))
    outs = []
    for compiled in (False, True):
        mx.random.seed(7)
        outs.append(run(model, tok, sampler=make_sampler(temp=1.0), compile_step=compiled))
    assert outs[0] == outs[1]
