"""Training looped models: from scratch, resumable, data parallel over MLX distributed.

One process or many (``mlx.launch -n 2 --backend ring -- python -m ouro_mlx train
...``): each rank reads its own slice of every global batch, gradients are averaged
with ``mlx.nn.average_gradients``, rank 0 writes checkpoints. A checkpoint holds the
model, the optimizer state, the step, the data position and the RNG seed stream; it
is written to a temporary directory and renamed, so a kill during the write leaves
the previous one loadable. Resuming restores all of it, also with another world
size (the data position counts global sequences).

With ``tensor_parallel: true`` the processes instead split the model
(``Model.shard``: heads and MLP columns) and all read the same batches; gradients of
the shards stay local, the clipping norm is summed over devices, and checkpoints
gather the shards into one ordinary checkpoint (resumable with any world size).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .data import PackedDataset, Position, batches
from .interrupt import StopRequest, TrainingInterrupted
from .losses import LOSSES, MASKED_LOSSES, loss_report
from .model import Model, ModelArgs


@dataclass
class TrainConfig:
    """Everything a run needs; YAML keys have these names (flags override them)."""

    data: str = ""
    out: str = "runs/ouro"
    model: dict = field(default_factory=dict)  # config.json fields, or {"shape": name}
    init_from: str | None = None  # a checkpoint directory to start from
    upcycle: int = 1  # duplicate each layer this many times (2: 24 → 48 layers)
    val_data: str | None = None
    loss: str = "stage1"
    beta: float = 0.1
    stage2_k: float = 50.0
    stage2_gamma: float = 0.005
    ut_steps: int = 4
    loop_schedule: list = field(default_factory=list)  # [[step, T], ...], e.g. [[0, 8], [1000, 4]]
    batch_size: int = 8
    grad_accum: int = 1
    iters: int = 1000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 100
    decay_frac: float = 0.2  # warmup–stable–decay: the last 20% of steps decay to min_lr
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    dtype: str = "float32"
    grad_checkpoint: bool = False
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 200
    keep: int = 2
    seed: int = 0
    plot: bool = True
    tensor_parallel: bool = False  # shard the model over all processes (one batch for all)

    # fields that must match on resume (the rest may change, e.g. iters)
    RESUME_KEYS = ("model", "loss", "batch_size", "grad_accum", "seed", "dtype", "data",
                   "tensor_parallel")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - names):
            raise ValueError(f"Unknown training options: {', '.join(unknown)}.")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Refuse, in one line naming the key, any value training cannot use."""
        from .model import check_ut_steps

        for f in fields(self):
            value = getattr(self, f.name)
            if f.default is None:  # an optional path
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"{f.name} must be a path or null, got {value!r}.")
                continue
            kind = type(f.default) if f.default is not MISSING else None
            if kind is float:
                if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
                    value = _float(value)
                    setattr(self, f.name, value)
                if not (_is(value, float) and math.isfinite(value)):
                    raise ValueError(f"{f.name} must be a finite number, got {value!r}.")
            elif kind is not None and not _is(value, kind):
                raise ValueError(f"{f.name} must be {_KIND[kind]}, got {value!r}.")
        if not isinstance(self.model, dict):
            raise ValueError('model must be a mapping, e.g. {"shape": "tiny"} or config fields.')
        model_dims(self.model)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}.")
        for name in ("batch_size", "grad_accum", "iters", "upcycle", "eval_batches",
                     "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("warmup", "eval_every", "keep", "seed", "beta", "stage2_gamma",
                     "min_lr", "weight_decay", "grad_clip"):  # 0: off / none / all
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("lr", "stage2_k"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        if self.seed >= 2**32:
            raise ValueError(f"seed must be below 2**32, got {self.seed}.")
        if not 0 <= self.decay_frac <= 1:
            raise ValueError(f"decay_frac must be between 0 and 1, got {self.decay_frac}.")
        if not (isinstance(self.betas, list) and len(self.betas) == 2
                and all(_is(b, float) and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}.")
        check_ut_steps(self.ut_steps)
        if not isinstance(self.loop_schedule, list) or not all(
                isinstance(e, list) and len(e) == 2 and _is(e[0], int) and e[0] >= 0
                for e in self.loop_schedule):
            raise ValueError("loop_schedule must be a list of [step, ut_steps] pairs of "
                             f"integers, got {self.loop_schedule!r}.")
        for _, t in self.loop_schedule:
            check_ut_steps(t, "a loop_schedule entry's ut_steps")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}.")
        if not self.data:
            raise ValueError("No training data: set data to a prepared shard directory.")

    def steps_at(self, step: int) -> int:
        """Loop steps in force at optimizer step ``step`` (the loop-count schedule)."""
        T = self.ut_steps
        for start, t in sorted(self.loop_schedule):
            if step >= start:
                T = int(t)
        return T


# What each option means: `ouro-mlx train --help` shows these.
HELP = {
    "data": "Directory of shards prepared by `ouro-mlx data`.",
    "out": "Run directory: checkpoints (ckpt-STEP, latest), history.jsonl, training.png.",
    "model": 'A new model: {"shape": NAME} (tiny, small, ouro-1.4b, ouro-2.6b), optionally '
             "with config.json fields that override it, or config.json fields alone.",
    "init_from": "Checkpoint directory to start from instead of a new model.",
    "upcycle": "Duplicate every layer this many times (2: 24 -> 48 layers).",
    "val_data": "Shards to evaluate on (null: the training data).",
    "loss": "stage1 (entropy-regularised loop loss), stage2 (exit gate only) or fixed "
            "(plain cross-entropy at ut_steps).",
    "beta": "Stage I entropy weight.",
    "stage2_k": "Stage II gate loss sharpness k.",
    "stage2_gamma": "Stage II improvement threshold gamma.",
    "ut_steps": "Loop steps per forward pass.",
    "loop_schedule": "Loop steps by optimizer step, as JSON [[step, ut_steps], ...], "
                     "e.g. [[0, 8], [1000, 4]].",
    "batch_size": "Sequences per micro-batch (per process).",
    "grad_accum": "Micro-batches accumulated per optimizer step.",
    "iters": "Optimizer steps in total (a resumed run continues up to this).",
    "lr": "Peak learning rate (warmup, constant, cosine decay).",
    "min_lr": "Learning rate at the end of the decay.",
    "warmup": "Steps of linear warmup.",
    "decay_frac": "Fraction of the steps, at the end, that decay to min_lr.",
    "weight_decay": "AdamW weight decay.",
    "betas": "AdamW betas, as JSON [b1, b2].",
    "grad_clip": "Clip the gradient norm to this (0: no clipping).",
    "dtype": "float32 or bfloat16 weights.",
    "grad_checkpoint": "Recompute activations in the backward pass (less memory).",
    "eval_every": "Evaluate every N steps and at the end (0: never).",
    "eval_batches": "Batches per evaluation.",
    "save_every": "Write a checkpoint every N steps and at the end.",
    "keep": "Checkpoints kept (0: all).",
    "seed": "Seed of the initial weights and the data order.",
    "plot": "Write training.png at the end (needs matplotlib).",
    "tensor_parallel": "Split the model over all processes instead of the batch.",
}

_KIND = {int: "an integer", bool: "true or false", str: "a string"}
# config.json sizes a model spec may set: positive integers
MODEL_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "vocab_size", "max_position_embeddings")


