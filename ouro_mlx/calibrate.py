"""Exit-gate calibration (``ouro-mlx calibrate-exit``): the paper's Stage II (spec §6.2)
on a user's own data, with the language model frozen.

Only ``model.early_exit_gate`` (hidden_size + 1 numbers) is trained, on the detached
per-step losses of :func:`ouro_mlx.losses.stage2`: a step that still improved a token's
loss by more than γ labels "continue", otherwise "exit". A forward pass of the frozen
model per batch is the whole cost, so a few hundred steps take minutes.

The before/after figures are teacher-forced: every loop step is run on the held-out
sequences, each answer token takes the first step whose exit cdf reaches q, and we
report the average loop count and the cross-entropy of that step's logits (in real
decoding, a token that stops early also changes the keys later tokens see; for the
bundled demo model the command also measures real adaptive generation).

The result is a small gate file (:func:`save_gate`, read back by
:func:`load_exit_gate`) or a new model directory; the original is never edited.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from . import exit as ex
from .losses import adaptive_gate_loss

GATE = "model.early_exit_gate"
GATE_KEYS = (f"{GATE}.weight", f"{GATE}.bias")
THRESHOLDS = (0.3, 0.5, 0.7, 0.9)
GATE_FORMAT = "ouro-mlx exit gate"
MAX_GATE_BYTES = 1 << 22  # a gate is hidden_size + 1 numbers: 8 KB for Ouro-1.4B in bf16
RESET_BIAS = -6.0  # λ = σ(−6) ≈ 0.0025: the cdf stays below 0.01, every token runs all loops

Sample = tuple[list[int], list[int]]  # tokens, loss mask (1 = a target that counts)


# ---------------------------------------------------------------------------- data


def load_data(data: str | Path, tokenizer, *, warn: Callable[[str], None] = print,
              valid_fraction: float = 0.1) -> tuple[list[Sample], list[Sample]]:
    """(train, valid) samples from mlx-lm's layout (a directory with ``train.jsonl`` and
    optionally ``valid.jsonl``) or one ``.jsonl``/``.txt`` file. Without a validation
    file the last ``valid_fraction`` of the samples (at least one) is held out. Chat and
    completion samples count their answer tokens only; content is plain text. Bad lines
    are reported through ``warn`` as ``file:line`` and skipped."""
    from .data import DataError

    path = Path(data)
    if path.is_dir():
        if not (path / "train.jsonl").is_file():
            raise DataError(f"{path}: no train.jsonl in this directory (mlx-lm's layout: "
                            "train.jsonl and valid.jsonl)")
        train = _read(path / "train.jsonl", tokenizer, warn)
        valid_file = path / "valid.jsonl"
        valid = _read(valid_file, tokenizer, warn) if valid_file.is_file() else None
    else:
        train, valid = _read(path, tokenizer, warn), None
    if valid is None:
        if len(train) < 2:
            raise DataError(f"{path}: at least 2 usable samples are needed (train and a "
                            "held-out one), or a valid.jsonl")
        n = max(1, round(len(train) * valid_fraction))
        train, valid = train[:-n], train[-n:]
    return train, valid


def _read(path: Path, tokenizer, warn) -> list[Sample]:
    from .data import DataError, read_samples

    samples = [s for s in read_samples(path, tokenizer, warn=warn)
               if len(s[0]) >= 2 and any(s[1][1:])]
    if not samples:
        raise DataError(f"{path}: no usable samples (each needs at least one answer token "
                        "after the first token)")
    return samples


def cut_to(train: list[Sample], valid: list[Sample], max_seq_length: int, data,
           warn: Callable[[str], None] = print) -> tuple[list[Sample], list[Sample]]:
    """``train`` and ``valid`` without the samples that keep no counted target within
    their first ``max_seq_length`` tokens (a chat prompt longer than that leaves
    nothing to learn from), with a warning saying how many; an error when a set
    is left empty."""
    from .data import DataError

    def keep(samples):
        return [s for s in samples if any(s[1][1:max_seq_length])]

    kept = keep(train), keep(valid)
    for name, before, after in (("training", train, kept[0]), ("validation", valid, kept[1])):
        if not after:
            raise DataError(f"--max-seq-length {max_seq_length}: no {name} sample of {data} "
                            "has an answer token within its first "
                            f"{max_seq_length} tokens; raise it")
        if len(after) < len(before):
            warn(f"{len(before) - len(after):,} of {len(before):,} {name} samples of {data} "
                 "have no answer token "
                 f"within --max-seq-length {max_seq_length} and are left out")
    return kept


def demo_data(tokenizer, n_train: int = 2000, n_valid: int = 200,
              seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Shell games for the bundled demo model, answer tokens counted (seeds below the
    evaluation set's, which :func:`demo_accuracy` uses)."""
    from .demo.task import problems
    from .encoding import encode_chat

    def encode(probs) -> list[Sample]:
        out = []
        for p in probs:
            msgs = p.messages()
            prompt = encode_chat(tokenizer, msgs[:1], add_generation_prompt=True)
            full = encode_chat(tokenizer, msgs, add_generation_prompt=False)
            out.append((full, [0] * len(prompt) + [1] * (len(full) - len(prompt))))
        return out

    return encode(problems(n_train, 2 * seed + 1)), encode(problems(n_valid, 2 * seed + 2))


