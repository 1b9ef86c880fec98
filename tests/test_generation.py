"""The generation engine: dynamic exit that skips compute, KV modes, prompt caches,
batches — checked against a slow reference decoder and against full depth."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache, trim_prompt_cache

import ouro_mlx
from ouro_mlx import ExitRule, batch_generate, generate, stream_generate
from ouro_mlx.generation import make_rule
from tests.conftest import REFERENCE, IdsOnly, needs_reference
from tests.reference_decoder import Reference, reference_greedy

PROMPT = [5, 17, 300, 42, 7, 99, 128]
N = 10


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return ouro_mlx.load(tiny_dir)


@pytest.fixture(scope="module")
def small(small_dir):
    return ouro_mlx.load(small_dir)


def run(model, tok, prompt=PROMPT, n=N, **kw):
    rs = list(stream_generate(model, tok, prompt, max_tokens=n, **kw))
    return [r.token for r in rs], [r.loops for r in rs]


def no_stop(tok):
    tok._eos_token_ids = set()  # generate exactly N tokens on random weights
    return tok


RULES = [
    dict(exit_threshold=0.5),
    dict(exit_threshold=0.8, min_loops=2),
    dict(exit_threshold=0.3, max_loops=3),
    dict(exit_at_step=1),
    dict(exit_at_step=0),
    dict(hidden_eps=0.6),
    dict(hidden_eps=0.4, exit_threshold=0.9, min_loops=2),
]


@pytest.mark.parametrize("mode", ["full", "last"])
@pytest.mark.parametrize("opts", RULES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_fast_path_matches_slow_reference(loaded, opts, mode):
    model, tok = loaded
    tokens, loops = run(model, no_stop(tok), kv_mode=mode, **opts)
    rule = make_rule(model, **opts)
    want_tokens, want_loops = reference_greedy(Reference(model), PROMPT, N, 4, rule, mode)
    assert tokens == want_tokens
    assert loops == want_loops


def test_rules_really_vary_depth(loaded):
    model, tok = loaded
    _, loops = run(model, no_stop(tok), exit_threshold=0.5)
    assert len(set(loops)) > 1


def test_threshold_one_is_exactly_full_depth(loaded):
    model, tok = loaded
    tokens, loops = run(model, no_stop(tok), exit_threshold=1.0)
    assert loops == [4] * N
    cache = model.make_cache()
    logits = model(mx.array([PROMPT]), cache=cache)[:, -1]
    want = []
    for _ in range(N):
        want.append(mx.argmax(logits, -1).item())
        logits = model(mx.array([[want[-1]]]), cache=cache)[:, -1]
    assert tokens == want


@needs_reference
@pytest.mark.parametrize("opts", [dict(), dict(exit_threshold=1.0, kv_mode="last"),
                                  dict(exit_at_step=3), dict(max_loops=4, min_loops=4)])
def test_official_greedy_generation_through_the_engine(opts):
    """Where the semantics coincide with the official code (full depth), the engine
    reproduces its greedy tokens; kv_mode "last" coincides for the first token."""
    ref = dict(np.load(REFERENCE / "expected.npz"))
    model = ouro_mlx.load_model(REFERENCE)
    prompt = ref["input_ids"][0].tolist()
    rs = list(stream_generate(model, IdsOnly(), prompt, max_tokens=8, **opts))
    want = ref["generated_ids"][0, len(prompt):].tolist()
    got = [r.token for r in rs]
    if opts.get("kv_mode") == "last":
        step = ref["generated_step_logits"][0, 0]
        np.testing.assert_allclose(np.array(rs[0].logprobs),
                                   step - np.log(np.exp(step).sum()), atol=1e-4)
        assert got[0] == want[0]
    else:
        assert got == want


def test_compute_is_skipped(loaded):
    model, tok = loaded
    calls = []
    inner = model.model
    original = type(inner).loop_step

    def counting(x, t, *a, **k):
        calls.append(t)
        return original(inner, x, t, *a, **k)

    inner.loop_step = counting
    try:
        run(model, no_stop(tok), n=5, exit_at_step=0)
        decode_calls = calls[4:]  # the prompt ran steps 0..3 once
        assert calls[:4] == [0, 1, 2, 3] and decode_calls == [0] * 4
        calls.clear()
        _, loops = run(model, no_stop(tok), n=5, exit_threshold=0.5)
        assert len(calls) == 4 + sum(loops[1:])
    finally:
        del inner.loop_step


def test_prompt_cache_continues_a_conversation(loaded):
    model, tok = loaded
    tok = no_stop(tok)
    cache = model.make_cache()
    first, _ = run(model, tok, PROMPT, 4, prompt_cache=cache)
    follow = [first[-1], 11, 12]
    second, _ = run(model, tok, follow, 5, prompt_cache=cache)
    whole, _ = run(model, tok, PROMPT + first + [11, 12], 5)
    assert second == whole


@pytest.mark.parametrize("opts", [dict(kv_mode="full"), dict(kv_mode="last"),
                                  dict(kv_mode="full", kv_bits=8),
                                  dict(kv_mode="last", kv_bits=4)])
def test_prompt_cache_save_load_and_trim(small, tmp_path, opts):
    model, tok = small
    tok = no_stop(tok)
    cache = model.make_cache(4, **opts)
    first, _ = run(model, tok, PROMPT, 3, prompt_cache=cache, exit_threshold=0.5)
    file = str(tmp_path / "cache.safetensors")
    save_prompt_cache(file, cache, {"turn": "1"})
    loaded, meta = load_prompt_cache(file, return_metadata=True)
    assert meta == {"turn": "1"}
    follow = [first[-1], 9, 10]
    a, _ = run(model, tok, follow, 4, prompt_cache=cache, exit_threshold=0.5)
    b, _ = run(model, tok, follow, 4, prompt_cache=loaded, exit_threshold=0.5)
    assert a == b
    offset = cache[0][0].offset
    assert trim_prompt_cache(cache, 3) == 3
    assert all(c.offset == offset - 3 for lc in cache for c in lc.caches)


@pytest.mark.parametrize("opts", [dict(), dict(exit_threshold=0.5)])
def test_chunked_prefill_equals_one_piece(loaded, opts):
    model, tok = loaded
    tok = no_stop(tok)
    assert run(model, tok, PROMPT * 3, 6, prefill_step_size=4, **opts) == \
        run(model, tok, PROMPT * 3, 6, **opts)


def test_trimmed_cache_equals_fresh_prefix(loaded):
    model, tok = loaded
    tok = no_stop(tok)
    cache = model.make_cache()
    model(mx.array([PROMPT + [1, 2, 3]]), cache=cache)
    trim_prompt_cache(cache, 3)
    a, _ = run(model, tok, [1, 2, 3], 5, prompt_cache=cache)
    b, _ = run(model, tok, PROMPT + [1, 2, 3], 5)
    assert a == b


def test_last_mode_keeps_one_tth_of_the_kv(small):
    model, _ = small
    ids = mx.array([PROMPT * 40])
    full, last = model.make_cache(4, "full"), model.make_cache(4, "last")
    model(ids, cache=full)
    model(ids, cache=last)
    nbytes = lambda c: sum(lc.nbytes for lc in c)  # noqa: E731
    assert nbytes(full) == 4 * nbytes(last) > 0
    # with an empty history the prompt is exact in "last" mode too
    last = model(mx.array([PROMPT]), cache=model.make_cache(4, "last"))
    np.testing.assert_allclose(np.array(last),
                               np.array(model(mx.array([PROMPT]))), atol=1e-5)


@pytest.mark.parametrize("mode", ["full", "last"])
def test_quantized_kv_is_close(small, mode):
    model, _ = small
    ids = mx.array([PROMPT * 3])
    plain = model(ids, cache=model.make_cache(4, mode))
    for bits, atol in [(8, 0.5), (4, 6.0)]:
        q = model(ids, cache=model.make_cache(4, mode, kv_bits=bits))
        assert (plain - q).abs().max().item() < atol
    q8 = model(ids, cache=model.make_cache(4, mode, kv_bits=8))
    assert (q8.argmax(-1) == plain.argmax(-1)).mean().item() >= 0.9


def test_batch_equals_single_rows(loaded):
    model, tok = loaded
    tok = no_stop(tok)
    prompts = [PROMPT, [9, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    for opts in (dict(), dict(exit_threshold=0.5), dict(hidden_eps=0.5, min_loops=2)):
        result = batch_generate(model, tok, prompts, max_tokens=6, **opts)
        for i, p in enumerate(prompts):
            tokens, loops = run(model, tok, p, 6, **opts)
            assert result.tokens[i] == tokens
            assert result.loops[i] == loops


def test_responses_carry_stats(loaded):
    model, tok = loaded
    rs = list(stream_generate(model, no_stop(tok), "Hello", max_tokens=4, exit_threshold=0.5))
    last = rs[-1]
    assert last.finish_reason == "length" and last.generation_tokens == 4
    assert last.avg_loops == pytest.approx(sum(r.loops for r in rs) / 4)
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0
    assert isinstance(generate(model, tok, "Hello", max_tokens=3), str)


@pytest.mark.parametrize("opts,message", [
    (dict(ut_steps=0), "ut_steps"),
    (dict(ut_steps=-2), "ut_steps"),
    (dict(exit_threshold=1.2), "exit_threshold"),
    (dict(exit_threshold=-0.1), "exit_threshold"),
    (dict(kv_mode="middle"), "kv_mode"),
    (dict(min_loops=5), "min_loops"),
    (dict(max_loops=0), "max_loops"),
    (dict(exit_at_step=4), "exit_at_step"),
    (dict(kv_bits=3), "kv_bits"),
    (dict(max_tokens=0), "max_tokens"),
])
def test_bad_options(loaded, opts, message):
    model, tok = loaded
    with pytest.raises(ValueError, match=message):
        list(stream_generate(model, tok, "Hello", **{"max_tokens": 2, **opts}))


def test_bad_prompts(loaded):
    model, tok = loaded
    with pytest.raises(ValueError, match="empty"):
        generate(model, tok, "")
    with pytest.raises(ValueError, match="positions"):
        generate(model, tok, [1] * (model.args.max_position_embeddings + 1))


@pytest.mark.parametrize("opts", [dict(ut_steps=4), dict(exit_threshold=0.5)])
def test_batch_shared_cache_equals_single_rows(loaded, opts):
    model, tok = loaded
    prompts = [PROMPT, PROMPT[:3], [9, 8, 7, 6, 5]]
    out = batch_generate(model, no_stop(tok), prompts, max_tokens=5, kv_mode="last", **opts)
    for p, tokens in zip(prompts, out.tokens):
        assert tokens == run(model, no_stop(tok), p, 5, kv_mode="last", **opts)[0]


def test_stopping_at_the_context_limit_says_so(loaded):
    """Asked for 100 tokens with room for 3: the last response says the positions ran
    out, and the summary line says so in words."""
    from ouro_mlx.commands.chat import finish_note

    model, tok = loaded
    limit = model.args.max_position_embeddings
    with pytest.raises(ValueError, match="no room"):  # a prompt that fills every position
        generate(model, tok, [1] * limit)
    rs = list(stream_generate(model, no_stop(tok), [1] * (limit - 3), max_tokens=100,
                              exit_at_step=0))
    last = rs[-1]
    assert len(rs) == 3 and last.finish_reason == "length" and last.context_full
    assert not any(r.context_full for r in rs[:-1])
    assert "context limit" in finish_note(last, 100) and "3 of 100" in finish_note(last, 100)
    last = list(stream_generate(model, no_stop(tok), "Hello", max_tokens=2))[-1]
    assert last.finish_reason == "length" and not last.context_full
    assert finish_note(last, 2) == "finished: --max-tokens 2 reached"


def test_exit_rule_vectorised_matches_incremental():
    rule = ExitRule(4, threshold=0.6, hidden_eps=0.3, min_loops=2)
    hidden = [mx.random.normal((2, 5, 8), key=mx.random.key(i)) for i in range(4)]
    gates = [mx.random.normal((2, 5), key=mx.random.key(10 + i)) for i in range(4)]
    from ouro_mlx.exit import exit_steps
    steps = exit_steps(rule, hidden, gates)
    assert steps.shape == (2, 5) and int(steps.min()) >= 1