def _is(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _float(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def model_dims(spec: dict) -> dict:
    """The config fields of ``cfg.model``: a named shape and its overrides, or fields."""
    from .random_model import SHAPES

    spec = dict(spec)
    shape = spec.pop("shape", None)
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"model: unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}.")
    dims = {**SHAPES[shape], **spec} if shape else spec
    for k in MODEL_SIZES:
        if k in dims and dims[k] is not None and not (_is(dims[k], int) and dims[k] >= 1):
            raise ValueError(f"model: {k} must be an integer >= 1, got {dims[k]!r}.")
    return dims


def wsd_schedule(cfg: TrainConfig):
    """Warmup → stable → (cosine) decay to ``min_lr`` over the last ``decay_frac``."""
    decay_start = int(cfg.iters * (1 - cfg.decay_frac))

    def lr(step):
        step = step.astype(mx.float32) if isinstance(step, mx.array) else mx.array(step, mx.float32)
        warm = cfg.lr * mx.minimum(step + 1, cfg.warmup) / max(cfg.warmup, 1)
        frac = mx.clip((step - decay_start) / max(cfg.iters - decay_start, 1), 0.0, 1.0)
        decay = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + mx.cos(math.pi * frac))
        return mx.where(step < cfg.warmup, warm, mx.where(step < decay_start, cfg.lr, decay))

    return lr