def pad_batch(samples: list[Sample], max_seq_length: int) -> tuple[mx.array, mx.array]:
    """Tokens [B, N] (padded with 0) and the target mask [B, N−1] for ``batch[:, 1:]``."""
    rows = [(t[:max_seq_length], m[:max_seq_length]) for t, m in samples]
    N = max(len(t) for t, _ in rows)
    tokens = np.zeros((len(rows), N), np.int32)
    mask = np.zeros((len(rows), N), np.bool_)
    for i, (t, m) in enumerate(rows):
        tokens[i, :len(t)] = t
        mask[i, :len(m)] = m
    return mx.array(tokens), mx.array(mask[:, 1:])


def batches(samples: list[Sample], batch_size: int, max_seq_length: int,
            seed: int) -> Iterator[tuple[mx.array, mx.array]]:
    """Endless random batches (a new permutation per pass, from ``seed``)."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(samples))
        for i in range(0, len(order), batch_size):
            yield pad_batch([samples[j] for j in order[i:i + batch_size]], max_seq_length)


# ------------------------------------------------------------------------ training


def reset_gate(model, bias: float = RESET_BIAS) -> None:
    """Re-initialise the gate so it almost never fires (weight 0, bias ``bias``): the
    released checkpoints' behaviour, a starting point for measuring calibration."""
    gate = model.model.early_exit_gate
    gate.weight = mx.zeros_like(gate.weight)
    gate.bias = mx.full(gate.bias.shape, bias, dtype=gate.bias.dtype)
    mx.eval(gate.parameters())


def train_gate(model, train: list[Sample], *, iters: int = 200, batch_size: int = 8,
               learning_rate: float | None = None, max_seq_length: int = 2048, seed: int = 0,
               k: float = 50.0, gamma: float = 0.005, progress: bool = True) -> list[float]:
    """Train the exit gate alone with the Stage II loss (Adam); every other parameter
    stays frozen and bitwise unchanged. Returns the loss of each step.
    ``learning_rate`` defaults to 2 / hidden_size: Adam moves every weight by about the
    rate, so a step moves the gate's logit by about rate × hidden_size."""
    from tqdm import tqdm

    if learning_rate is None:
        learning_rate = default_learning_rate(model)

    model.freeze()
    model.model.early_exit_gate.unfreeze()
    # The gate is tiny: keep it (and its update) in float32 whatever the model dtype.
    gate = model.model.early_exit_gate
    dtype = gate.weight.dtype
    gate.update({k_: v.astype(mx.float32) for k_, v in gate.parameters().items()})
    opt = optim.Adam(learning_rate=learning_rate)
    value_and_grad = nn.value_and_grad(
        model, lambda m, h, ce, mask: adaptive_gate_loss(ce, gate_logits(m, h), mask, k, gamma))
    stream = batches(train, batch_size, max_seq_length, seed)
    losses = []
    bar = tqdm(total=iters, desc="calibrating the exit gate", unit="step",
               disable=not progress)
    for _ in range(iters):
        batch, mask = next(stream)
        hidden, ce = step_losses(model, batch)
        (loss, _), grads = value_and_grad(model, hidden, ce, mask)
        opt.update(model, grads)
        mx.eval(gate.parameters(), opt.state, loss)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.update()
    bar.close()
    if not all(mx.all(mx.isfinite(v)).item() for v in gate.parameters().values()):
        raise ValueError(f"the gate's weights are not finite after {iters} steps; lower "
                         f"--learning-rate (it was {learning_rate:g}).")
    gate.update({k_: v.astype(dtype) for k_, v in gate.parameters().items()})
    mx.eval(gate.parameters())
    return losses


def default_learning_rate(model) -> float:
    return 2.0 / model.args.hidden_size


