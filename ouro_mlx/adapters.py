"""Adapters for finetuning Ouro: mlx-lm's LoRA / DoRA / full layers, and per-loop LoRA.

A *shared* adapter is mlx-lm's own (``mlx_lm.tuner.utils.linear_to_lora_layers``):
one (A, B) per projection, applied at every loop step, saved in mlx-lm's format so
``mlx_lm.generate --adapter-path`` loads it.

A *per-loop* adapter (``LoopLoRALinear``) gives loop step t its own (A_t, B_t) over the
shared base weight. The loop step reaches it the way the cache slot does: ``loop_step``
passes ``t`` to each layer, whose attention and MLP call the projections named in their
``loop_keys`` with it (see ``ouro_mlx.model.LoopAware``). No global state.

Files (in an adapter directory), mlx-lm's layout:

- ``adapters.safetensors``: the trainable parameters under their model paths. Shared
  LoRA: ``model.layers.{l}.self_attn.q_proj.lora_a`` [in, r] and ``.lora_b`` [r, out]
  (DoRA adds ``.m`` [out]). Per-loop LoRA: the same keys with a leading loop axis,
  ``lora_a`` [T, in, r] and ``lora_b`` [T, r, out], step t's adapter at index t.
  ``full``: the converted layers' own weights (and a trained gate's).
- ``exit_gate.safetensors``: with ``train_gate`` (LoRA/DoRA) the trained exit gate,
  ``model.early_exit_gate.weight`` [1, H] and ``.bias`` [1], kept apart because
  mlx-lm's ``load_adapters`` takes only adapter leaves from adapters.safetensors: stock
  ``mlx_lm.generate --adapter-path`` loads the directory (with the base gate); ouro-mlx
  applies the trained one. It is also a gate file for ``--exit-gate``. Adapters saved
  before kept the gate in adapters.safetensors; they still load here.
- ``adapter_config.json``: mlx-lm's keys (``fine_tune_type``, ``num_layers``,
  ``lora_parameters: {rank, scale, dropout[, keys]}``) plus ``per_loop_adapters``
  (bool), ``ut_steps`` (T, with per-loop adapters) and ``train_gate`` (bool).

An adapter directory is untrusted input: its config is checked field by field, its
tensors must be exactly what the config builds, and no file outside it is read.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
FINE_TUNE_TYPES = ("lora", "dora", "full")
LORA_DEFAULTS = {"rank": 8, "dropout": 0.0, "scale": 20.0}
# LoRA scales in use are ~1-100 (mlx-lm's 20, alpha/rank elsewhere); far beyond, the
# adapter's term swamps the model or overflows float16/bfloat16 to inf.
MAX_LORA_SCALE = 10_000
ATTN_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_KEYS = ("gate_proj", "up_proj", "down_proj")
LAYER_KEYS = tuple(f"self_attn.{k}" for k in ATTN_KEYS) + tuple(f"mlp.{k}" for k in MLP_KEYS)
GATE = "model.early_exit_gate"
GATE_FILE = "exit_gate.safetensors"


class LoopLoRALinear(nn.Module):
    """LoRA with one (A_t, B_t) per loop step over one shared (plain or quantized)
    linear: ``y = W x + scale · (x A_t) B_t``. ``lora_a`` [T, in, r] starts as the
    same mlx-lm draw for every step and ``lora_b`` [T, r, out] at zero, so a fresh
    per-loop adapter equals a fresh shared one."""

    @staticmethod
    def from_base(linear: nn.Module, ut_steps: int, r: int = 8, dropout: float = 0.0,
                  scale: float = 20.0) -> "LoopLoRALinear":
        output_dims, input_dims = linear.weight.shape
        if isinstance(linear, nn.QuantizedLinear):
            input_dims = input_dims * 32 // linear.bits
        lora = LoopLoRALinear(input_dims, output_dims, ut_steps, r, dropout, scale)
        lora.linear = linear
        return lora

    def __init__(self, input_dims: int, output_dims: int, ut_steps: int, r: int = 8,
                 dropout: float = 0.0, scale: float = 20.0, bias: bool = False):
        super().__init__()
        self.linear = nn.Linear(input_dims, output_dims, bias=bias)
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        self.ut_steps = ut_steps
        bound = 1 / math.sqrt(input_dims)  # mlx-lm's LoRALinear init
        a = mx.random.uniform(low=-bound, high=bound, shape=(input_dims, r))
        self.lora_a = mx.repeat(a[None], ut_steps, axis=0)
        self.lora_b = mx.zeros((ut_steps, r, output_dims))

    def __call__(self, x: mx.array, t: int) -> mx.array:
        if t >= self.ut_steps:
            raise ValueError(f"These per-loop adapters hold {self.ut_steps} loop steps; loop "
                             f"step {t + 1} has none (run with --ut-steps {self.ut_steps} "
                             "or fewer).")
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a[t]) @ self.lora_b[t]
        return y + (self.scale * z).astype(x.dtype)


def lora_settings(params: Any, where: str, model: nn.Module) -> dict:
    """``lora_parameters`` with mlx-lm's defaults filled in, each field checked;
    ``where`` names the source in messages."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}: lora_parameters must be an object, got {params!r}.")
    out = {**LORA_DEFAULTS, **params}
    if unknown := sorted(set(out) - {"rank", "scale", "dropout", "keys"}):
        raise ValueError(f"{where}: lora_parameters has unknown field {unknown[0]!r}.")
    a = model.args
    cap = max(a.hidden_size, a.intermediate_size)
    r = out["rank"]
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= cap:
        raise ValueError(f"{where}: lora_parameters.rank must be an integer in [1, {cap}], "
                         f"got {r!r}.")
    s = out["scale"]
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        raise ValueError(f"{where}: lora_parameters.scale must be a finite number, got {s!r}.")
    if abs(s) > MAX_LORA_SCALE:  # finite yet overflowing: inf/NaN outputs, or noise
        raise ValueError(f"{where}: lora_parameters.scale {s!r} is far outside what "
                         f"adapters use (|scale| <= {MAX_LORA_SCALE:,}; mlx-lm's default "
                         f"is {LORA_DEFAULTS['scale']:g}).")
    d = out["dropout"]
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
        raise ValueError(f"{where}: lora_parameters.dropout must be in [0, 1), got {d!r}.")
    keys = out.get("keys")
    if keys is not None:
        if (not isinstance(keys, list) or not keys
                or any(k not in LAYER_KEYS for k in keys) or len(set(keys)) != len(keys)):
            raise ValueError(f"{where}: lora_parameters.keys must be a list of distinct "
                             f"layer projections ({', '.join(LAYER_KEYS)}), got {keys!r}.")
    out["scale"], out["dropout"] = float(s), float(d)
    return out


