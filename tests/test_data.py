"""Data preparation: formats, packing, masks, bad lines, shards, deterministic and
resumable batches across world sizes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ouro_mlx import load
from ouro_mlx.data import DataError, PackedDataset, Position, batches, prepare


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load(tiny_dir)[1]


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_formats_masks_and_packing(tok, tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first document\n\nsecond one\n")
    jl = write(tmp_path / "b.jsonl", [
        json.dumps({"text": "plain"}),
        json.dumps({"prompt": "Q?", "completion": "A."}),
        json.dumps({"messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "yo"}]}),
    ])
    meta = prepare([txt, jl], tmp_path / "out", tok, seq_len=15, shard_sequences=3)
    assert meta.documents == 5 and meta.skipped == 0
    data = PackedDataset(tmp_path / "out")
    assert len(data) == meta.sequences == sum(meta.shards) and len(meta.shards) > 1
    stream = np.concatenate([data[0][0]] + [data[i][0][1:] for i in range(1, len(data))])
    ids = tok.encode("first document", add_special_tokens=False)
    assert stream[: len(ids) + 1].tolist() == ids + [tok.eos_token_id]
    masks = np.concatenate([data[0][1]] + [data[i][1][1:] for i in range(1, len(data))])
    # chat/completion prompts are masked out, answers and plain text are not
    assert masks[: len(ids)].all() and not masks.all()
    full = tok.apply_chat_template([{"role": "user", "content": "Q?"},
                                    {"role": "assistant", "content": "A."}])
    text_tokens = stream.tolist()
    start = next(i for i in range(len(text_tokens)) if text_tokens[i:i + len(full)] == full)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Q?"}],
                                     add_generation_prompt=True)
    assert not masks[start:start + len(prompt)].any()
    assert masks[start + len(prompt):start + len(full)].all()


def test_unpacked_rows_are_padded_and_long_samples_skipped(tok, tmp_path):
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in [("2+2", "4"), ("3*3", "9"), ("a much longer question " * 8, "x")]]
    jl = write(tmp_path / "c.jsonl", [json.dumps({"messages": m}) for m in chats])
    warnings = []
    meta = prepare([jl], tmp_path / "rows", tok, seq_len=100, pack=False, warn=warnings.append)
    assert meta.documents == 2 and meta.skipped == 1 and not meta.packed
    assert "sample 3 skipped" in warnings[0] and "row of 101" in warnings[0]
    data = PackedDataset(tmp_path / "rows")
    assert len(data) == 2
    for i, chat in enumerate(chats[:2]):
        tokens, mask = data[i]
        full = tok.apply_chat_template(chat)
        prompt = tok.apply_chat_template(chat[:1], add_generation_prompt=True)
        assert tokens[: len(full)].tolist() == full
        assert (tokens[len(full):] == tok.eos_token_id).all()  # padding
        # the answer and the one eos after it count; prompt and padding do not
        assert mask.tolist() == [0] * len(prompt) + [1] * (len(full) - len(prompt) + 1) + [0] * (
            101 - len(full) - 1)


def test_bad_lines_reported_and_skipped(tok, tmp_path):
    jl = write(tmp_path / "bad.jsonl", [json.dumps({"text": "good " * 10}), "{not json",
                                        json.dumps({"other": 1}), json.dumps([1, 2]),
                                        json.dumps({"text": "also good " * 10})])
    seen = []
    meta = prepare([jl], tmp_path / "out", tok, seq_len=8, warn=seen.append)
    assert meta.documents == 2 and meta.skipped == 3
    assert seen[0].startswith(f"{jl}:2: skipped, not valid JSON")
    assert f"{jl}:3:" in seen[1] and f"{jl}:4:" in seen[2]


@pytest.mark.parametrize("content,message", [
    ("", "no usable samples"),
    ("{broken\n", "no usable samples"),
])
def test_empty_or_corrupt_files(tok, tmp_path, content, message):
    f = tmp_path / "x.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=message):
        prepare([f], tmp_path / "out", tok, seq_len=8, warn=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_other_bad_inputs(tok, tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8"):
        prepare([tmp_path / "bin.jsonl"], tmp_path / "o", tok, seq_len=8)
    with pytest.raises(DataError, match="no such file"):
        prepare([tmp_path / "nope.txt"], tmp_path / "o", tok, seq_len=8)
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match="unknown data format"):
        prepare([tmp_path / "a.csv"], tmp_path / "o", tok, seq_len=8)
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(DataError, match="Not enough data"):
        prepare([tmp_path / "short.txt"], tmp_path / "o", tok, seq_len=64)


def test_truncated_shard_is_detected(tok, tmp_path):
    (tmp_path / "a.txt").write_text("some words here " * 20)
    prepare([tmp_path / "a.txt"], tmp_path / "out", tok, seq_len=8)
    shard = tmp_path / "out" / "tokens-00000.bin"
    os.truncate(shard, shard.stat().st_size - 3)
    with pytest.raises(DataError, match="truncated"):
        PackedDataset(tmp_path / "out")


def test_batches_deterministic_resumable_and_split_by_rank(tok, tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"doc {i} " * 5 for i in range(60)))
    prepare([tmp_path / "a.txt"], tmp_path / "out", tok, seq_len=8)
    data = PackedDataset(tmp_path / "out")
    one = batches(data, 4, seed=3)
    seq = [next(one) for _ in range(12)]
    again = batches(data, 4, seed=3)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(seq, [next(again) for _ in range(12)]))
    # resume from a saved position gives the same continuation
    resumed = batches(data, 4, seed=3, position=seq[5][2])
    assert np.array_equal(next(resumed)[0], seq[6][0])
    # two ranks of 2 read together what one process of 4 reads, in the same order
    r0 = batches(data, 2, seed=3, rank=0, world_size=2)
    r1 = batches(data, 2, seed=3, rank=1, world_size=2)
    for i in range(3):
        a, b = next(r0), next(r1)
        assert np.array_equal(np.concatenate([a[0], b[0]]), seq[i][0])
        assert a[2] == b[2] == seq[i][2]
    # an epoch ends when no full batch is left; the next has a new order
    per_epoch = len(data) // 4
    it = batches(data, 4, seed=3)
    first = [next(it) for _ in range(per_epoch)]
    nxt = next(it)
    assert first[-1][2].epoch == 0 and nxt[2] == Position(1, 4)
    assert not np.array_equal(nxt[0], first[0][0])


def test_inputs_are_checked_before_any_is_read(tok, tmp_path):
    good = write(tmp_path / "good.txt", ["some words " * 20])
    (tmp_path / "dir.jsonl").mkdir()
    os.mkfifo(tmp_path / "pipe.txt")  # reading it would block: it must not be read
    for bad, message in [("/dev/zero", "/dev/zero: unknown data format"),
                         (tmp_path / "dir.jsonl", "dir.jsonl: is a directory"),
                         (tmp_path / "pipe.txt", "pipe.txt: not a regular file")]:
        with pytest.raises(DataError, match=message):
            prepare([good, bad], tmp_path / "out", tok, seq_len=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.jsonl", "good.txt", "pipe.txt"]


def test_bad_chat_samples_are_reported_with_their_line_and_skipped(tok, tmp_path):
    answer = {"role": "assistant", "content": "yes"}
    jl = write(tmp_path / "chat.jsonl", [
        json.dumps({"messages": [{"role": "user", "content": "ok?"}, answer]}),
        json.dumps({"messages": [{"content": "no role"}, answer]}),
        json.dumps({"messages": [{"role": "user", "content": 5}, answer]}),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "text"}]}, answer]}),
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
        "[" * 100_000 + "]" * 100_000,
        json.dumps({"messages": [{"role": "user", "content": "fine"}, answer]}),
    ])
    seen = []
    meta = prepare([jl], tmp_path / "out", tok, seq_len=8, warn=seen.append)
    assert meta.documents == 2 and meta.skipped == 5
    assert seen == [f"{jl}:2: skipped, message 1 needs a string role and a string content",
                    f"{jl}:3: skipped, message 1 needs a string role and a string content",
                    f"{jl}:4: skipped, message 1 needs a string role and a string content",
                    f"{jl}:5: skipped, the last message must be the assistant's (the answer "
                    "trained on)",
                    f"{jl}:6: skipped, JSON nested too deeply"]


def test_utf8_errors_name_the_file_and_line(tok, tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"fine text\n\nmore text\nbad \xff byte\n")
    with pytest.raises(DataError, match=rf"{f}:4: not UTF-8 text \(byte 0xff at column 5\)"):
        prepare([f], tmp_path / "out", tok, seq_len=8)


def test_txt_documents_are_read_line_by_line_as_before(tok, tmp_path):
    from ouro_mlx.data import read_samples

    f = tmp_path / "a.txt"
    f.write_text("\n\nfirst doc\nits second line\r\n\n\n\nsecond\n  \nthird")
    docs = [tok.decode(ids) for ids, _ in read_samples(f, tok)]
    assert docs == ["first doc\nits second line", "second", "third"]


def test_a_shard_too_big_for_memory_is_refused_at_once(tok, tmp_path):
    with pytest.raises(ValueError, match="A shard of 4096 sequences of 1000000001 tokens "
                                         "needs about"):
        prepare([write(tmp_path / "a.txt", ["x"])], tmp_path / "out", tok, seq_len=10**9)


def test_disk_full_is_one_line_and_leaves_the_previous_shards(tiny_dir, tmp_path, monkeypatch,
                                                              capsys):
    import errno

    import ouro_mlx.data as data
    from ouro_mlx.cli import main

    src = write(tmp_path / "a.txt", [f"document number {i} " * 4 + "\n" for i in range(80)])
    out = tmp_path / "shards"
    flags = ["data", "--tokenizer", str(tiny_dir), "--out", str(out), "--seq-len", "8",
             "--shard-sequences", "4", str(src)]
    assert main(flags) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, written = data._write, []

    def full(path, array):
        if len(written) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        real(path, array)

    monkeypatch.setattr(data, "_write", full)
    assert main([*flags, "--force"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"ouro-mlx data: error: no space left on the device writing {out}."
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "shards"]  # no partial dir
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setattr(data, "_write", real)
    assert main([*flags, "--force"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_data_flags_are_checked_and_described(tiny_dir, tmp_path, capsys):
    from ouro_mlx.cli import main

    with pytest.raises(SystemExit):
        main(["data", "--tokenizer", str(tiny_dir), "--out", str(tmp_path / "o"),
              "--seq-len", "1", "x.txt"])
    assert "argument --seq-len: must be at least 2, got 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Tokens per training sequence (each row holds one more, the target). " \
           "(default: 2048)" in text and "Sequences per shard file. (default: 4096)" in text


@pytest.mark.parametrize("meta", ["{not json", '["a list"]', '{"seq_len": 8}', b"\xff\xfe"])
def test_a_damaged_shard_index_names_its_file(tmp_path, meta):
    (tmp_path / "meta.json").write_bytes(meta if isinstance(meta, bytes) else meta.encode())
    with pytest.raises(DataError, match=f"{tmp_path / 'meta.json'}: not a shard index"):
        PackedDataset(tmp_path)
