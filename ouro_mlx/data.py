"""Training data: text and JSONL → tokenized, packed sequences in binary shards.

Inputs (mlx-lm's formats):
- ``.txt``: documents separated by blank lines;
- ``.jsonl``: one object per line, ``{"text": ...}``, ``{"prompt": ..., "completion":
  ...}`` or ``{"messages": [...]}`` (chat, rendered with the tokenizer's template).
  For completions and chat only the answer tokens are trained on (a loss mask).

Documents are tokenized, each followed by the eos token, concatenated and cut into
sequences of ``seq_len + 1`` tokens (a document longer than that continues in the
next sequence). With ``pack=False`` each document gets a row of its own, padded with
eos (masked out); one longer than a row is reported and skipped: for short, uniform
samples (chat problems) where the loss is on a few answer tokens. Shards are flat
numpy files (tokens and mask), read back by memory map. Files are read line by line,
after every input is checked (a regular .txt/.jsonl file). Lines that are not valid
JSON, lack the fields, or hold a chat whose messages lack a string role and content
are reported as ``file:line`` and skipped; a file with no usable sample is an error.

Batches come in a deterministic order (a permutation per epoch from the seed), each
rank of a data-parallel group reading its own part, from a resumable position.
"""

from __future__ import annotations

import errno
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .encoding import encode_chat, encode_text  # content is plain text, never markup
from .loading import atomic_directory

META = "meta.json"


class DataError(ValueError):
    """Unusable training data; the message names the file (and line)."""


def _render(obj: dict, tokenizer) -> tuple[list[int], list[int]] | None:
    """(tokens, mask) for one JSON object, or None if it has no known format."""
    if isinstance(obj.get("text"), str):
        ids = encode_text(tokenizer, obj["text"])
        return ids, [1] * len(ids)
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        obj = {"messages": [{"role": "user", "content": obj["prompt"]},
                            {"role": "assistant", "content": obj["completion"]}]}
    msgs = obj.get("messages")
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs):
        if msgs[-1].get("role") != "assistant":
            return None
        prompt = encode_chat(tokenizer, msgs[:-1], add_generation_prompt=True)
        full = encode_chat(tokenizer, msgs, add_generation_prompt=False)
        if full[: len(prompt)] != prompt:  # template not prefix-stable: train on all
            return full, [1] * len(full)
        return full, [0] * len(prompt) + [1] * (len(full) - len(prompt))
    return None


FORMATS = (".jsonl", ".txt", ".md")


def check_input(path: Path) -> None:
    """Refuse what read_samples cannot read, before reading any of it."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give .txt or .jsonl files")
    if path.suffix not in FORMATS:
        raise DataError(f"{path}: unknown data format (use .txt or .jsonl)")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(number, text) of each line, read one at a time; bad UTF-8 names its line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} "
                                f"at column {e.start + 1})") from None


def _problem(obj: dict) -> str | None:
    """Why the chat in ``obj`` cannot be rendered, when a chat is what it holds."""
    if isinstance(obj.get("text"), str) or (isinstance(obj.get("prompt"), str)
                                            and isinstance(obj.get("completion"), str)):
        return None
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return None
    for i, m in enumerate(msgs, 1):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            return f"message {i} needs a string role and a string content"
    if msgs[-1]["role"] != "assistant":
        return "the last message must be the assistant's (the answer trained on)"
    return None


def json_lines(path: Path, warn=print) -> Iterator[tuple[int, object]]:
    """(number, value) of each JSON line of ``path``; blank lines are passed over and
    a line that is not JSON is reported through ``warn`` as ``file:line`` and skipped."""
    for n, line in text_lines(path):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            warn(f"{path}:{n}: skipped, not valid JSON ({e.msg})")
        except RecursionError:
            warn(f"{path}:{n}: skipped, JSON nested too deeply")


def read_samples(path: Path, tokenizer, warn=print) -> Iterator[tuple[list[int], list[int]]]:
    """Yield (tokens, mask) per document of a .txt or .jsonl file, read line by line."""
    from jinja2 import TemplateError

    path = Path(path)
    check_input(path)
    if path.suffix == ".jsonl":
        for n, obj in json_lines(path, warn):
            if isinstance(obj, dict) and (problem := _problem(obj)):
                warn(f"{path}:{n}: skipped, {problem}")
                continue
            try:
                sample = _render(obj, tokenizer) if isinstance(obj, dict) else None
            except (TemplateError, TypeError, ValueError) as e:
                warn(f"{path}:{n}: skipped, the chat template failed ({e})")
                continue
            if sample is None:
                warn(f"{path}:{n}: skipped, expected text, prompt/completion or messages")
                continue
            yield sample
    else:  # documents separated by blank lines
        for doc in documents(path):
            ids = encode_text(tokenizer, doc.strip())
            yield ids, [1] * len(ids)


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def documents(path: Path) -> Iterator[str]:
    """The blank-line separated documents of a text file, read line by line."""
    lines: list[str] = []
    for _, line in text_lines(path):
        if line.strip():
            lines.append(line)
        elif lines:
            yield "\n".join(lines)
            lines = []
    if lines:
        yield "\n".join(lines)


@dataclass
class ShardMeta:
    seq_len: int
    dtype: str
    shards: list[int]  # sequences per shard
    tokens: int
    documents: int
    skipped: int
    packed: bool = True

    @property
    def sequences(self) -> int:
        return sum(self.shards)


def prepare(
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    tokenizer,
    seq_len: int,
    *,
    shard_sequences: int = 4096,
    force: bool = False,
    warn=None,
    pack: bool = True,
) -> ShardMeta:
    """Tokenize and pack ``inputs`` into shards under ``out_dir`` (atomically)."""
    from .limits import check_fits

    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}.")
    if shard_sequences < 1:
        raise ValueError(f"shard_sequences must be >= 1, got {shard_sequences}.")
    # a shard's rows are held (and stacked, a copy) before they are written
    check_fits(2 * shard_sequences * (seq_len + 1) * 5,
               f"A shard of {shard_sequences} sequences of {seq_len + 1} tokens")
    inputs = [Path(p) for p in inputs]
    for path in inputs:  # all of them, before the first is tokenized
        check_input(path)
    skipped = 0
    show = warn or (lambda msg: print(msg, file=sys.stderr))

    def report(msg: str) -> None:
        nonlocal skipped
        skipped += 1
        show(msg)

    vocab = len(tokenizer.get_vocab())
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    n = seq_len + 1
    eos = tokenizer.eos_token_id
    try:  # a full disk: atomic_directory removes the partial shards
        with atomic_directory(Path(out_dir), force=force, verb="data") as tmp:
            buf_t: list[int] = []
            buf_m: list[int] = []
            shards: list[int] = []
            docs = tokens = 0
            pending_t: list[np.ndarray] = []
            pending_m: list[np.ndarray] = []

            def flush(final: bool = False):
                if not pending_t or (not final and len(pending_t) < shard_sequences):
                    return
                i = len(shards)
                _write(tmp / f"tokens-{i:05d}.bin", np.stack(pending_t))
                _write(tmp / f"mask-{i:05d}.bin", np.stack(pending_m))
                shards.append(len(pending_t))
                pending_t.clear()
                pending_m.clear()

            for path in inputs:
                before = docs
                for i, (ids, mask) in enumerate(read_samples(path, tokenizer, report)):
                    if not pack:
                        if len(ids) + 1 > n:
                            report(f"{path}: sample {i + 1} skipped, {len(ids) + 1} tokens "
                                   f"with eos do not fit a row of {n} (seq_len + 1)")
                            continue
                        docs += 1
                        pad = n - len(ids)
                        pending_t.append(np.array(ids + [eos] * pad, dtype))
                        last = [mask[-1] if mask else 1]
                        pending_m.append(np.array(mask + last + [0] * (pad - 1), np.uint8))
                        tokens += len(ids) + 1
                        flush()
                        continue
                    docs += 1
                    buf_t += ids + [eos]
                    buf_m += mask + [mask[-1] if mask else 1]
                    start = 0  # cut once per document: a long one is not copied per row
                    while len(buf_t) - start >= n:
                        pending_t.append(np.array(buf_t[start:start + n], dtype))
                        pending_m.append(np.array(buf_m[start:start + n], np.uint8))
                        tokens += n
                        # sequences overlap by one token: the last input is the next target
                        start += n - 1
                        flush()
                    buf_t, buf_m = buf_t[start:], buf_m[start:]
                if docs == before:
                    raise DataError(f"{path}: no usable samples")
            flush(final=True)
            if not shards:
                raise DataError(f"Not enough data for one sequence of {n} tokens.")
            meta = ShardMeta(seq_len, np.dtype(dtype).name, shards, tokens, docs, skipped, pack)
            (tmp / META).write_text(json.dumps(meta.__dict__, indent=2))
    except OSError as e:
        if e.errno == errno.ENOSPC:  # name the output, not the removed temporary
            raise OSError(e.errno, e.strerror, str(out_dir)) from None
        raise
    return meta


def _write(path: Path, array: np.ndarray) -> None:
    # ndarray.tofile reports a full disk without errno or file name
    with open(path, "wb") as f:
        f.write(np.ascontiguousarray(array).data)


class PackedDataset:
    """Read-only view of prepared shards: ``len()`` sequences of ``seq_len + 1``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / META).exists():
            raise DataError(f"{self.path} has no {META}; run prepare first.")
        try:
            self.meta = ShardMeta(**json.loads((self.path / META).read_text()))
            np.dtype(self.meta.dtype)
        except (ValueError, TypeError) as e:  # ValueError includes bad UTF-8
            raise DataError(f"{self.path / META}: not a shard index written by prepare "
                            f"({_first_line(e)})") from None
        n = self.meta.seq_len + 1
        self.tokens, self.masks = [], []
        for i, count in enumerate(self.meta.shards):
            t, m = self.path / f"tokens-{i:05d}.bin", self.path / f"mask-{i:05d}.bin"
            dt = np.dtype(self.meta.dtype)
            if not t.exists() or t.stat().st_size != count * n * dt.itemsize \
                    or not m.exists() or m.stat().st_size != count * n:
                raise DataError(f"{t}: missing or truncated shard")
            self.tokens.append(np.memmap(t, dtype=dt, mode="r", shape=(count, n)))
            self.masks.append(np.memmap(m, dtype=np.uint8, mode="r", shape=(count, n)))
        self.offsets = np.cumsum([0] + self.meta.shards)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        j = i - self.offsets[s]
        return np.asarray(self.tokens[s][j]), np.asarray(self.masks[s][j])