def check_num_layers(n: Any, model: nn.Module, where: str) -> int:
    L = len(model.layers)
    if isinstance(n, bool) or not isinstance(n, int) or not (n == -1 or 1 <= n <= L):
        raise ValueError(f"{where}: num_layers must be -1 (all) or in [1, {L}], got {n!r}.")
    return n


def adapted_layers(model: nn.Module, num_layers: int) -> list:
    return list(model.layers) if num_layers == -1 else list(model.layers[-num_layers:])


def apply_adapters(
    model: nn.Module,
    *,
    fine_tune_type: str = "lora",
    num_layers: int = -1,
    lora_parameters: dict | None = None,
    per_loop: bool = False,
    train_gate: bool = False,
    ut_steps: int | None = None,
) -> None:
    """Freeze ``model`` and make its last ``num_layers`` layers (-1: all) trainable as
    ``fine_tune_type``: "lora"/"dora" wrap their projections (mlx-lm's layers, or with
    ``per_loop`` a ``LoopLoRALinear`` per projection holding ``ut_steps`` adapters,
    default ``model.ut_steps``), "full" unfreezes them. ``train_gate`` also unfreezes
    the exit gate. A quantized base gives QLoRA."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from .model import check_ut_steps

    where = "adapters"
    model.check_unfused("add adapters to")
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise ValueError(f"{where}: fine_tune_type must be one of {', '.join(FINE_TUNE_TYPES)},"
                         f" got {fine_tune_type!r}.")
    check_num_layers(num_layers, model, where)
    if per_loop and fine_tune_type != "lora":
        raise ValueError(f"per-loop adapters are LoRA only; fine_tune_type {fine_tune_type} "
                         "is shared by every loop step.")
    training = model.training
    model.freeze()
    layers = adapted_layers(model, num_layers)
    if fine_tune_type == "full":
        for layer in layers:
            layer.unfreeze()
    else:
        params = lora_settings(lora_parameters, where, model)
        if per_loop:
            T = check_ut_steps(model.ut_steps if ut_steps is None else ut_steps)
            keys = params.get("keys") or LAYER_KEYS
            for layer in layers:
                for key in keys:
                    block_name, name = key.split(".")
                    block = layer[block_name]
                    block[name] = LoopLoRALinear.from_base(
                        block[name], T, params["rank"], params["dropout"], params["scale"])
                    block.loop_keys = block.loop_keys | {name}
        else:
            linear_to_lora_layers(model, num_layers, params, use_dora=fine_tune_type == "dora")
    if train_gate:
        model.model.early_exit_gate.unfreeze()
    model.train(training)  # new modules (dropout) follow the model's mode


def is_json_value(v: Any) -> bool:
    if v is None or isinstance(v, (str, bool, int)):
        return True
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (list, tuple)):
        return all(is_json_value(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and is_json_value(x) for k, x in v.items())
    return False


def adapter_config(args_dict: dict) -> dict:
    """The adapter_config.json for a run with these settings (a trainer's flags or
    YAML): mlx-lm's keys with mlx-lm's defaults, ours (``per_loop_adapters``,
    ``ut_steps``, ``train_gate``), and every other JSON-representable setting kept
    for the record (paths as strings)."""
    config = {}
    for k, v in args_dict.items():
        if isinstance(v, Path):
            v = str(v)
        if is_json_value(v):
            config[k] = v
    config.setdefault("fine_tune_type", "lora")
    config.setdefault("num_layers", -1)
    config["lora_parameters"] = {**LORA_DEFAULTS, **(config.get("lora_parameters") or {})}
    per_loop = bool(config.pop("per_loop", False) or config.get("per_loop_adapters", False))
    config["per_loop_adapters"] = per_loop
    config["train_gate"] = bool(config.get("train_gate", False))
    if not per_loop and "ut_steps" in config and config["ut_steps"] is None:
        config.pop("ut_steps")
    return config


def loop_adapter_steps(model: nn.Module) -> int | None:
    """T of the model's per-loop adapters, None without any."""
    for _, m in model.named_modules():
        if isinstance(m, LoopLoRALinear):
            return m.ut_steps
    return None


