"""The embeddable chat session (ouro_mlx.session): streaming events, cancel from
another thread, the busy guard, the prompt cache across turns, loading options and
the example script."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import ouro_mlx
from ouro_mlx.demo import model_path as demo_model_path
from ouro_mlx.encoding import encode_chat
from ouro_mlx.session import DecodingClash, SessionBusy, TokenEvent
from tests.test_cli import ENV

REPO = Path(__file__).resolve().parents[1]
EVERY_STEP = {"exit_threshold": 1.0}  # decoded tokens run every step, as prefill does


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    model, tok = ouro_mlx.load(tiny_dir)
    tok._eos_token_ids = set()  # a random model: answers run to max_tokens
    return model, tok


def session(loaded, max_tokens=6, **kw):
    model, tok = loaded
    return ouro_mlx.ChatSession(model, tok, sampling=dict(max_tokens=max_tokens), **kw)


def check_cache(s: ouro_mlx.ChatSession) -> None:
    """Every per-step cache holds exactly the tokens ``cached`` names."""
    offsets = {c.offset for lc in s.cache for c in lc.caches}
    assert offsets == {len(s.cached)}


def test_public_names():
    assert ouro_mlx.ChatSession is ouro_mlx.session.ChatSession
    assert ouro_mlx.TokenEvent is TokenEvent
    from ouro_mlx.commands.chat import ChatSession

    assert ChatSession is ouro_mlx.ChatSession  # the CLI is a face over the same class


def test_iterator_and_callback_get_every_token(loaded):
    s = session(loaded)
    seen: list[TokenEvent] = []
    events = list(s.send("hello", on_token=seen.append))
    assert events == seen and len(events) == 6 == s.stats.generation_tokens
    assert all(isinstance(e, TokenEvent) and e.loops >= 1 for e in events)
    assert [e.finish_reason for e in events] == [None] * 5 + ["length"]
    assert s.stats.finish_reason == "length" and s.stats.cut
    assert sum(s.stats.loops.values()) == 6
    assert s.stats.avg_loops == pytest.approx(sum(e.loops for e in events) / 6)
    answer = s.tokenizer.decode([e.token for e in events])
    assert s.messages == [{"role": "user", "content": "hello"},
                          {"role": "assistant", "content": answer}]
    check_cache(s)


def test_a_new_turn_processes_only_its_new_tokens(loaded):
    s = session(loaded)
    list(s.send("first message, a fairly long one"))
    list(s.send("second"))
    history = encode_chat(s.tokenizer, s.messages[:-1], add_generation_prompt=True)
    assert s.stats.prompt_tokens < len(history) // 2
    assert s.cached[: len(history) - s.stats.prompt_tokens] == \
        history[: len(history) - s.stats.prompt_tokens]
    check_cache(s)


def test_cancel_from_another_thread_keeps_the_partial_answer(loaded):
    s = session(loaded, max_tokens=200, loop=EVERY_STEP)
    list(s.send("first turn"))
    third = threading.Event()
    cancelled = threading.Event()

    def on_token(event):
        if len(got) == 2:  # the third token: let the other thread cancel, then go on
            third.set()
            assert cancelled.wait(30)

    def canceller():
        assert third.wait(30)
        s.cancel()
        cancelled.set()

    t = threading.Thread(target=canceller)
    t.start()
    got = []
    for event in s.send("second turn", on_token=on_token):
        got.append(event)
    t.join()
    # stopped at the token after the cancel, which says so
    assert len(got) == 4 and got[-1].finish_reason == "cancelled"
    assert s.stats.finish_reason == "cancelled" and not s.busy
    partial = s.tokenizer.decode([e.token for e in got])
    assert s.messages[-2:] == [{"role": "user", "content": "second turn"},
                               {"role": "assistant", "content": partial}]
    check_cache(s)
    # the next turn works, and answers as a fresh session given the same history does
    s.sampling["max_tokens"] = 8
    answer = [e.token for e in s.send("third turn")]
    assert s.stats.finish_reason == "length" and len(answer) == 8
    fresh = session(loaded, max_tokens=8, loop=EVERY_STEP)
    fresh.messages = s.messages[:-2]
    assert [e.token for e in fresh.send("third turn")] == answer
    assert fresh.stats.prompt_tokens > s.stats.prompt_tokens  # it had no cache


def test_cancel_a_send_running_on_a_worker_thread(loaded):
    s = session(loaded, max_tokens=100)
    started, release = threading.Event(), threading.Event()
    got: list[TokenEvent] = []

    def on_token(event):
        if not started.is_set():
            started.set()
            assert release.wait(30)

    worker = threading.Thread(target=lambda: got.extend(s.send("go", on_token=on_token)))
    worker.start()
    assert started.wait(30)
    assert s.busy
    s.cancel()
    release.set()
    worker.join(30)
    assert not worker.is_alive()
    assert len(got) == 2 and got[-1].finish_reason == "cancelled"
    assert s.messages[-1]["role"] == "assistant"
    s.cancel()  # nothing runs: no effect on the next answer
    assert len(list(s.send("again"))) == 100


def test_a_second_send_while_one_runs_is_refused(loaded):
    s = session(loaded)
    first = s.send("one")
    next(first)  # running, holding the session
    with pytest.raises(SessionBusy, match="another send"):
        next(s.send("two"))
    for call in (s.reset, lambda: s.set_loops(2)):
        with pytest.raises(SessionBusy, match="cancel"):
            call()
    errors = []

    def other_thread():
        try:
            next(s.send("three"))
        except SessionBusy as e:
            errors.append(e)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert len(errors) == 1
    rest = list(first)
    assert rest[-1].finish_reason == "length"
    assert [m["content"] for m in s.messages if m["role"] == "user"] == ["one"]
    check_cache(s)
    list(s.send("two"))  # free again
    s.reset()
    assert s.messages == [] and s.cached == []


def test_closing_the_iterator_early_keeps_a_consistent_session(loaded):
    s = session(loaded, max_tokens=50)
    stream = s.send("hi")
    got = [next(stream), next(stream)]
    stream.close()
    assert not s.busy and s.stats.finish_reason == "cancelled"
    assert s.messages[-1] == {"role": "assistant",
                              "content": s.tokenizer.decode([e.token for e in got])}
    check_cache(s)
    assert len(list(s.send("more"))) == 50


def test_settings_per_session(loaded):
    s = session(loaded, loop={"exit_at_step": 1})
    assert {e.loops for e in s.send("hi")} == {2}
    s.loop.pop("exit_at_step")
    s.set_loops(3)
    s.set_threshold(1.0)
    assert {e.loops for e in s.send("hi")} == {3}
    with pytest.raises(ValueError, match="threshold"):
        s.set_threshold(1.5)
    last = session(loaded, kv_mode="last")
    assert len(last.cache[0].caches) == 1 and len(list(last.send("hi"))) == 6
    system = session(loaded, system_prompt="be brief")
    list(system.send("hi"))
    assert system.messages[0] == {"role": "system", "content": "be brief"}
    system.reset()
    assert system.messages == [{"role": "system", "content": "be brief"}]


@pytest.mark.parametrize("kw, match", [
    ({"kv_mode": "half"}, "kv_mode"),
    ({"kv_bits": 3}, "kv_bits must be 4 or 8"),
    ({"loop": {"ut_step": 2}}, "loop: unknown option 'ut_step'"),
    ({"sampling": {"temp": 0.5}}, "sampling: unknown option 'temp'"),
    ({"sampling": {"max_tokens": 0}}, "max_tokens must be >= 1"),
    ({"loop": {"ut_steps": 10**6}}, "above the limit"),
])
def test_bad_options_are_one_line_errors(loaded, kw, match):
    model, tok = loaded
    with pytest.raises(ValueError, match=match) as e:
        ouro_mlx.ChatSession(model, tok, **kw)
    assert "\n" not in str(e.value)


def test_stop_string_and_too_long_message(loaded):
    s = session(loaded, max_tokens=12)
    text = "".join(e.text for e in s.send("hello"))
    stop = next(c for i, c in enumerate(text) if i > 0 and text.find(c) == i)
    stopped = session(loaded, max_tokens=12, stop=[stop])
    events = list(stopped.send("hello"))
    assert events[-1].finish_reason == "stop_string"
    assert "".join(e.text for e in events) == text[: text.find(stop)]
    before = list(stopped.messages)
    with pytest.raises(ValueError, match="positions"):
        list(stopped.send("x" * 3000))
    assert stopped.messages == before and not stopped.busy


def test_thinking_opened_by_the_prompt(loaded):
    s = session(loaded)
    start, end = s.think_ids
    assert s._thinking_at([1, 2, start, 5]) and not s._thinking_at([start, 5, end, 6])
    assert not s._thinking_at([1, 2])


def test_load_default_adapters_and_exit_gate(tiny_dir, tmp_path):
    demo = ouro_mlx.ChatSession.load(sampling={"max_tokens": 8})
    assert "".join(e.text for e in demo.send("2,23,14,31")).startswith("=")

    from ouro_mlx.adapters import adapter_config, apply_adapters, save_adapters
    from ouro_mlx.calibrate import save_gate

    model = ouro_mlx.load_model(tiny_dir)
    apply_adapters(model, num_layers=1)
    save_adapters(tmp_path / "adapters", model, adapter_config({"num_layers": 1}))
    save_gate(tmp_path / "gate.safetensors", model, threshold=0.25)
    s = ouro_mlx.ChatSession.load(tiny_dir, adapter_path=tmp_path / "adapters",
                                  exit_gate=tmp_path / "gate.safetensors",
                                  sampling={"max_tokens": 3})
    assert hasattr(s.model.layers[-1].self_attn.q_proj, "lora_a")
    assert s.model.exit_threshold == 0.25
    assert len(list(s.send("hi"))) >= 1
    kept = ouro_mlx.ChatSession.load(tiny_dir, exit_gate=tmp_path / "gate.safetensors",
                                     loop={"exit_threshold": 0.9})
    assert kept.model.exit_threshold != 0.25 and kept.loop["exit_threshold"] == 0.9
    with pytest.raises(ValueError, match="gate"):
        ouro_mlx.ChatSession.load(tiny_dir, exit_gate=tmp_path / "adapters")


def test_example_script_runs():
    out = subprocess.run([sys.executable, str(REPO / "examples" / "embed_session.py")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "=133" in out.stdout and "avg loops" in out.stdout and "cancelled" in out.stdout


WORKER_THEN_EXIT = """
import sys, threading, ouro_mlx
model, tok = ouro_mlx.load(sys.argv[1])
s = ouro_mlx.ChatSession(model, tok, sampling={"max_tokens": 4})
t = threading.Thread(target=lambda: list(s.send("hi")))
t.start()
t.join()
print("joined")
"""


def test_exit_right_after_a_worker_thread_is_clean(tiny_dir):
    """A GUI quits right after its worker thread ends: without the session's exit
    guard MLX 0.32 aborted about 3 runs in 5 ("terminate called without an active
    exception")."""
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", WORKER_THEN_EXIT, str(tiny_dir)],
                             env=ENV, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "joined" in out.stdout, out.stderr[-500:]


def test_quantized_kv_cache_across_turns(small_dir, loaded):
    model, tok = ouro_mlx.load(small_dir)
    tok._eos_token_ids = set()
    s = ouro_mlx.ChatSession(model, tok, kv_bits=8, kv_group_size=64,
                             sampling={"max_tokens": 4})
    list(s.send("one"))
    list(s.send("two"))
    assert s.stats.generation_tokens == 4 and s.stats.kv_bytes > 0
    history = encode_chat(tok, s.messages[:-1], add_generation_prompt=True)
    assert s.stats.prompt_tokens < len(history)
    check_cache(s)
    with pytest.raises(ValueError, match=r"kv_bits is unavailable .*head_dim \(16\)"):
        session(loaded, kv_bits=4)
    with pytest.raises(ValueError, match="kv_group_size 128 does not fit"):
        ouro_mlx.ChatSession(model, tok, kv_bits=4, kv_group_size=128)


@pytest.fixture(scope="module")
def bundled():
    return ouro_mlx.load(demo_model_path())


def _turns(bundled, **kw):
    """Three turns on the bundled model (its answers end on eos after ~5 tokens and
    its drafts are mostly accepted): two in one conversation, then a new one that
    reuses the template's first tokens, cut by max_tokens. Per turn: the events'
    tokens and finish, the messages, the cached tokens and the caches' K/V."""
    model, tok = bundled
    s = ouro_mlx.ChatSession(model, tok, loop=EVERY_STEP, sampling={"max_tokens": 12}, **kw)
    out = []
    for text, max_tokens in (("2,23,14,31", 12), ("7,1,30,12", 12), ("11,5,9,27", 3)):
        if len(out) == 2:
            s.forget()
        s.sampling["max_tokens"] = max_tokens
        events = list(s.send(text))
        check_cache(s)
        kv = [np.array(a[:, :, : c.offset]) for lc in s.cache for c in lc.caches
              for a in (c.keys, c.values)]
        out.append(([(e.token, e.finish_reason) for e in events], list(s.messages),
                    list(s.cached), kv))
    return out


@pytest.mark.parametrize("decoding", [{"draft_loops": 2, "num_draft_tokens": 4},
                                      {"draft_loops": 1}, {"compile_step": True},
                                      {"pipeline": True},
                                      {"pipeline": True, "draft_loops": 2, "compile_step": True}])
def test_fast_decoding_keeps_answers_and_cache(bundled, decoding):
    """Speculation may leave accepted drafts past an eos in the cache, and a compiled
    step hands its K/V back only when closed: after every turn the session's cache
    must still hold exactly the tokens it records, as plain decoding leaves it."""
    want = _turns(bundled)
    got = _turns(bundled, decoding=decoding)
    finishes = [events[-1][1] for events, *_ in want]
    assert finishes == ["stop", "stop", "length"] and len(want[0][0]) < 12
    for (events, messages, cached, kv), (w_events, w_messages, w_cached, w_kv) in zip(got, want):
        assert events == w_events and messages == w_messages
        if decoding.get("pipeline"):
            # the pipeline hands back the K/V of the tokens whose successor it handed
            # out: a turn that ends on eos leaves that eos out (plain decoding queued
            # it), and the next turn feeds it again
            assert cached == w_cached[:len(cached)] and len(w_cached) - len(cached) <= 1
        else:
            assert cached == w_cached
        for a, b in zip(kv, w_kv):
            n = len(cached)
            np.testing.assert_allclose(a[:, :, :n], b[:, :, :n], atol=1e-4)


def test_fast_decoding_closed_early_keeps_the_cache(bundled):
    model, tok = bundled
    for decoding in ({"draft_loops": 2}, {"compile_step": True}, {"pipeline": True}):
        s = ouro_mlx.ChatSession(model, tok, loop=EVERY_STEP, sampling={"max_tokens": 12},
                                 decoding=decoding)
        stream = s.send("2,23,14,31")
        got = [next(stream), next(stream)]
        stream.close()
        assert s.stats.finish_reason == "cancelled"
        check_cache(s)
        tokens = [e.token for e in got]
        # decoding queued the token after each one handed out, so both are cached; in
        # the pipeline (adaptive: after its first plain stretch) the last may still
        # have been in flight, and is left to the next turn
        assert s.cached[-2:] == tokens or (decoding.get("pipeline")
                                           and s.cached[-1:] == tokens[:1])


@pytest.mark.parametrize("kw, match", [
    ({"decoding": {"draft_loop": 2}}, "decoding: unknown option 'draft_loop'"),
    ({"decoding": {"draft_loops": 2}}, "draft_loops needs a fixed depth"),  # model's 0.6
    ({"decoding": {"compile_step": True}}, "compile_step .* needs a fixed depth"),
    ({"decoding": {"draft_loops": 2}, "kv_mode": "last", "loop": EVERY_STEP},
     "draft_loops needs kv_mode 'full'"),
    ({"decoding": {"compile_step": True}, "kv_mode": "last", "loop": EVERY_STEP},
     "needs kv_mode 'full'"),
    ({"decoding": {"draft_loops": 4}, "loop": EVERY_STEP}, r"draft_loops must be .*\[1, 4\)"),
    ({"decoding": {"draft_loops": 2, "num_draft_tokens": 0}, "loop": EVERY_STEP},
     "num_draft_tokens must be"),
    ({"decoding": {"num_draft_tokens": 3}}, "num_draft_tokens needs draft_loops"),
    ({"decoding": {"compile_step": "yes"}}, "compile_step must be True or False"),
    ({"decoding": {"pipeline": True}}, "pipeline needs a fixed depth"),  # model's 0.6
    ({"decoding": {"pipeline": True}, "kv_mode": "last", "loop": EVERY_STEP},
     "pipeline needs kv_mode 'full'"),
    ({"decoding": {"pipeline": True, "draft_loops": 4}, "loop": EVERY_STEP},
     r"draft_loops must be .*\[1, 4\)"),
    ({"decoding": {"pipeline": True, "draft_loops": 1, "num_draft_tokens": 2},
      "loop": EVERY_STEP}, "num_draft_tokens does not apply to pipeline"),
    ({"decoding": {"pipeline": "yes"}}, "pipeline must be True or False"),
])
def test_bad_decoding_options_are_one_line_errors(bundled, kw, match):
    model, tok = bundled
    with pytest.raises(ValueError, match=match) as e:
        ouro_mlx.ChatSession(model, tok, **kw)
    assert "\n" not in str(e.value)


def test_loop_changes_that_clash_with_decoding_are_refused(bundled):
    model, tok = bundled
    s = ouro_mlx.ChatSession.load(loop=EVERY_STEP, decoding={"draft_loops": 2},
                                  sampling={"max_tokens": 8})
    for change, match in ((lambda: s.set_threshold(0.5), "draft_loops needs a fixed depth"),
                          (lambda: s.set_loops(2), "draft_loops must be")):
        with pytest.raises(ValueError, match=match) as e:
            change()
        assert "\n" not in str(e.value)
    assert s.loop == EVERY_STEP  # unchanged
    s.set_loops(3)
    assert {e.loops for e in s.send("2,23,14,31")} == {3}
    piped = ouro_mlx.ChatSession(model, tok, loop=EVERY_STEP, decoding={"pipeline": True},
                                 sampling={"max_tokens": 8})
    with pytest.raises(DecodingClash, match="pipeline needs a fixed depth") as e:
        piped.set_threshold(0.5)
    assert "\n" not in str(e.value) and piped.loop == EVERY_STEP
    piped.set_loops(3)
    assert {e.loops for e in piped.send("2,23,14,31")} == {3}
    compiled = ouro_mlx.ChatSession(model, tok, loop={"exit_at_step": 2},
                                    decoding={"compile_step": True})
    compiled.set_threshold(0.5)  # exit_at_step still fixes the depth
    assert {e.loops for e in compiled.send("2,23,14,31")} == {3}
