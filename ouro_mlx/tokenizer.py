"""Training a tokenizer for a new looped model with sentencepiece.

sentencepiece learns the vocabulary (BPE or unigram, byte fallback, one token per
digit) on the corpus; the result is saved as a Hugging Face ``tokenizer.json`` with
the ChatML template and special tokens, so ``ouro_mlx.load``, mlx-lm and the chat
template work with it like with Ouro's own tokenizer.
"""

from __future__ import annotations

import json
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator

from .data import check_input, documents, json_lines
from .loading import atomic_directory
from .random_model import chat_template

SPECIALS = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


# sentencepiece silently drops input lines longer than its max_sentence_length; longer
# texts are cut (at a space where there is one) into lines of at most this many bytes.
MAX_LINE = 1 << 16
# Far above any released vocabulary (Ouro's is 49,152); token ids must fit the shards.
MAX_VOCAB = 1 << 20


def corpus_texts(paths: Iterable[str | Path], warn=print) -> Iterator[str]:
    """The raw text of .txt documents and of JSONL text/prompt/completion/messages,
    read line by line. A JSONL line with none of them (not JSON, not an object, no
    text) is reported through ``warn`` as ``file:line`` and skipped, as ``ouro-mlx
    data`` does."""
    paths = [Path(p) for p in paths]
    for path in paths:  # all of them, before reading any
        check_input(path)
    for path in paths:
        if path.suffix != ".jsonl":
            yield from documents(path)
            continue
        for n, obj in json_lines(path, warn):
            texts = jsonl_texts(obj)
            if not texts:
                warn(f"{path}:{n}: skipped, expected text, prompt/completion or messages")
            yield from texts


def jsonl_texts(obj: object) -> list[str]:
    """The texts of one JSONL value: text, prompt, completion, message contents."""
    if not isinstance(obj, dict):
        return []
    texts = [obj[key] for key in ("text", "prompt", "completion")
             if isinstance(obj.get(key), str)]
    msgs = obj.get("messages")
    for m in msgs if isinstance(msgs, list) else []:
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            # the role too: ChatML puts it in every turn's header
            texts.append(f"{m.get('role', '')}\n{m['content']}")
    return texts


def corpus_lines(text: str) -> Iterator[str]:
    """``text`` as sentencepiece input lines of at most MAX_LINE bytes."""
    line, most = text.replace("\n", " "), MAX_LINE // 4  # characters of up to 4 bytes
    while len(line) > most:
        cut = line.rfind(" ", 1, most)
        cut = cut if cut > 0 else most
        yield line[:cut]
        line = line[cut:]
    yield line


def train_tokenizer(
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    vocab_size: int = 4096,
    model_type: str = "bpe",
    force: bool = False,
    default_system: str | None = "You are a helpful assistant.",
    warn=None,
) -> Path:
    """Train on ``inputs`` and write tokenizer files to ``out_dir`` (atomically).
    ``default_system``: the system message the chat template adds when a chat has
    none (Ouro's template adds one; None for none). ``warn``: where skipped JSONL
    lines are reported (default: stderr)."""
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be bpe or unigram, got {model_type!r}.")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
            or vocab_size < len(SPECIALS) + 256 + 8:
        raise ValueError(f"vocab_size must be at least {len(SPECIALS) + 264} "
                         "(special tokens + 256 byte tokens + a few pieces).")
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"vocab_size must be at most {MAX_VOCAB:,}, got {vocab_size:,}.")
    with tempfile.TemporaryDirectory() as work, \
            atomic_directory(Path(out_dir), force, verb="tokenizer") as tmp:
        corpus = Path(work) / "corpus.txt"
        n = 0
        with open(corpus, "w", encoding="utf-8") as f:
            for text in corpus_texts(inputs, warn or partial(print, file=sys.stderr)):
                for line in corpus_lines(text):
                    f.write(line + "\n")
                    n += 1
        if n == 0:
            raise ValueError("The corpus is empty.")
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus), model_prefix=str(Path(work) / "sp"), vocab_size=vocab_size,
                model_type=model_type, eos_id=0, eos_piece=SPECIALS[0], unk_id=1,
                unk_piece=SPECIALS[1], bos_id=-1, pad_id=-1, user_defined_symbols=SPECIALS[2:],
                byte_fallback=True, split_digits=True, character_coverage=1.0,
                hard_vocab_limit=False, max_sentence_length=MAX_LINE, minloglevel=2,
            )
        except RuntimeError as e:
            raise ValueError(f"sentencepiece could not train: {e}") from e
        model_file = Path(work) / "sp.model"
        to_hf_tokenizer(model_file).save(str(tmp / "tokenizer.json"))
        (tmp / "sentencepiece.model").write_bytes(model_file.read_bytes())
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": SPECIALS[0],
            "unk_token": SPECIALS[1],
            "additional_special_tokens": SPECIALS[2:],
            "clean_up_tokenization_spaces": False,
            "model_max_length": 131072,
            "chat_template": chat_template(default_system),
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return Path(out_dir)


def to_hf_tokenizer(model_file: Path):
    """A ``tokenizers.Tokenizer`` equal to the sentencepiece model (special tokens
    are matched before it, so chat markup never merges with text)."""
    import sentencepiece.sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto = pb.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if proto.trainer_spec.model_type == 1:  # unigram
        model = models.Unigram(pieces, unk_id=1, byte_fallback=True)
    else:
        from transformers.convert_slow_tokenizer import generate_merges

        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        model = models.BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=SPECIALS[1],
                           byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok
