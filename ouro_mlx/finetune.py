"""LoRA / DoRA / full finetuning of a looped model on mlx-lm's tuner.

mlx-lm's pieces are reused as they are: the LoRA layers, ``iterate_batches``,
``evaluate``, ``build_schedule``, the optimizer choice and the compiled step. What is
ours is what a looped model needs, and what a long run on a laptop needs:

- the loss: Stage I (Σ_t p_t·L_t − β·H over every loop step) or the last step's
  cross-entropy (``fixed``, the same math as mlx-lm's ``default_loss``);
- data read line by line: a bad line is reported as ``file:line`` and skipped, and
  user text is encoded as plain text (``ouro_mlx.encoding``), never as special tokens;
- checkpoints written as a whole directory (adapters, optimizer, trainer state) and
  swapped in atomically, so a killed run leaves the previous one loadable, and a
  re-run with the same ``--adapter-path`` continues the same loss curve.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from .encoding import encode_chat, encode_text
from .interrupt import StopRequest, TrainingInterrupted
from .losses import fixed_depth_loss, stage1_loss

ADAPTERS = "adapters.safetensors"
CONFIG = "adapter_config.json"
OPTIMIZER = "optimizer.safetensors"
STATE = "trainer_state.json"
PLOT = "loss.png"
OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon,
              "sgd": optim.SGD, "adafactor": optim.Adafactor}
# Options that fix the shape of the trained parameters: a resumed run must match them.
STRUCTURE = ("fine_tune_type", "num_layers", "lora_parameters", "per_loop_adapters",
             "train_gate")


# ---------------------------------------------------------------- data


def read_jsonl(path: Path, log=print) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every line of ``path`` that is a JSON object;
    any other line is reported as ``file:line`` and skipped (blank lines silently)."""
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file.")
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                log(f"{path}:{n}: skipped: not UTF-8 (byte {e.start}).")
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError) as e:
                reason = getattr(e, "msg", "nested too deeply")
                log(f"{path}:{n}: skipped: not JSON ({reason}).")
                continue
            if not isinstance(obj, dict):
                log(f"{path}:{n}: skipped: not a JSON object.")
                continue
            yield n, obj


def data_format(obj: dict, features: SimpleNamespace) -> str | None:
    """mlx-lm's choice (``create_dataset``): completions, then chat, then text."""
    if features.prompt in obj and features.completion in obj:
        return "completions"
    if features.chat in obj:
        return "chat"
    if features.text in obj:
        return "text"
    return None


def _messages(value) -> str | None:
    """Why ``value`` is not a list of chat messages (None when it is one)."""
    if not isinstance(value, list) or not value:
        return "a non-empty list of messages"
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and (isinstance(m.get("content"), str)
                     or m.get("content") is None and "tool_calls" in m)):
            return "messages with string 'role' and 'content' (or 'tool_calls')"
    return None


def encode_row(obj: dict, kind: str, tokenizer, features, mask_prompt: bool
               ) -> tuple[list[int], int]:
    """``(ids, offset)`` as mlx-lm's dataset classes make them, with the chat
    template applied by ``encode_chat`` (user text stays plain text). Raises
    ValueError saying what the row lacks."""
    if kind == "text":
        text = obj.get(features.text)
        if not isinstance(text, str) or not text:
            raise ValueError(f"'{features.text}' must be a non-empty string")
        ids = encode_text(tokenizer, text)
        if not ids or ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)
        return ids, 0
    tools = obj.get("tools")
    if kind == "completions":
        prompt, completion = obj.get(features.prompt), obj.get(features.completion)
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError(f"'{features.prompt}' and '{features.completion}' must be strings")
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": completion}]
    else:
        messages = obj.get(features.chat)
        if (why := _messages(messages)) is not None:
            raise ValueError(f"'{features.chat}' must be {why}")
    ids = chat_ids(tokenizer, messages, tools, add_generation_prompt=False)
    offset = 0
    if mask_prompt:
        gen = messages[-1]["role"] == "assistant"
        offset = len(chat_ids(tokenizer, messages[:-1], tools, add_generation_prompt=gen))
    return ids, offset


def chat_ids(tokenizer, messages, tools, add_generation_prompt: bool) -> list[int]:
    plain = all(set(m) <= {"role", "content"} and isinstance(m["content"], str)
                for m in messages)
    if tools is None and plain:
        return render(encode_chat, tokenizer, messages,
                      add_generation_prompt=add_generation_prompt)
    if tools is not None and (
            not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise ValueError("'tools' must be a list of objects")
    # encode_chat takes text messages only: tools and tool calls take the template's
    # own path, for rows without special-token strings anywhere (those would become
    # real special tokens there).
    specials = tokenizer.get_added_vocab()
    text = json.dumps([messages, tools], ensure_ascii=False)
    if any(s in text or json.dumps(s)[1:-1] in text for s in specials):
        raise ValueError("a row with tools or tool calls cannot hold special-token strings")
    return render(lambda tok, m, **kw: list(tok.apply_chat_template(m, **kw)), tokenizer,
                  messages, tools=tools, add_generation_prompt=add_generation_prompt)


def render(fn, tokenizer, messages, **kw) -> list[int]:
    """``fn(tokenizer, messages, **kw)``; what the chat template cannot render (jinja2
    raises its own kinds, templates raise on roles they refuse) is a ValueError."""
    try:
        return fn(tokenizer, messages, **kw)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"the chat template cannot render it ({type(e).__name__}: "
                         f"{first})") from None


def load_split(path: Path, tokenizer, args, log=print) -> list[tuple[list[int], int]]:
    """One ``{train,valid,test}.jsonl`` as mlx-lm's batches want it: ``(ids, offset)``
    per usable line. Bad lines are reported as ``file:line`` and skipped."""
    features = SimpleNamespace(
        prompt=getattr(args, "prompt_feature", None) or "prompt",
        completion=getattr(args, "completion_feature", None) or "completion",
        chat=getattr(args, "chat_feature", None) or "messages",
        text=getattr(args, "text_feature", None) or "text")
    rows, kind = [], None
    for n, obj in read_jsonl(path, log):
        here = data_format(obj, features)
        if kind is None and here is not None:
            kind = here
            if kind == "text" and args.mask_prompt:
                raise ValueError(f"{path}:{n}: --mask-prompt needs prompts; text data "
                                 "has none (use chat or prompt/completion rows).")
        if here != kind:
            want = {"completions": f"'{features.prompt}' and '{features.completion}'",
                    "chat": f"'{features.chat}'", "text": f"'{features.text}'"}
            log(f"{path}:{n}: skipped: needs {want[kind] if kind else 'a known format'} "
                "like the file's first row (formats: messages, prompt/completion, text).")
            continue
        try:
            ids, offset = encode_row(obj, kind, tokenizer, features, args.mask_prompt)
        except ValueError as e:
            log(f"{path}:{n}: skipped: {e}.")
            continue
        if len(ids) < 2 or offset >= len(ids):
            log(f"{path}:{n}: skipped: nothing to learn (too short after the prompt).")
            continue
        rows.append((ids, offset))
    return rows


def load_datasets(args, tokenizer, log=print) -> tuple[list, list, list]:
    """train/valid/test from the ``--data`` directory, checked against the options."""
    if "data" in getattr(args, "defaulted", ()):  # mlx-lm's default is a hub dataset
        raise ValueError("--data is required: a directory with train.jsonl (and "
                         "valid.jsonl, test.jsonl) in mlx-lm's formats.")
    data = Path(args.data)
    if not data.is_dir():
        raise ValueError(f"--data {data}: not a directory with train/valid/test.jsonl "
                         "(ouro-mlx lora reads local files only).")
    splits = []
    for name, wanted in (("train", args.train), ("valid", args.train), ("test", args.test)):
        path = data / f"{name}.jsonl"
        rows = load_split(path, tokenizer, args, log) if wanted and path.exists() else []
        if wanted and name != "valid" and not rows:
            raise ValueError(f"{path}: no usable examples (a {name} set is needed).")
        if rows and len(rows) < args.batch_size and (name != "valid" or args.train):
            raise ValueError(f"{path}: {len(rows)} usable examples, fewer than "
                             f"--batch-size {args.batch_size}.")
        splits.append(rows)
    if args.train and not splits[1]:
        log(f"{data / 'valid.jsonl'}: not found or empty; training without validation.")
    return tuple(splits)


# ---------------------------------------------------------------- model


def make_loss(args, model) -> Callable:
    """The training loss, with mlx-lm's signature ``(model, batch, lengths)``."""
    T = args.ut_steps or model.ut_steps
    if args.loss == "fixed":
        return partial(fixed_depth_loss, ut_steps=T)
    return partial(stage1_loss, beta=args.beta, ut_steps=T)


def check_layers(args, model, log=print) -> None:
    n = len(model.layers)
    if args.num_layers > n and "num_layers" in getattr(args, "defaulted", ()):
        log(f"--num-layers: the model has {n} layers (mlx-lm's default is 16); using all.")
        args.num_layers = -1
    if args.num_layers != -1 and not 1 <= args.num_layers <= n:
        raise ValueError(f"--num-layers {args.num_layers}: the model has {n} layers "
                         f"(use 1..{n}, or -1 for all).")


def apply_adapters(model, args) -> None:
    """Freeze the model and make the chosen parameters trainable (see
    ``ouro_mlx.adapters.apply_adapters``)."""
    from .adapters import apply_adapters as apply

    apply(model, fine_tune_type=args.fine_tune_type, num_layers=args.num_layers,
          lora_parameters=args.lora_parameters, per_loop=args.per_loop_adapters,
          train_gate=args.train_gate,
          ut_steps=args.ut_steps if args.per_loop_adapters else None)


def checkpoint_layers(model) -> None:
    """Gradient checkpointing for every physical layer, like mlx-lm's
    ``grad_checkpoint`` but on these instances only (mlx-lm patches the class, which
    would reach every model in the process)."""
    for layer in model.layers:
        base = type(layer)
        if getattr(base, "_ouro_checkpointed", False):
            continue

        def call(self, *args, _fn=base.__call__, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                return _fn(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        layer.__class__ = type(base.__name__, (base,),
                               {"__call__": call, "_ouro_checkpointed": True})


def make_optimizer(args) -> optim.Optimizer:
    from mlx_lm.tuner.utils import build_schedule

    lr = build_schedule(args.lr_schedule) if args.lr_schedule else args.learning_rate
    extra = (args.optimizer_config or {}).get(args.optimizer, {}) or {}
    try:
        return OPTIMIZERS[args.optimizer](learning_rate=lr, **extra)
    except TypeError as e:
        raise ValueError(f"optimizer_config.{args.optimizer}: {e}") from None


# ---------------------------------------------------------------- checkpoints


@dataclass
class TrainerState:
    """What a resumed run needs besides weights and optimizer state: the iteration
    (the data position and random key follow from it and the seed) and the curves."""

    iteration: int = 0
    losses: list = field(default_factory=list)  # every iteration's training loss
    reports: list = field(default_factory=list)  # mlx-lm's train reports
    val: list = field(default_factory=list)  # [iteration, val loss]
    trained_tokens: int = 0
    structure: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"version": 1, **self.__dict__}


def structure_of(args) -> dict:
    return {k: getattr(args, k) for k in STRUCTURE}


def read_state(adapter_path: Path) -> dict | None:
    """The trainer state in ``adapter_path``, or None when there is none (a fresh run)."""
    from .loading import recover_interrupted

    if adapter_path.parent.is_dir():
        recover_interrupted(adapter_path)  # a run killed between two renames
    file = adapter_path / STATE
    if not file.is_file():
        return None
    try:
        state = json.loads(file.read_text())
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not a version-1 trainer state")
        check_state(state)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{file}: unreadable ({e}); remove it or choose another "
                         "--adapter-path.") from None
    return state


def check_state(s: dict) -> None:
    """A trainer state file is untrusted input: every field has its type."""
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    n = s["iteration"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"iteration {n!r}")
    losses = s.get("losses", [])
    if not isinstance(losses, list) or len(losses) != n or not all(map(number, losses)):
        raise ValueError("losses must be one number per iteration")
    val = s.get("val", [])
    if not isinstance(val, list) or not all(
            isinstance(v, list) and len(v) == 2 and all(map(number, v)) for v in val):
        raise ValueError("val must be [iteration, loss] pairs")
    reports = s.get("reports", [])
    if not isinstance(reports, list) or not all(
            isinstance(r, dict) and all(map(number, r.values())) for r in reports):
        raise ValueError("reports must be objects of numbers")
    if not isinstance(s.get("structure", {}), dict) or not number(s.get("trained_tokens", 0)):
        raise ValueError("structure or trained_tokens")


def resume(model, opt, args, adapter_path: Path, saved: dict, log=print) -> TrainerState:
    """Load weights, optimizer and trainer state saved by :func:`save_checkpoint`."""
    want = structure_of(args)
    for k, v in want.items():
        if saved.get("structure", {}).get(k) != v:
            raise ValueError(
                f"--adapter-path {adapter_path} holds a run with {k}="
                f"{saved.get('structure', {}).get(k)!r}, not {v!r}; choose another "
                "--adapter-path to start a new run.")
    from .adapters import GATE_FILE

    load_trainable(model, adapter_path / ADAPTERS)
    if (adapter_path / GATE_FILE).is_file():  # --train-gate's gate, kept apart
        load_trainable(model, adapter_path / GATE_FILE)
    file = adapter_path / OPTIMIZER
    try:
        saved_opt = mx.load(str(file))
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{file}: unreadable ({e}).") from None
    opt.init(model.trainable_parameters())
    want = dict(tree_flatten(opt.state))
    if not isinstance(saved_opt, dict) or set(saved_opt) != set(want) or any(
            saved_opt[k].shape != v.shape for k, v in want.items()):
        raise ValueError(f"{file}: not the state of this optimizer and these adapters.")
    opt.state = tree_map_with_path(lambda path, _: saved_opt[path], opt.state)
    fields_ = {k: saved[k] for k in TrainerState.__dataclass_fields__ if k in saved}
    state = TrainerState(**fields_)
    log(f"Resuming {adapter_path} at iteration {state.iteration}.")
    return state


def load_trainable(model, file: Path) -> None:
    """Load trainable weights from ``file``, checking names and shapes (a file is
    untrusted input: it may only fill what is trainable, with matching shapes)."""
    try:
        weights = mx.load(str(file))
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{file}: unreadable ({e}).") from None
    if not isinstance(weights, dict):
        raise ValueError(f"{file}: not a safetensors file.")
    own = dict(tree_flatten(model.trainable_parameters()))
    for k, v in weights.items():
        if k not in own:
            raise ValueError(f"{file}: {k} is not a trainable parameter of this model "
                             "and options.")
        if v.shape != own[k].shape:
            raise ValueError(f"{file}: {k} has shape {tuple(v.shape)}, the model "
                             f"{tuple(own[k].shape)}.")
    model.load_weights(list(weights.items()), strict=False)


# What a run writes in its --adapter-path (its manifest names these patterns).
RUN_FILES = [ADAPTERS, CONFIG, OPTIMIZER, STATE, PLOT, f"[0-9]*_{ADAPTERS}"]