def step_losses(model, batch: mx.array) -> tuple[list[mx.array], mx.array]:
    """The frozen model's state after every loop step (T arrays [B, S, H]) and every
    step's per-token cross-entropy [B, S, T] (float32) on ``batch[:, 1:]``, computed
    outside any gradient, one row and one step at a time: only one row's logits [S, V]
    exist at once (with a 49k vocabulary, a batch's logits for all T steps would
    outweigh the model)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    hidden = [mx.stop_gradient(h) for h in model.loop_outputs(inputs).hidden]
    mx.eval(hidden)
    steps = []
    for h in hidden:
        rows = []
        for i in range(h.shape[0]):
            ce = nn.losses.cross_entropy(model.lm_head(h[i:i + 1]), targets[i:i + 1])
            rows.append(ce.astype(mx.float32))
            mx.eval(rows[-1])
        steps.append(mx.concatenate(rows, axis=0))
    return hidden, mx.stack(steps, axis=-1)


def gate_logits(model, hidden: list[mx.array]) -> mx.array:
    """The exit gate on each step's state, [B, S, T] float32."""
    gate = model.model.early_exit_gate
    return mx.stack([gate(h).squeeze(-1) for h in hidden], axis=-1).astype(mx.float32)


# --------------------------------------------------------------------- measuring


def measure(model, samples: list[Sample], thresholds=THRESHOLDS, *, batch_size: int = 8,
            max_seq_length: int = 2048) -> dict:
    """Teacher-forced Q-exit over the counted tokens of ``samples``: for each q the
    average loop count and the cross-entropy of the chosen step's logits, and the
    same at full depth. ``{"full": {"loops", "loss"}, "0.5": {...}, ..., "tokens"}``."""
    return measure_with_gate_loss(model, samples, thresholds, batch_size=batch_size,
                                  max_seq_length=max_seq_length)[0]