def init_model(cfg: TrainConfig) -> Model:
    """A new model from ``cfg.model`` (initializer_range 0.02), or ``init_from``,
    optionally upcycled by layer duplication."""
    from .loading import load_model
    from .random_model import hf_config

    if cfg.init_from:
        model = load_model(cfg.init_from, dtype="float32")
        check_training_fits(model.args, cfg)
    else:
        dims = model_dims(cfg.model)
        required = [f.name for f in fields(ModelArgs) if f.default is MISSING]
        if missing := [k for k in required if k not in dims and k != "model_type"]:
            raise ValueError(f"model: missing {', '.join(missing)}; give a shape "
                             f"(e.g. {{\"shape\": \"tiny\"}}) or every size.")
        args = ModelArgs.from_dict({"model_type": "ouro", "total_ut_steps": cfg.ut_steps,
                                    **dims})
        check_training_fits(args, cfg)  # before hf_config's per-layer lists, too
        config = hf_config(dims, total_ut_steps=cfg.ut_steps)
        config.update(dims)
        model = Model(ModelArgs.from_dict(config))
        std = config.get("initializer_range", 0.02)
        key = mx.random.key(cfg.seed)
        params = dict(tree_flatten(model.parameters()))
        keys = mx.random.split(key, len(params))
        new = {}
        for k_, (name, p) in zip(keys, sorted(params.items())):
            if "norm" in name:
                new[name] = mx.ones_like(p)
            elif name.endswith("bias"):
                new[name] = mx.zeros_like(p)
            else:
                new[name] = std * mx.random.normal(p.shape, key=k_)
        model.update(tree_unflatten(list(new.items())))
    if cfg.upcycle > 1:
        model = upcycle(model, cfg.upcycle)
    model.set_dtype(mx.float32 if cfg.dtype == "float32" else mx.bfloat16)
    mx.eval(model.parameters())
    return model


def check_training_fits(args: ModelArgs, cfg: TrainConfig) -> None:
    """Refuse a model whose weights, gradients and two AdamW moments (16 bytes a
    parameter in float32) exceed the machine's memory, before allocating any."""
    from .limits import check_fits
    from .model import estimate_model_bytes

    if cfg.upcycle > 1:
        args = ModelArgs.from_dict({**asdict(args),
                                    "num_hidden_layers": args.num_hidden_layers * cfg.upcycle})
    per_param = 16 if cfg.dtype == "float32" else 8
    check_fits(estimate_model_bytes(args, per_param), "Training this model")


def upcycle(model: Model, factor: int) -> Model:
    """Duplicate every layer ``factor`` times in place (layer i → i, i, ...), as the
    paper made Ouro-2.6B's 48 layers from Ouro-1.4B's 24."""
    import copy

    args = ModelArgs.from_dict({**asdict(model.args),
                                "num_hidden_layers": model.args.num_hidden_layers * factor})
    bigger = Model(args)
    bigger.model.embed_tokens = model.model.embed_tokens
    bigger.model.norm = model.model.norm
    bigger.model.early_exit_gate = model.model.early_exit_gate
    bigger.lm_head = model.lm_head
    bigger.model.layers = [copy.deepcopy(layer) for layer in model.layers for _ in range(factor)]
    return bigger


def checkpoint_config(model: Model) -> dict:
    from .random_model import hf_config

    a = model.args
    dims = {k: getattr(a, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                       "num_key_value_heads", "head_dim", "intermediate_size",
                                       "vocab_size", "max_position_embeddings", "rope_theta",
                                       "rms_norm_eps")}
    return hf_config(dims, total_ut_steps=a.total_ut_steps)