@dataclass
class Position:
    """Where a run is in its data: resumable across restarts and world sizes."""

    epoch: int = 0
    index: int = 0  # global sequences consumed in this epoch


def batches(data: PackedDataset, batch_size: int, *, seed: int = 0,
            position: Position | None = None, rank: int = 0, world_size: int = 1
            ) -> Iterator[tuple[np.ndarray, np.ndarray, Position]]:
    """Yield (tokens [b, seq_len+1], mask, position after this batch) forever.

    Each global batch is ``batch_size × world_size`` sequences of one fixed
    per-epoch permutation; rank r takes its ``batch_size`` slice. The position
    counts global sequences, so a resume with another world size continues the
    same order."""
    pos = Position(**vars(position)) if position else Position()
    global_batch = batch_size * world_size
    if len(data) < global_batch:
        raise DataError(f"{len(data)} sequences cannot fill a global batch of {global_batch}.")
    while True:
        order = np.random.default_rng([seed, pos.epoch]).permutation(len(data))
        while pos.index + global_batch <= len(data):
            idx = order[pos.index + rank * batch_size: pos.index + (rank + 1) * batch_size]
            pos.index += global_batch
            items = [data[int(i)] for i in idx]
            yield (np.stack([t for t, _ in items]).astype(np.int32),
                   np.stack([m for _, m in items]), Position(pos.epoch, pos.index))
        pos = Position(pos.epoch + 1, 0)
