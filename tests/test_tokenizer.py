"""Training a tokenizer with sentencepiece and using it through ouro_mlx.load."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm

from ouro_mlx.loading import load_tokenizer
from ouro_mlx.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                          {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]}
            for a in range(40) for b in range(0, 40, 3)]
    (d / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    (d / "c.txt").write_text("Plain text about numbers and sums.\n\nAnother paragraph.")
    return [d / "c.jsonl", d / "c.txt"]


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_trained_tokenizer_round_trips_and_matches_sentencepiece(corpus, tmp_path, kind):
    out = train_tokenizer(corpus, tmp_path / "tok", vocab_size=320, model_type=kind)
    tok = load_tokenizer(out, {"eos_token_id": 0})
    sp = spm.SentencePieceProcessor(model_file=str(out / "sentencepiece.model"))
    for text in ["What is 12 + 7?", "Wörds ünseen 🙂 and 1234"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert ids == sp.encode(text)
    assert tok.encode("1234", add_special_tokens=False)[-4:] == [
        tok.convert_tokens_to_ids(d) for d in "1234"]
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    vocab = tok.get_vocab()
    assert ids[0] == vocab["<|im_start|>"] and vocab["<|im_end|>"] in ids
    assert {0, vocab["<|im_end|>"]} <= set(tok.eos_token_ids)
    assert len(vocab) <= 320


def test_bad_inputs(corpus, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus, tmp_path / "a", vocab_size=10)
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(corpus, tmp_path / "b", model_type="wordpiece")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([tmp_path / "empty.txt"], tmp_path / "c")
    assert not any(p.name in ("a", "b", "c") for p in tmp_path.iterdir())


def test_role_names_are_pieces_and_default_system_is_optional(corpus, tmp_path):
    out = train_tokenizer(corpus, tmp_path / "tok", vocab_size=330, default_system=None)
    tok = load_tokenizer(out, {"eos_token_id": 0})
    chat = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # the corpus's role names were in the tokenizer's training text: one piece each
    assert len(tok.encode("user", add_special_tokens=False)) <= 2
    with_system = train_tokenizer(corpus, tmp_path / "tok2", vocab_size=330)
    text = load_tokenizer(with_system, {"eos_token_id": 0}).apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def test_a_megabyte_line_is_learnt_from_not_dropped(tmp_path):
    # sentencepiece drops lines over its max_sentence_length; one such line alone
    # used to end in "INTERNAL: ... [!sentences_.empty()]"
    (tmp_path / "long.txt").write_text("zebra crossing " * 70_000)  # ~1 MB, no newline
    out = train_tokenizer([tmp_path / "long.txt"], tmp_path / "tok", vocab_size=300)
    tok = load_tokenizer(out, {"eos_token_id": 0})
    assert len(tok.encode("zebra crossing", add_special_tokens=False)) <= 3


def test_corpus_errors_name_the_file(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=rf"{bad}:2: not UTF-8 text"):
        train_tokenizer([bad], tmp_path / "a", vocab_size=300)
    with pytest.raises(ValueError, match=rf"{tmp_path}: is a directory"):
        train_tokenizer([corpus[0], tmp_path], tmp_path / "b", vocab_size=300)
    with pytest.raises(ValueError, match="at most 1,048,576"):
        train_tokenizer(corpus, tmp_path / "c", vocab_size=10**9)
    nested = tmp_path / "nested.jsonl"
    nested.write_text("[" * 100_000 + "\n" + json.dumps({"text": "only this " * 50}) + "\n")
    assert train_tokenizer([nested], tmp_path / "d", vocab_size=300).exists()


def test_cli_reports_the_size_it_wrote(corpus, tmp_path, capsys):
    from ouro_mlx.cli import main

    assert main(["tokenizer", "train", "--out", str(tmp_path / "t"), "--vocab-size", "100000",
                 str(corpus[1])]) == 0
    size = len(load_tokenizer(tmp_path / "t", {"eos_token_id": 0}).get_vocab())
    assert size < 400
    assert capsys.readouterr().out == (f"Wrote a bpe tokenizer ({size} tokens; 100000 asked, "
                                       f"the corpus supports no more) to {tmp_path / 't'}\n")
    with pytest.raises(SystemExit):
        main(["tokenizer", "train", "--out", str(tmp_path / "u"), "--vocab-size", "1000000000",
              str(corpus[1])])
    assert "argument --vocab-size: must be between 270" in capsys.readouterr().err


def test_malformed_jsonl_lines_are_reported_with_file_and_line(tmp_path):
    """As `ouro-mlx data` does: each skipped line named as file:line, the rest used."""
    import subprocess
    import sys

    from tests.test_cli import ENV

    good = [json.dumps({"text": f"line {i} has some words in it"}) for i in range(30)]
    bad = tmp_path / "c.jsonl"
    bad.write_text("\n".join([good[0], "{not json", json.dumps([1, 2]), "",
                              json.dumps({"other": "x"}), *good[1:]]) + "\n")
    seen = []
    train_tokenizer([bad], tmp_path / "tok", vocab_size=300, warn=seen.append)
    assert seen == [f"{bad}:2: skipped, not valid JSON (Expecting property name enclosed "
                    "in double quotes)",
                    f"{bad}:3: skipped, expected text, prompt/completion or messages",
                    f"{bad}:5: skipped, expected text, prompt/completion or messages"]
    out = subprocess.run([sys.executable, "-m", "ouro_mlx", "tokenizer", "train",
                          "--vocab-size", "300", "--out", str(tmp_path / "cli"), str(bad)],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [line.split(":", 2)[1] for line in out.stderr.splitlines()
            if line.startswith(f"{bad}:")] == ["2", "3", "5"]