# What a run writes in its --out directory (its manifest names these patterns).
RUN_FILES = ["latest", "history.jsonl", "training.png", "ckpt-*", ".ckpt-*",
             ".latest.tmp-*", ".history.tmp-*", "training.tmp.png"]


def save_checkpoint(out: Path, step: int, model: Model, opt: optim.Optimizer,
                    position: Position, cfg: TrainConfig, tokenizer_dir: str | None,
                    tensors: tuple[dict, dict] | None = None) -> Path:
    """Write ``out/ckpt-STEP`` atomically and point ``out/latest`` at it.
    ``tensors``: (parameters, optimizer state) as flat dicts, when they differ from
    the model's own (gathered tensor-parallel shards)."""
    model.check_unfused("save")
    params, opt_state = tensors or (dict(tree_flatten(model.parameters())),
                                    dict(tree_flatten(opt.state)))
    from .loading import copy_support_files, write_errors
    from .outputs import write_manifest

    if bad := [k for k, v in params.items() if not mx.all(mx.isfinite(v)).item()]:
        raise NonFiniteLoss(  # never save (or point latest at) broken weights
            f"Weights are not finite after step {step} ({bad[0]}, {len(bad)} tensor(s)); "
            f"stopping without saving. {kept(out)} (lower lr or check the data)."
        )
    dest = out / f"ckpt-{step:07d}"
    tmp = out / f".ckpt-{step:07d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    nbytes = sum(v.nbytes for v in params.values()) + sum(v.nbytes for v in opt_state.values())
    try:
        tmp.mkdir(parents=True)
        # MLX reports a full disk as a RuntimeError: one OSError naming the checkpoint
        with write_errors(dest, nbytes):
            for name, tensors_ in (("model.safetensors", params),
                                   ("optimizer.safetensors", opt_state)):
                mx.save_safetensors(str(tmp / name), tensors_, metadata={"format": "pt"}
                                    if name == "model.safetensors" else None)
                _check_complete(tmp / name)
            (tmp / "config.json").write_text(json.dumps(checkpoint_config(model), indent=2))
            state = {"step": step, "position": asdict(position), "config": _resume_view(cfg)}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            if tokenizer_dir:
                copy_support_files(Path(tokenizer_dir), tmp)
            for f in tmp.iterdir():  # make the data durable before the rename
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            write_manifest(out, "train", RUN_FILES)
    except BaseException as e:  # a full disk, Ctrl-C: no partial checkpoint, latest unchanged
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not e.filename:
            raise OSError(e.errno, e.strerror or str(e), str(dest)) from None
        raise
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    latest_tmp = out / f".latest.tmp-{os.getpid()}"
    try:
        latest_tmp.write_text(dest.name)
    except OSError:
        latest_tmp.unlink(missing_ok=True)
        raise
    os.replace(latest_tmp, out / "latest")
    old = sorted(out.glob("ckpt-*"))[: -cfg.keep] if cfg.keep > 0 else []
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return dest