def save_checkpoint(adapter_path: Path, model, opt, args, state: TrainerState) -> None:
    """Write adapters (mlx-lm's format), a numbered copy, optimizer and trainer state
    and the loss plot into a new directory and swap it in for ``adapter_path``: a
    kill or a full disk at any moment leaves the previous checkpoint whole and no
    temporary files. Earlier numbered copies already there are carried over."""
    from .adapters import adapter_config, save_adapters
    from .loading import atomic_directory, write_errors

    mine = {ADAPTERS, CONFIG, OPTIMIZER, STATE, PLOT}
    nbytes = 3 * sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    with atomic_directory(adapter_path, force=True, verb="lora", own=RUN_FILES) as tmp, \
            write_errors(adapter_path, nbytes):
        if adapter_path.is_dir():
            for f in adapter_path.iterdir():
                if f.name not in mine and f.is_file() and not f.is_symlink():
                    link_or_copy(f, tmp / f.name)
        save_adapters(tmp, model, adapter_config(vars(args)))
        link_or_copy(tmp / ADAPTERS, tmp / f"{state.iteration:07d}_{ADAPTERS}")
        mx.save_safetensors(str(tmp / OPTIMIZER), dict(tree_flatten(opt.state)))
        write_state(tmp / STATE, state)
        plot_losses(state, tmp / PLOT)


def write_state(file: Path, state: TrainerState) -> None:
    file.write_text(json.dumps(state.to_json()))


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        import shutil

        shutil.copy2(src, dst)