def save_adapters(adapter_dir: str | Path, model: nn.Module, config: dict, *,
                  filename: str = ADAPTER_FILE) -> Path:
    """Write the model's trainable parameters to ``adapter_dir/filename`` and
    ``config`` (see ``adapter_config``; ``per_loop_adapters``, ``ut_steps`` and
    ``train_gate`` corrected from the model itself) to adapter_config.json. Each file
    is written beside itself and renamed over the old one, so a run killed during a
    save leaves the previous adapters loadable. Returns the adapters file."""
    adapter_dir = Path(adapter_dir)
    if os.path.basename(filename) != filename or not filename.endswith(".safetensors"):
        raise ValueError(f"adapter filename {filename!r} must be a plain *.safetensors name.")
    adapter_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    config = dict(config)
    T = loop_adapter_steps(model)
    config["per_loop_adapters"] = T is not None
    if T is not None:
        config["ut_steps"] = T
    config["train_gate"] = f"{GATE}.weight" in weights
    text = json.dumps(dict(sorted(config.items())), indent=4) + "\n"
    file = adapter_dir / filename
    if config["train_gate"] and config.get("fine_tune_type", "lora") != "full":
        gate = {k: weights.pop(k) for k in (f"{GATE}.weight", f"{GATE}.bias")}
        replace_atomically(adapter_dir / GATE_FILE, lambda tmp: mx.save_safetensors(
            str(tmp), gate, metadata={"format": "ouro-mlx exit gate", "threshold": "none"}))
    replace_atomically(file, lambda tmp: mx.save_safetensors(str(tmp), weights,
                                                             metadata={"format": "mlx"}))
    replace_atomically(adapter_dir / CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return file


def replace_atomically(file: Path, write) -> None:
    """``write(tmp)`` a temporary file beside ``file`` (same suffix), flush it to disk,
    then rename it over ``file``."""
    tmp = file.with_name(f".{file.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{file.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_adapter_config(adapter_dir: Path, model: nn.Module) -> dict:
    """adapter_config.json of ``adapter_dir``, every field the loader uses checked."""
    from .untrusted import read_json_object
    from .model import check_ut_steps

    file = inside(adapter_dir, CONFIG_FILE)
    config = read_json_object(file)
    where = str(file)
    ftype = config.get("fine_tune_type", "lora")
    if ftype not in FINE_TUNE_TYPES:
        raise ValueError(f"{where}: fine_tune_type must be one of {', '.join(FINE_TUNE_TYPES)}"
                         f", got {ftype!r}.")
    if "num_layers" not in config:
        raise ValueError(f"{where}: num_layers is missing.")
    check_num_layers(config["num_layers"], model, where)
    for name in ("per_loop_adapters", "train_gate"):
        if not isinstance(config.get(name, False), bool):
            raise ValueError(f"{where}: {name} must be true or false, got {config[name]!r}.")
    per_loop = config.get("per_loop_adapters", False)
    if ftype != "full":
        config["lora_parameters"] = lora_settings(config.get("lora_parameters"), where, model)
    if per_loop:
        if ftype != "lora":
            raise ValueError(f"{where}: per_loop_adapters needs fine_tune_type lora, "
                             f"got {ftype!r}.")
        try:
            check_ut_steps(config.get("ut_steps"), "ut_steps")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return config


def inside(adapter_dir: Path, name: str) -> Path:
    """``adapter_dir/name`` if it is a regular file lying inside the directory (no
    link out of it)."""
    from .untrusted import lies_inside

    file = adapter_dir / name
    if not file.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no {name}; is it an adapter directory?")
    if not lies_inside(adapter_dir, name):
        raise ValueError(f"{file} links outside its adapter directory; refusing to read it.")
    return file


def load_adapters(model: nn.Module, adapter_path: str | Path) -> dict:
    """Apply the adapters in directory ``adapter_path`` to ``model`` (shared or
    per-loop LoRA, DoRA, full, a trained gate) and return their checked config."""
    from .untrusted import check_tensor

    adapter_dir = Path(adapter_path).expanduser()
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"--adapter-path {adapter_path}: no such directory.")
    config = read_adapter_config(adapter_dir, model)
    file = inside(adapter_dir, ADAPTER_FILE)
    try:
        weights = mx.load(str(file))
    except Exception as e:  # MLX raises bare RuntimeError/ValueError on a damaged file
        raise ValueError(f"Cannot read {file} (truncated or corrupt?): {e}") from None
    if not isinstance(weights, dict):
        raise ValueError(f"{file} is not a safetensors file.")
    if (config.get("train_gate") and config.get("fine_tune_type", "lora") != "full"
            and (adapter_dir / GATE_FILE).exists()):
        weights.update(read_gate_file(adapter_dir, weights))
    per_loop = config.get("per_loop_adapters", False)
    apply_adapters(
        model,
        fine_tune_type=config.get("fine_tune_type", "lora"),
        num_layers=config["num_layers"],
        lora_parameters=config.get("lora_parameters"),
        per_loop=per_loop,
        train_gate=config.get("train_gate", False),
        ut_steps=config["ut_steps"] if per_loop else None,
    )
    expected = dict(tree_flatten(model.trainable_parameters()))
    for name, w in weights.items():
        if name not in expected:
            raise ValueError(f"{file}: tensor {name} is not a parameter these adapters have "
                             f"({CONFIG_FILE} builds {len(expected)}).")
        check_tensor(file, name, w, expected[name].shape)
    if missing := sorted(set(expected) - set(weights)):
        raise ValueError(f"{file}: tensor {missing[0]} is missing "
                         f"({len(missing)} of {len(expected)} missing).")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return config


def read_gate_file(adapter_dir: Path, weights: dict) -> dict:
    """The two gate tensors of ``adapter_dir/exit_gate.safetensors`` (checked against
    the model with the rest), refusing any other tensor or a gate given twice."""
    file = inside(adapter_dir, GATE_FILE)
    try:
        gate = mx.load(str(file))
    except Exception as e:  # MLX raises bare RuntimeError/ValueError on a damaged file
        raise ValueError(f"Cannot read {file} (truncated or corrupt?): {e}") from None
    keys = {f"{GATE}.weight", f"{GATE}.bias"}
    if not isinstance(gate, dict) or set(gate) != keys:
        raise ValueError(f"{file}: expected exactly {', '.join(sorted(keys))}.")
    if keys & set(weights):
        raise ValueError(f"{file}: the gate is also in {ADAPTER_FILE}; keep one of them.")
    return gate


def has_per_loop_adapters(model: nn.Module) -> bool:
    return loop_adapter_steps(model) is not None