def _check_complete(path: Path) -> None:
    """mx.save_safetensors does not report a short write (a full disk): compare the
    file's size with the end of the last tensor its header names."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        try:
            header = json.loads(f.read(n)) if 0 < n < 1 << 30 else None
        except ValueError:
            header = None
    ends = [v["data_offsets"][1] for k, v in (header or {}).items() if k != "__metadata__"]
    if header is None or path.stat().st_size < 8 + n + max(ends, default=0):
        raise OSError(errno.ENOSPC, "written incompletely (is the disk full?)", str(path))


def kept(out: Path) -> str:
    """What a stopped run leaves: the checkpoint ``latest`` names, or none."""
    latest = out / "latest"
    if latest.exists():
        return f"The last good checkpoint is kept: {out / latest.read_text().strip()}"
    return f"No checkpoint was written to {out}"


def _resume_view(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    return {k: d[k] for k in TrainConfig.RESUME_KEYS}


def load_checkpoint(out: Path, cfg: TrainConfig, log=print
                    ) -> tuple[Path, dict, dict, dict] | None:
    """(directory, trainer state, weights, optimizer state) of the checkpoint
    ``out/latest`` names; when that one is damaged (a truncated file, corrupt JSON),
    the newest older one that loads, with a note. None for a new run."""
    latest = out / "latest"
    if not latest.exists():
        return None
    name = latest.read_text(errors="replace").strip()
    candidates = sorted((p for p in out.glob("ckpt-*") if p.name < name), reverse=True)
    if re.fullmatch(r"ckpt-\d+", name):
        candidates.insert(0, out / name)
    else:
        log(f"skipping {latest}: it names {name[:40]!r}, not a checkpoint of this run")
        candidates = sorted(out.glob("ckpt-*"), reverse=True)
    for ckpt in candidates:
        try:
            state = json.loads((ckpt / "trainer_state.json").read_text())
            state["position"] = Position(**state["position"])
            state["step"], saved = int(state["step"]), dict(state["config"])
            weights = dict(mx.load(str(ckpt / "model.safetensors")))
            opt_state = dict(mx.load(str(ckpt / "optimizer.safetensors")))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            log(f"skipping {ckpt}: damaged ({_first_line(e)}); trying an older checkpoint")
            continue
        now = _resume_view(cfg)
        if diff := [k for k in TrainConfig.RESUME_KEYS if saved.get(k) != now.get(k)]:
            raise ValueError(
                f"Cannot resume {ckpt}: the config differs in {', '.join(diff)} "
                f"(saved {[saved.get(k) for k in diff]}, now {[now.get(k) for k in diff]}). "
                "Use another --out or the original settings."
            )
        return ckpt, state, weights, opt_state
    raise ValueError(f"No usable checkpoint in {out} (see above); "
                     "use another --out, or remove the damaged ones to start over.")


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def read_history(path: Path) -> list[dict]:
    """The rows of ``history.jsonl``; a line cut short by a kill is left out."""
    rows = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def remove_stale(out: Path) -> None:
    """Temporary checkpoints and ``latest`` files left by killed runs."""
    for p in out.glob(".*.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process
    return True


class NonFiniteLoss(RuntimeError):
    pass


def train(cfg: TrainConfig, *, tokenizer_dir: str | None = None, log=print) -> dict:
    """Run (or resume) training; returns the final metrics. Ctrl-C ends the step in
    flight, saves it and raises :class:`TrainingInterrupted` (a KeyboardInterrupt);
    running again resumes there."""
    with StopRequest() as stop:
        return _train(cfg, tokenizer_dir, log, stop)


def _train(cfg: TrainConfig, tokenizer_dir: str | None, log, stop: StopRequest) -> dict:
    cfg.validate()
    world = mx.distributed.init()
    rank, size = world.rank(), world.size()
    out = Path(cfg.out)
    data = PackedDataset(cfg.data)
    val = PackedDataset(cfg.val_data) if cfg.val_data else None

    model = init_model(cfg)
    tp = TensorParallel(model, world) if cfg.tensor_parallel and size > 1 else None
    if tp and rank == 0:
        log(f"tensor parallel over {size} processes: {len(tp.axis)} parameters split")
    elif size > 1 and rank == 0:
        log(f"data parallel over {size} processes")
    opt = optim.AdamW(learning_rate=wsd_schedule(cfg), betas=tuple(cfg.betas),
                      weight_decay=cfg.weight_decay)
    step, position = 0, Position()
    if rank == 0 and out.is_dir():
        remove_stale(out)
    resumed = load_checkpoint(out, cfg, log)
    if resumed:
        ckpt, state, weights, opt_state = resumed
        model.load_weights(list((tp.local(weights) if tp else weights).items()))
        opt.init(model.trainable_parameters())
        opt.state = tree_unflatten(list((tp.local(opt_state) if tp else opt_state).items()))
        step, position = state["step"], state["position"]
        log(f"resumed from {ckpt} at step {step}")
        if rank == 0 and (out / "history.jsonl").exists():  # drop steps after the checkpoint
            keep = [r for r in read_history(out / "history.jsonl") if r["step"] <= step]
            tmp = out / f".history.tmp-{os.getpid()}"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, out / "history.jsonl")
    elif rank == 0 and (out / "history.jsonl").exists():  # a run killed before its first save
        (out / "history.jsonl").unlink()
    if cfg.loss == "stage2":
        model.freeze()
        model.model.early_exit_gate.unfreeze()
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])

    def loss_fn(m, batch, mask, T):
        kw = {"ut_steps": T}
        if cfg.loss == "stage1":
            kw["beta"] = cfg.beta
        elif cfg.loss == "stage2":
            kw.update(k=cfg.stage2_k, gamma=cfg.stage2_gamma)
        return MASKED_LOSSES[cfg.loss](m, batch, mask, **kw)

    value_and_grad = nn.value_and_grad(model, loss_fn)

    # tensor parallel: every process reads the same batches (the model is split instead)
    data_rank, data_size = (0, 1) if tp else (rank, size)
    stream = batches(data, cfg.batch_size, seed=cfg.seed, position=position, rank=data_rank,
                     world_size=data_size)
    history_file = out / "history.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    progress = _progress(cfg.iters, step, rank)
    last = {}
    tic = time.perf_counter()
    tokens_seen = 0
    while step < cfg.iters:
        T = cfg.steps_at(step)
        # Token-weighted sums over micro-batches and ranks: the update equals one
        # step on the concatenated global batch.
        grads_sum, loss_sum, ntok_sum = None, 0.0, 0
        for _ in range(cfg.grad_accum):
            tokens, mask, position = next(stream)
            (loss, ntoks), grads = value_and_grad(model, mx.array(tokens),
                                                  mx.array(mask[:, 1:]), T)
            grads = tree_map(lambda g: g * ntoks, grads)
            grads_sum = grads if grads_sum is None else tree_map(mx.add, grads_sum, grads)
            loss_sum = loss_sum + loss * ntoks
            ntok_sum = ntok_sum + ntoks
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        if tp:  # same batch everywhere: shard gradients are local, the rest identical
            total = ntok_sum
            grads, grad_norm = tp.clip_grad_norm(tree_map(lambda g: g / total, grads_sum),
                                                 max_norm)
            loss = loss_sum / total
        else:
            total = mx.distributed.all_sum(ntok_sum) if size > 1 else ntok_sum
            grads = tree_map(lambda g: g * size / total, nn.average_gradients(grads_sum))
            grads, grad_norm = optim.clip_grad_norm(grads, max_norm)
            loss = (mx.distributed.all_sum(loss_sum) if size > 1 else loss_sum) / total
        mx.eval(loss, grad_norm)
        value = loss.item()
        if not (math.isfinite(value) and math.isfinite(grad_norm.item())):
            raise NonFiniteLoss(  # before the update: the weights stay the last good ones
                f"Loss {value}, gradient norm {grad_norm.item()} at step {step + 1}; "
                f"stopping. {kept(out)} (lower lr or check the data)."
            )
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        step += 1
        tokens_seen += int(total.item())
        last = {"step": step, "loss": value, "lr": opt.learning_rate.item(),
                "ut_steps": T, "tokens_per_s": tokens_seen / (time.perf_counter() - tic)}
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.iters):
            last.update(evaluate(model, val or data, cfg, T))
        if rank == 0:
            with open(history_file, "a") as f:
                f.write(json.dumps(last) + "\n")
            progress(step, value)
        saved = step % cfg.save_every == 0 or step == cfg.iters
        stopping = step < cfg.iters and stop.everywhere(size)  # the last step just ends
        if saved or stopping:
            tensors = tp.gather(model, opt) if tp else None  # a collective: every rank
            if rank == 0:
                save_checkpoint(out, step, model, opt, position, cfg, tokenizer_dir, tensors)
        if stopping:
            progress.close()
            raise TrainingInterrupted(
                f"interrupted at step {step}; saved {out / f'ckpt-{step:07d}'}", step,
                out / f"ckpt-{step:07d}")
    if rank == 0 and cfg.plot:
        plot_history(history_file, out / "training.png")
    return last


class TensorParallel:
    """Bookkeeping for a model split with :meth:`Model.shard`: which parameters are
    shards and along which axis, so that gradients clip by the global norm and
    checkpoints hold whole tensors."""

    def __init__(self, model: Model, group: mx.distributed.Group):
        self.group, self.rank, self.size = group, group.rank(), group.size()
        full = {k: v.shape for k, v in tree_flatten(model.parameters())}
        model.shard(group)
        self.axis = {}
        for k, v in tree_flatten(model.parameters()):
            if v.shape != full[k]:
                self.axis[k] = next(i for i, (a, b) in enumerate(zip(v.shape, full[k])) if a != b)

    def _axis(self, key: str) -> int | None:
        # optimizer state keys are a parameter's key plus ".m" / ".v"
        return self.axis.get(key, self.axis.get(key.rsplit(".", 1)[0]))

    def local(self, tensors: dict) -> dict:
        """This rank's part of whole tensors (a checkpoint's weights or optimizer)."""
        out = {}
        for k, v in tensors.items():
            axis = self._axis(k)
            out[k] = v if axis is None else mx.split(v, self.size, axis=axis)[self.rank]
        return out

    def gather(self, model: Model, opt: optim.Optimizer) -> tuple[dict, dict]:
        def whole(tree):
            out = {}
            for k, v in tree_flatten(tree):
                axis = self._axis(k)
                if axis is None:
                    out[k] = v
                else:  # all_gather concatenates along axis 0
                    out[k] = mx.swapaxes(mx.distributed.all_gather(
                        mx.swapaxes(v, 0, axis), group=self.group), 0, axis)
            mx.eval(out)
            return out

        return whole(model.parameters()), whole(opt.state)

    def clip_grad_norm(self, grads, max_norm: float):
        flat = tree_flatten(grads)
        sq = [(g.astype(mx.float32) ** 2).sum() for k, g in flat if k in self.axis]
        rest = [(g.astype(mx.float32) ** 2).sum() for k, g in flat if k not in self.axis]
        norm = mx.sqrt(mx.distributed.all_sum(sum(sq), group=self.group) + sum(rest))
        scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
        return tree_map(lambda g: g * scale, grads), norm


def evaluate(model: Model, data: PackedDataset, cfg: TrainConfig, T: int) -> dict:
    """Per-step losses and mean exit distribution on a few fixed batches."""
    reports = []
    it = batches(data, min(cfg.batch_size, len(data)), seed=cfg.seed + 1)
    for _ in range(max(1, cfg.eval_batches)):
        tokens, mask, _ = next(it)
        reports.append(loss_report(model, mx.array(tokens), mx.array(mask[:, 1:]), ut_steps=T))
    n = len(reports)
    return {
        "eval_step_losses": [sum(r["step_losses"][t] for r in reports) / n for t in range(T)],
        "eval_exit_dist": [sum(r["exit_dist"][t] for r in reports) / n for t in range(T)],
        "eval_expected_loops": sum(r["expected_loops"] for r in reports) / n,
    }


def _progress(total: int, start: int, rank: int):
    """``update(step, loss)`` of a tqdm bar on rank 0, with ``update.close()``."""
    def update(step, loss):
        if bar is None:
            return
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if step >= total:
            bar.close()

    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc="training", unit="step")
    update.close = bar.close if bar is not None else (lambda: None)
    return update


def plot_history(history: Path, png: Path) -> Path | None:
    """Loss and expected loop depth over training, as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install matplotlib for training.png)")
        return None
    rows = read_history(history)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax[0].set(xlabel="step", ylabel="training loss", title="loss")
    ev = [r for r in rows if "eval_expected_loops" in r]
    ax[1].plot([r["step"] for r in ev], [r["eval_expected_loops"] for r in ev], marker="o")
    ax[1].set(xlabel="step", ylabel="E[loops]", title="mean exit depth")
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    try:
        fig.savefig(tmp)
    except OSError:  # a full disk: no partial file left behind
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    os.replace(tmp, png)
    return png