def plot_losses(state: TrainerState, png: Path) -> bool:
    """Train and validation loss curves (needs matplotlib; skipped without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    if state.losses:
        ax.plot(range(1, len(state.losses) + 1), state.losses, alpha=0.35, label="train (iter)")
    if state.reports:
        ax.plot([r["iteration"] for r in state.reports],
                [r["train_loss"] for r in state.reports], label="train")
    if state.val:
        ax.plot([v[0] for v in state.val], [v[1] for v in state.val], marker="o",
                label="validation")
    ax.set(xlabel="iteration", ylabel="loss", title="ouro-mlx lora")
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(png)
    finally:
        plt.close(fig)
    return True


# ---------------------------------------------------------------- the loop


def isolated_numpy_rng(fn: Callable) -> Callable:
    """Run ``fn`` with numpy's global generator saved and restored: validation must
    not move the training data order, or a resumed run would see other batches."""

    def run(*a, **kw):
        saved = np.random.get_state()
        try:
            return fn(*a, **kw)
        finally:
            np.random.set_state(saved)

    return run


def evaluate(model, dataset, args, loss, num_batches: int, progress=None) -> float:
    from mlx_lm.tuner.trainer import evaluate as mlx_evaluate
    from mlx_lm.tuner.trainer import iterate_batches

    return isolated_numpy_rng(mlx_evaluate)(
        model=model, dataset=dataset, batch_size=args.batch_size,
        num_batches=num_batches, max_seq_length=args.max_seq_length, loss=loss,
        iterate_batches=partial(iterate_batches, seed=args.seed),
        clear_cache_threshold=args.clear_cache_threshold, progress_callback=progress)


def train(model, opt, train_set, valid_set, args, loss, state: TrainerState,
          adapter_path: Path, log=print) -> TrainerState:
    """mlx-lm's training loop (compiled step, gradient accumulation, data parallelism
    under ``mlx.launch``, reports), with atomic checkpoints and an exact resume from
    ``state.iteration``."""
    from mlx.nn.utils import average_gradients
    from mlx_lm.tuner.trainer import iterate_batches
    from mlx_lm.utils import maybe_set_recommended_wired_limit
    from tqdm import tqdm

    maybe_set_recommended_wired_limit()  # Metal: keep the weights wired, as mlx-lm does
    world = mx.distributed.init()
    rank, size = world.rank(), world.size()
    if args.batch_size % size:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the "
                         f"{size} processes.")
    if args.grad_checkpoint:
        checkpoint_layers(model)
    value_and_grad = nn.value_and_grad(model, loss)
    accum = args.grad_accumulation_steps
    compiled = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=compiled, outputs=compiled)
    def step(batch, prev_grad, do_update):
        (lvalue, toks), grad = value_and_grad(model, *batch)
        if prev_grad is not None:
            grad = tree_map(lambda x, y: x + y, grad, prev_grad)
        if do_update:
            grad = average_gradients(grad)
            if accum > 1:
                grad = tree_map(lambda x: x / accum, grad)
            opt.update(model, grad)
            grad = None
        return lvalue, toks, grad

    batches = iterate_batches(train_set, args.batch_size, args.max_seq_length,
                              loop=True, seed=args.seed, comm_group=world)
    for _ in range(state.iteration):  # the same data position as the run we continue
        next(batches)
    grad = None
    window = Window()
    model.train()
    bar = tqdm(total=args.iters, initial=state.iteration, desc="lora", unit="it",
               dynamic_ncols=True, disable=rank != 0)
    say = (bar.write if log is print else log) if rank == 0 else (lambda *a, **k: None)
    stop = StopRequest()
    try:
        stop.__enter__()  # Ctrl-C: finish the iteration, save, then stop
        for it in range(state.iteration + 1, args.iters + 1):
            batch = next(batches)
            if valid_set and (it == 1 or it % args.steps_per_eval == 0 or it == args.iters):
                tic = time.perf_counter()
                val_loss = evaluate(model, valid_set, args, loss, args.val_batches)
                model.train()
                state.val.append([it - 1, val_loss])
                say(f"Iter {it}: Val loss {val_loss:.3f}, "
                    f"Val took {time.perf_counter() - tic:.3f}s")
            tic = time.perf_counter()
            # The random key (LoRA dropout) follows from the iteration, as the data
            # order does: a resumed run draws what the uninterrupted one would.
            mx.random.seed(args.seed * 1_000_003 + it)
            lvalue, toks, grad = step(batch, grad, it % accum == 0)
            if size > 1:  # the curve of the whole batch, the same on every process
                lvalue = mx.distributed.all_sum(lvalue, stream=mx.cpu) / size
                toks = mx.distributed.all_sum(toks, stream=mx.cpu)
            mx.eval(compiled, lvalue, toks, grad)
            if args.clear_cache_threshold and mx.get_cache_memory() > args.clear_cache_threshold:
                mx.clear_cache()
            window.time += time.perf_counter() - tic
            loss_value = lvalue.item()
            if not math.isfinite(loss_value):
                raise ValueError(f"the training loss is {loss_value} at iteration {it}; "
                                 "lower --learning-rate (the last checkpoint is kept).")
            window.losses.append(loss_value)
            window.toks += toks.item()
            state.losses.append(loss_value)
            state.iteration = it
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if it % args.steps_per_report == 0 or it == args.iters:
                state.reports.append(window.report(it, opt, state))
                say(format_report(state.reports[-1]))
                window = Window()
            # A checkpoint holds no half-accumulated gradient: save on update steps.
            # Ctrl-C stops at the next update step, saving it.
            stopping = it % accum == 0 and it < args.iters and stop.everywhere(size)
            saving = (it % args.save_every == 0 and it % accum == 0) or it == args.iters
            if (saving or stopping) and rank == 0:
                save_checkpoint(adapter_path, model, opt, args, state)
                say(f"Iter {it}: Saved adapter weights to {adapter_path / ADAPTERS} "
                    f"and {adapter_path / f'{it:07d}_{ADAPTERS}'}.")
            if stopping:
                bar.close()
                raise TrainingInterrupted(f"interrupted at iteration {it}; saved "
                                          f"{adapter_path}", it, adapter_path)
    finally:
        stop.__exit__()
        bar.close()
    return state


@dataclass
class Window:
    """The iterations since the last report."""

    losses: list = field(default_factory=list)
    toks: int = 0
    time: float = 0.0

    def report(self, it: int, opt, state: TrainerState) -> dict:
        state.trained_tokens += self.toks
        return {
            "iteration": it,
            "train_loss": sum(self.losses) / len(self.losses),
            "learning_rate": opt.learning_rate.item(),
            "iterations_per_second": len(self.losses) / self.time,
            "tokens_per_second": self.toks / self.time,
            "trained_tokens": state.trained_tokens,
            "peak_memory": mx.get_peak_memory() / 1e9,
        }


def format_report(r: dict) -> str:
    """mlx-lm's report line."""
    return (f"Iter {r['iteration']}: Train loss {r['train_loss']:.3f}, "
            f"Learning Rate {r['learning_rate']:.3e}, "
            f"It/sec {r['iterations_per_second']:.3f}, "
            f"Tokens/sec {r['tokens_per_second']:.3f}, "
            f"Trained Tokens {r['trained_tokens']}, "
            f"Peak mem {r['peak_memory']:.3f} GB")


