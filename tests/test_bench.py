"""`ouro-mlx bench` end to end on a tiny random model (speed figures are not asserted:
they belong to benchmarks, not tests), and its peer being a faithful unrolled stack."""

from __future__ import annotations

import json
import re

import mlx.core as mx
import numpy as np
import pytest

from ouro_mlx import bench as B
from ouro_mlx.commands import bench as cmd
from ouro_mlx.random_model import hf_config


def test_bench_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cmd.main(["--random", "tiny", "--dtype", "float32", "--quant", "none",
                     "--prompt-tokens", "6", "--gen-tokens", "4", "--exits", "q0.5,h0.5",
                     "--context", "16", "--json-out", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "mlx-lm llama, unrolled" in text and "ouro 1 loop" in text
    assert "use --gen-tokens 8 or more for decode figures" in captured.err  # 3 decoded
    assert list(tmp_path.iterdir()) == [out]  # written via a temporary file, renamed
    data = json.loads(out.read_text())
    run = data["runs"]["float32"]
    names = [r["name"] for r in run["ouro"]]
    assert names == ["ouro T=4", "ouro 1 loop", "ouro 2 loops",
                     "ouro 3 loops", "ouro adaptive q0.5", "ouro adaptive h0.5",
                     "ouro T=4 kv last"]
    assert run["ouro"][1]["avg_loops"] == 1.0
    assert run["summary"]["kv last / full bytes"] == 0.25
    assert run["fused"]  # decoded as generate does: q/k/v and gate/up fused
    assert {"decode vs unrolled peer",
            "1 loop speed-up over full depth"} <= set(run["summary"])
    # adaptive runs are timed against a replay of their own tokens and depths
    over = run["adaptive_overhead"]["q0.5"]
    assert over["ratio"] > 0 and 1 <= over["avg_loops"] <= 4 and over["repeats"] == 3
    # the targets' ratios: medians of alternating runs
    med = run["target_ratio_runs"]
    assert med["repeats"] == 3
    assert {k: len(v) for k, v in med["runs_tok_per_s"].items()} == {"peer": 3, "full": 3,
                                                                     "exit1": 3}
    for k in ("prefill vs unrolled peer", "decode vs unrolled peer",
              "1 loop speed-up over full depth"):
        assert run["summary"][k] == med[k] > 0


def test_quality_table(capsys):
    assert cmd.main(["--random", "small", "--dtype", "float32", "--quality",
                     "--prompt-tokens", "8"]) == 0
    assert "8-bit KL per loop step" in capsys.readouterr().out


def test_quality_as_documented_runs_on_the_bundled_model(capsys):
    """`ouro-mlx bench --quality` with no --model or --random: the bundled model, the
    same figures as naming it, and a line saying what the numbers are."""
    from ouro_mlx.demo import model_path

    assert cmd.main(["--quality"]) == 0
    captured = capsys.readouterr()
    assert "bundled demo model" in captured.err
    assert cmd.main(["--quality", "--model", str(model_path())]) == 0
    assert capsys.readouterr().out == captured.out
    lines = captured.out.splitlines()
    assert any(line.startswith(" 8-bit KL per loop step vs bfloat16: t1: ") for line in lines)
    assert any(line.startswith(" 4-bit KL per loop step vs bfloat16: t1: ") for line in lines)
    assert "KL divergence of the quantized model's next-token" in captured.out


def test_help_speaks_the_users_terms():
    text = cmd.build_parser().format_help()
    assert "../shared" not in text and "fixtures" not in text
    assert "ouro-mlx bench --quality" in text and "bundled demo model" in text


def test_rows_say_what_their_figures_mean(tmp_path, capsys):
    """No bare 'acc 0.00' or 'ticks/tok': draft rows give the share of drafts kept
    or say none were drafted, pipeline rows the passes per token or that they ran
    plainly, and a legend under the table explains the columns and suffixes."""
    out = tmp_path / "bench.json"
    assert cmd.main(["--random", "tiny", "--dtype", "float32", "--prompt-tokens", "6",
                     "--gen-tokens", "8", "--exits", "", "--no-fixed", "--repeats", "0",
                     "--draft-loops", "1", "--pipeline", "--json-out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "acc 0" not in text and "ticks/tok" not in text
    names = [r["name"] for r in json.loads(out.read_text())["runs"]["float32"]["ouro"]]
    assert any(re.fullmatch(r"ouro draft 1 loop, (\d+% kept|no drafts)", n) for n in names)
    assert any(re.fullmatch(r"ouro T=4 pipeline k=1, (\d+\.\d\d passes/tok(, \d+ plain)?"
                            r"|all plain)", n) for n in names)
    legend = " ".join(text[text.index("decode tok/s: tokens after the first"):].split())
    for words in ("vs peer: decode speed over the peer", "'N% kept': drafts accepted",
                  "'no drafts'", "'passes/tok'", "random weights: early loop steps"):
        assert words in legend, words
    assert all(len(line) <= 88 for line in text.splitlines()[-12:])


def test_peer_is_the_unrolled_loop():
    """Without the sandwich norms and the per-step final norm the two would
    coincide; check instead that the peer really runs L×T layers on Ouro's weights."""
    model = B.random_model(hf_config("tiny"), "float32")
    peer = B.unrolled_peer(model, 4)
    assert len(peer.model.layers) == 8
    assert peer.model.layers[0].self_attn.q_proj is model.layers[0].self_attn.q_proj
    assert peer.model.layers[2] is peer.model.layers[0]
    logits = peer(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, 512) and np.isfinite(np.array(logits)).all()


@pytest.mark.parametrize("args,message", [
    (["--random", "custom", "--hidden", "0"], "--hidden must be >= 1, got 0."),
    (["--random", "custom", "--heads", "3"], "--hidden must be a multiple of --heads"),
    (["--random", "custom", "--hidden", "1000000", "--layers", "1000"], "needs about"),
    (["--random", "tiny", "--context", "1000000000"], "tokens of KV cache needs about"),
    (["--random", "tiny", "--context", "-1"], "--context must be >= 0"),
    (["--random", "tiny", "--ut-steps", "1000000"], "--ut-steps: 1000000 loop steps"),
    (["--random", "tiny", "--kv-bits", "4"], "--kv-bits is unavailable for this model"),
])
def test_absurd_sizes_fail_before_allocating(args, message, monkeypatch):
    import ouro_mlx.bench

    def no(*a, **k):
        raise AssertionError("allocated a model before checking its size")

    monkeypatch.setattr(ouro_mlx.bench, "random_model", no)
    with pytest.raises(ValueError, match=re.escape(message)):
        cmd.main(args)


def test_speeds_are_plain_numbers():
    row = dict(name="ouro T=4", prompt_tps=12345.6, decode_tps=2880.4, avg_loops=4.0,
               peak_gb=0.1, kv_bytes=2**20)
    line = cmd.table([row], None).splitlines()[-1]
    assert "12,346" in line and "2,880" in line and "e+" not in line


def test_bad_config_is_one_line_naming_the_field(tiny_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "hidden_size": "x"}))
    with pytest.raises(ValueError, match="config.json: hidden_size must be a positive integer"):
        cmd.main(["--model", str(bad)])


def _linear_bytes(out: int, inp: int, size: int, bits: int | None) -> float:
    """A bias-free linear layer's bytes: plain, or packed with a float scale and bias
    per group of 64 inputs."""
    if bits is None:
        return out * inp * size
    return out * inp * bits / 8 + out * (inp // 64) * 2 * size


@pytest.mark.parametrize("bits", [None, 4])
def test_decode_bytes_by_hand(bits):
    """Bytes one decoded token reads, against the tiny shape's dims: per loop step the
    two layers (4 projections, 3 MLP matrices, 4 norms), the final norm, the exit gate
    (never quantized) and each layer's K/V; once lm_head and one embedding row."""
    config = hf_config("tiny")
    model = B.random_model(config, "float32")
    if bits:
        model = B.quantize(model, config, bits)
    H, I, V, L = 64, 128, 512, 2
    q, kv = 4 * 16, 2 * 16  # heads x head_dim, kv heads x head_dim
    lin = lambda o, i: _linear_bytes(o, i, 4, bits)  # noqa: E731
    layer = lin(q, H) + 2 * lin(kv, H) + lin(H, q) + 2 * lin(I, H) + lin(H, I) + 4 * H * 4
    step = L * layer + H * 4 + (H + 1) * 4
    kv_per_position = L * 2 * kv * 4
    once = lin(V, H) + lin(V, H) / V  # lm_head, and one row of the embedding
    want = 2.5 * (step + 10 * kv_per_position) + once
    assert B.decode_bytes(model, 2.5, 10) == pytest.approx(want)
    # the unrolled peer: L x T llama blocks (two norms, not four) and their caches,
    # one final norm
    peer = B.unrolled_peer(model, 4)
    assert B.peer_decode_bytes(peer, 10) == pytest.approx(
        4 * L * (layer - 2 * H * 4 + 10 * 2 * kv * 4) + H * 4 + once)


def test_kv_position_bytes_match_the_caches():
    """What a token adds to a layer's cache, plain and quantized (small: head_dim 64)."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    args = B.Model(B.ModelArgs.from_dict(hf_config("small"))).args
    for cache, bits in ((KVCache(), None), (QuantizedKVCache(group_size=64, bits=4), 4),
                        (QuantizedKVCache(group_size=64, bits=8), 8)):
        k = mx.zeros((1, args.num_key_value_heads, 256, args.head_dim), mx.bfloat16)
        cache.update_and_fetch(k, k)  # 256 tokens: exactly one chunk of the buffer
        assert cache.nbytes == 256 * B.kv_position_bytes(args, mx.bfloat16, bits)


def test_bandwidth_column(tmp_path, capsys, monkeypatch):
    """Each plain decode row's share of the bandwidth bound: its bytes per token x
    tok/s over the GEMV bandwidth printed above the table and written to the JSON."""
    real = B.gemv_bandwidth
    monkeypatch.setattr(B, "gemv_bandwidth", lambda trials: real(2**22, trials=trials))
    out = tmp_path / "bench.json"
    assert cmd.main(["--random", "tiny", "--dtype", "float32", "--prompt-tokens", "6",
                     "--gen-tokens", "4", "--exits", "", "--no-fixed", "--repeats", "1",
                     "--draft-loops", "1", "--json-out", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    bw = data["gemv_bandwidth"]
    assert bw["gb_per_s"] > 0 and bw["matrix_mb"] == 4.2
    assert f"GEMV bandwidth: {bw['gb_per_s']:,.1f} GB/s" in text
    header = next(line for line in text.splitlines() if line.startswith("run "))
    assert header.split()[7] == "bw%"
    run = data["runs"]["float32"]
    model = B.random_model(hf_config("tiny"), "float32")
    full, draft = run["ouro"][0], run["ouro"][1]
    assert full["bytes_per_token"] == B.decode_bytes(model, 4, B.decode_positions(6, 4))
    for r in [run["peer"], full]:
        assert r["bw_share"] == pytest.approx(
            r["bytes_per_token"] * r["decode_tps"] / (bw["gb_per_s"] * 1e9), abs=1e-4)
        line = next(line for line in text.splitlines() if line.startswith(r["name"]))
        assert line.split()[-4] == f"{100 * r['bw_share']:.1f}"
    assert draft["bw_share"] is None  # drafts read the weights once for several tokens
    assert "bw%: share of the memory-bandwidth bound" in " ".join(text.split())
    assert 0 < run["summary"]["full-depth decode, share of the memory-bandwidth bound"]


def test_replay_feeds_the_recorded_tokens():
    """The fixed-depth replay decodes each recorded token as the next input, not its
    own argmax: a recorded token that differs from what the replay computes (a
    backend that is not bitwise repeatable) changes what follows, never the work."""
    from ouro_mlx.exit import ExitRule

    model = B.random_model(hf_config("tiny"), "float32")
    prompt, kw = mx.array([5, 9, 2, 7]), dict(kv_mode="full", kv_bits=None, context=0)
    _, (tokens, loops) = B._decode_seconds(model, ExitRule(4), prompt, 6, **kw)
    fed = list(tokens)
    fed[2] = (fed[2] + 1) % 512
    _, (got, got_loops) = B._decode_seconds(model, ExitRule(4), prompt, 6,
                                            replay=(fed, loops), **kw)
    assert got[:3] == tokens[:3] and got_loops == loops  # its own argmax at token 2
    after_fed = mx.argmax(model(mx.array([prompt.tolist() + fed[:3]]))[0, -1]).item()
    assert got[3] == after_fed != tokens[3]  # token 3 followed the fed token 2


def test_unrepeatable_runs_are_said_not_raised(tmp_path, capsys, monkeypatch):
    """Adaptive runs that differ from repeat to repeat, and a replay whose own argmax
    differs from the tokens it is fed (as on CUDA): the bench finishes, counts both
    and says so under the table and in the JSON."""
    real_sample, real_step = B.sample_with, B.generate_step
    monkeypatch.setattr(B, "sample_with", lambda logits, *a: (
        (real_sample(logits, *a)[0] + 1) % 512, None))  # the replay's argmax, moved
    calls = []

    def drifting(*a, **k):  # every run a different token 2
        calls.append(1)
        shift = 7 * len(calls)
        for i, (tok, lp, n) in enumerate(real_step(*a, **k)):
            yield ((tok + shift) % 512 if i == 2 else tok), lp, n

    monkeypatch.setattr(B, "generate_step", drifting)
    out = tmp_path / "bench.json"
    assert cmd.main(["--random", "tiny", "--dtype", "float32", "--prompt-tokens", "6",
                     "--gen-tokens", "4", "--exits", "q0.5", "--no-fixed", "--no-peer",
                     "--repeats", "2", "--json-out", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    over = json.loads(out.read_text())["runs"]["float32"]["adaptive_overhead"]["q0.5"]
    assert over["adaptive_runs_differing"] == 1 and over["tokens"] == 4
    assert over["replay_tokens_differing"] >= 3 and over["ratio"] > 0
    assert (f"ouro adaptive q0.5: 1 of 2 adaptive runs chose other tokens or depths than "
            f"the first; replay: {over['replay_tokens_differing']} of 4 tokens differ from "
            "the adaptive run (backend not bitwise repeatable); timing fed the first "
            "adaptive run's tokens at its depths") in text
    assert over["note"] in text


def test_gpu_suite_runs_at_tiny_sizes(tmp_path):
    """examples/gpu_suite.sh (written for a GPU machine) with a tiny model and a few
    tokens: every step runs and the summary has a figure for every target."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "SUITE_PYTHON": sys.executable,
           "SUITE_MODEL": "tiny", "SUITE_PROMPT": "8", "SUITE_TOKENS": "4",
           "SUITE_REPEATS": "1", "SUITE_ROUNDS": "1", "SUITE_PIPE_LAYERS": "2",
           "SUITE_PIPE_HIDDEN": "", "SUITE_OUT": str(tmp_path)}
    out = subprocess.run(["bash", str(repo / "examples" / "gpu_suite.sh")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = out.stdout[out.stdout.index("######## summary"):]
    targets = [line for line in summary.splitlines() if line.startswith("(")]
    assert len(targets) == 7 and not any("no figure" in t for t in targets), summary
    assert all(t.rstrip().endswith((" met", " NOT met")) for t in targets)  # a verdict each
    assert {p.name for p in tmp_path.iterdir()} == {"bf16.json", "quant.json",
                                                    "pipeline.json", "profile.json"}
    profile = [line for line in summary.splitlines() if line.strip().startswith("profile:")]
    assert [line.split(":")[1].strip() for line in profile] == [
        "ouro plain", "ouro compiled", "mlx-lm llama, unrolled"]


def test_bench_without_fusing_keeps_the_stored_layout(tmp_path, capsys):
    """--no-fuse times the projections as stored; both quantizations start from the
    stored layout either way (the fused model is unfused after its rows)."""
    out = tmp_path / "bench.json"
    assert cmd.main(["--random", "small", "--dtype", "float32", "--quant", "none,4",
                     "--prompt-tokens", "6", "--gen-tokens", "4", "--exits", "",
                     "--no-fixed", "--repeats", "0", "--json-out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["fused"] for r in runs.values()] == [True, True]
    assert cmd.main(["--random", "small", "--dtype", "float32", "--quant", "none",
                     "--prompt-tokens", "6", "--gen-tokens", "4", "--exits", "",
                     "--no-fixed", "--repeats", "0", "--no-fuse", "--json-out",
                     str(out)]) == 0
    assert not json.loads(out.read_text())["runs"]["float32"]["fused"]