def measure_with_gate_loss(model, samples: list[Sample], thresholds=THRESHOLDS, *,
                           batch_size: int = 8, max_seq_length: int = 2048
                           ) -> tuple[dict, float | None]:
    """:func:`measure`, and the Stage II loss that :func:`train_gate` minimises, on the
    same samples (token-weighted; None for a model with one loop step), from the same
    forward passes."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i][0]))
    sums = {key: [0.0, 0.0] for key in ["full", *map(_key, thresholds)]}
    ntoks, gate_sum = 0, 0.0
    T = model.ut_steps
    for i in range(0, len(order), batch_size):
        batch, mask = pad_batch([samples[j] for j in order[i:i + batch_size]], max_seq_length)
        hidden, step_ce = step_losses(model, batch)
        m = mask.astype(mx.float32)
        logits = gate_logits(model, hidden)
        cdf = ex.exit_cdf(ex.exit_pdf(logits))
        picks = {"full": mx.full(m.shape, T - 1, dtype=mx.int32)}
        picks.update({_key(q): ex.select_exit_step(cdf, q) for q in thresholds})
        for key, step in picks.items():
            ce = mx.take_along_axis(step_ce, step[..., None], axis=-1).squeeze(-1)
            loops, loss = ((step + 1) * m).sum(), (ce * m).sum()
            mx.eval(loops, loss)
            sums[key][0] += loops.item()
            sums[key][1] += loss.item()
        if T >= 2:
            gate_loss, n_gate = adaptive_gate_loss(step_ce, logits, mask)
            gate_sum += (gate_loss * n_gate).item()
        ntoks += int(m.sum().item())
    n = max(ntoks, 1)
    out = {key: {"loops": round(a / n, 4), "loss": round(b / n, 5)} for key, (a, b) in sums.items()}
    out["tokens"] = ntoks
    return out, (round(gate_sum / n, 5) if T >= 2 else None)


def demo_accuracy(model, tokenizer, thresholds=THRESHOLDS, n: int = 500) -> dict:
    """Real adaptive generation on the demo task's held-out games: accuracy and average
    loops per decoded token for each q, and accuracy at full depth."""
    from .demo.evaluate import evaluate

    out = {}
    # q = 1.0 is full depth (evaluate's fixed-depth rows apply the model's own threshold)
    for key, q in [("full", 1.0), *((_key(q), q) for q in thresholds)]:
        r = evaluate(model, tokenizer, n, exit_threshold=q, depths=())
        out[key] = {"loops": r["avg_loops_adaptive"], "accuracy": r["accuracy"]["adaptive"]}
    out["problems"] = n
    return out


def choose_threshold(rows: dict, thresholds, tolerance: float,
                     metric: str = "loss") -> float | None:
    """The threshold with the fewest loops whose ``metric`` is within ``tolerance`` of
    full depth: for "loss" at most (1 + tolerance) × the full-depth loss, for
    "accuracy" at most ``tolerance`` below it (0.01 = one point). None if none is."""
    full = rows["full"][metric]
    ok = []
    for q in thresholds:
        r = rows[_key(q)]
        if metric == "loss":
            good = r["loss"] <= full * (1 + tolerance) + 1e-12
        else:
            good = r["accuracy"] >= full - tolerance - 1e-12
        if good:
            ok.append((r["loops"], -q, q))  # fewest loops; on a tie, the larger q
    return min(ok)[2] if ok else None


def _key(q: float) -> str:
    return f"{q:g}"


# ------------------------------------------------------------------------ output


def gate_tensors(model) -> dict[str, mx.array]:
    gate = model.model.early_exit_gate
    return {GATE_KEYS[0]: gate.weight, GATE_KEYS[1]: gate.bias}


def save_gate(path: str | Path, model, threshold: float | None) -> Path:
    """Write the gate as a small safetensors file (written beside ``path``, then renamed
    over it) with metadata ``threshold`` (the chosen Q-exit threshold, or "none") and
    ``ut_steps``."""
    from .loading import write_errors
    from .outputs import replace_file

    path = Path(path)
    meta = {"threshold": "none" if threshold is None else repr(float(threshold)),
            "ut_steps": str(model.ut_steps), "format": GATE_FORMAT}

    def write(tmp: Path) -> None:
        with write_errors(path, 1 << 20):
            mx.save_safetensors(str(tmp), gate_tensors(model), metadata=meta)

    return replace_file(path, write)


def is_gate_file(path: Path) -> bool:
    """Whether ``path`` is a gate file calibrate-exit wrote (its safetensors header
    says so): the only kind of file ``--gate-out --force`` replaces."""
    try:
        if path.stat().st_size > MAX_GATE_BYTES:
            return False
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n < MAX_GATE_BYTES else None
    except (OSError, ValueError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and meta.get("format") == GATE_FORMAT \
        and set(header) - {"__metadata__"} == set(GATE_KEYS)


def load_exit_gate(model, path: str | Path) -> float | None:
    """Set ``model``'s exit gate from a gate file written by ``calibrate-exit
    --gate-out`` and return the threshold stored with it (None if none was chosen).
    The file is checked first (a regular safetensors file holding exactly the gate's
    two tensors, of the model's shapes, floating and finite); every refusal is one
    ValueError naming the file. The model's ``exit_threshold`` is left to the caller."""
    from .untrusted import check_tensor

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such gate file")
    if not path.is_file():
        raise ValueError(f"{path}: not a gate file (a directory or special file); give the "
                         "file that calibrate-exit --gate-out wrote")
    if (size := path.stat().st_size) > MAX_GATE_BYTES:
        raise ValueError(f"{path}: {size:,} bytes is too large for a gate file (at most "
                         f"{MAX_GATE_BYTES:,}); give the file that calibrate-exit --gate-out "
                         "wrote")
    try:
        tensors, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except Exception as e:  # MLX reports a bad file as RuntimeError/ValueError
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: cannot read the gate file (truncated or not "
                         f"safetensors): {first}") from None
    if missing := [k for k in GATE_KEYS if k not in tensors]:
        raise ValueError(f"{path}: not a gate file, missing {', '.join(missing)}")
    if extra := sorted(set(tensors) - set(GATE_KEYS)):
        raise ValueError(f"{path}: not a gate file, unexpected tensors "
                         f"{', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}")
    current = gate_tensors(model)
    for k in GATE_KEYS:
        check_tensor(path, k, tensors[k], current[k].shape)
    threshold = _threshold(meta.get("threshold", "none"), path)
    ut = meta.get("ut_steps")
    if ut is not None and not (ut.isdigit() and int(ut) >= 1):
        raise ValueError(f"{path}: metadata ut_steps must be a positive integer, got {ut!r}")
    gate = model.model.early_exit_gate
    gate.update({"weight": tensors[GATE_KEYS[0]].astype(current[GATE_KEYS[0]].dtype),
                 "bias": tensors[GATE_KEYS[1]].astype(current[GATE_KEYS[1]].dtype)})
    mx.eval(gate.parameters())
    return threshold


def _threshold(text: str, path: Path) -> float | None:
    if text == "none":
        return None
    try:
        q = float(text)
    except ValueError:
        q = math.nan
    if not 0 <= q <= 1:
        raise ValueError(f"{path}: metadata threshold must be a number in [0, 1] or none, "
                         f"got {text[:40]!r}")
    return q


def save_model_dir(out: str | Path, source: Path, model, threshold: float | None,
                   force: bool = False) -> Path:
    """A new model directory: ``source``'s config with ``early_exit_threshold`` set to
    ``threshold`` (unchanged if None), its tokenizer files, and the model's weights with
    the calibrated gate; written to a temporary directory and renamed into place."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import save_model

    from .loading import atomic_directory, copy_support_files, read_config, write_errors

    model.check_unfused("save")
    config = read_config(source)
    if threshold is not None:
        config["early_exit_threshold"] = threshold
    out = Path(out)
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    with atomic_directory(out, force=force, verb="calibrate-exit") as tmp, \
            write_errors(out, nbytes):
        save_model(tmp, model)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_support_files(source, tmp)
    return out