# ---------------------------------------------------------------- the command


def run(args: SimpleNamespace, log=print) -> dict:
    """``ouro-mlx lora`` with validated options (see ``commands/lora.py``)."""
    from .loading import load

    adapter_path = Path(args.adapter_path)
    if args.train and (adapter_path.is_symlink() or adapter_path.exists()
                       and not adapter_path.is_dir()):
        raise ValueError(f"--adapter-path {adapter_path} exists and is not a directory.")
    if args.train and adapter_path.is_dir():
        # each save rebuilds the directory from its files: nothing else may live there
        for p in adapter_path.iterdir():
            if p.is_symlink() or not p.is_file():
                raise ValueError(f"--adapter-path {adapter_path} holds {p.name}, which is "
                                 "not a plain file; choose a directory of its own.")
    mx.random.seed(args.seed)
    np.random.seed(args.seed)
    log("Loading pretrained model")
    model, tokenizer = load(args.model)
    check_layers(args, model, log)
    log("Loading datasets")
    # skipped lines are warnings: stderr, as the refusals
    warn = partial(print, file=sys.stderr) if log is print else log
    train_set, valid_set, test_set = load_datasets(args, tokenizer, warn)
    result: dict = {}
    if args.train:
        result = fit(model, args, train_set, valid_set, adapter_path, log)
    elif args.adapter_path:
        from .adapters import load_adapters

        config = load_adapters(model, adapter_path)
        if args.ut_steps is None and config.get("per_loop_adapters"):
            args.ut_steps = config["ut_steps"]  # the steps these adapters hold
    if args.test:
        log("Testing")
        test_loss = evaluate(model, test_set, args, make_loss(args, model), args.test_batches)
        log(f"Test loss {test_loss:.3f}, Test ppl {math.exp(min(test_loss, 700)):.3f}.")
        result["test_loss"] = test_loss
    return result


def fit(model, args, train_set, valid_set, adapter_path: Path, log=print) -> dict:
    """Apply the adapters, start or resume the run in ``adapter_path``, train."""
    if args.train_gate and args.loss == "fixed":
        log("--train-gate: --loss fixed gives the exit gate no gradient; use --loss ouro "
            "(or ouro-mlx calibrate-exit).")
    apply_adapters(model, args)
    opt = make_optimizer(args)
    saved = read_state(adapter_path)
    if saved is not None:
        state = resume(model, opt, args, adapter_path, saved, log)
    else:
        state = TrainerState(structure=structure_of(args))
        if adapter_path.is_dir() and (adapter_path / ADAPTERS).exists():
            log(f"{adapter_path} holds adapters but no trainer state: starting a new "
                "run; its first save replaces them.")
        if args.resume_adapter_file:
            log(f"Loading fine-tuned weights from {args.resume_adapter_file}")
            load_trainable(model, Path(args.resume_adapter_file))
    from mlx_lm.utils import get_total_parameters  # counts quantized weights unpacked

    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    n_all = get_total_parameters(model)
    log(f"Trainable parameters: {100 * n_train / n_all:.3f}% "
        f"({n_train / 1e6:.3f}M/{n_all / 1e6:.3f}M)")
    if state.iteration >= args.iters:
        log(f"{adapter_path} already holds {state.iteration} iterations "
            f"(--iters {args.iters}); nothing to train.")
    else:
        log("Training")
        state = train(model, opt, train_set, valid_set, args, make_loss(args, model), state,
                      adapter_path, log)
    if not plot_losses_available():
        log("(no loss plot: pip install matplotlib for loss.png)")
    return {"iteration": state.iteration,
            "train_loss": state.reports[-1]["train_loss"] if state.reports else None,
            "val_loss": state.val[-1][1] if state.val else None}


def plot_losses_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None
