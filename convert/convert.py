"""HF PyTorch-format Ouro checkpoints ↔ MLX directories.

Every option and the destination are checked before any work: a destination that is,
holds or lies inside the source (or the working directory) is refused, and --force
replaces only a directory ouro-mlx wrote (see ``ouro_mlx.outputs``). Both
directions write into a temporary directory beside the destination and rename it into
place at the end, so an interrupted run or a full disk leaves nothing half-written and
the previous destination intact, and neither ever modifies the source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tqdm import tqdm

from ..loading import (
    CONFIG_FILES,
    TOKENIZER_FILES,
    WEIGHT_PATTERNS,
    CheckpointError,
    atomic_directory,
    build_model,
    cast_floats,
    check_weights,
    copy_support_files,
    destination,
    parse_dtype,
    read_config,
    read_json_object,
    read_safetensors,
    resolve,
    weight_files,
    write_errors,
)
from ..limits import check_fits
from ..outputs import check_apart
from ..model import Model, ModelArgs, estimate_model_bytes
from .torch_io import read_state_dict, torch_files

# Default (group size, bits) per quantization mode, as mlx-lm's.
Q_MODES = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
# The (group sizes, bits) mx.quantize accepts per mode; tests check this against MLX.
Q_SUPPORTED = {
    "affine": ((32, 64, 128), (2, 3, 4, 5, 6, 8)),
    "mxfp4": ((32,), (4,)),
    "nvfp4": ((16,), (4,)),
    "mxfp8": ((32,), (8,)),
}
TORCH_DOWNLOAD = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]

# Fields of the released config.json files (spec §1.1) that an exported config keeps.
HF_FIXED = {
    "architectures": ["OuroForCausalLM"],
    "model_type": "ouro",
    "auto_map": {
        "AutoConfig": "configuration_ouro.OuroConfig",
        "AutoModel": "modeling_ouro.OuroModel",
        "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM",
    },
}
HF_DEFAULTS = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rope_scaling": None,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "use_cache": True,
    "use_sliding_window": False,
}


def quant_options(
    quantize: bool, q_bits: int | None, q_group_size: int | None, q_mode: str | None,
    mixed: bool,
) -> tuple[int, int, str]:
    """``(group_size, bits, mode)`` after checking them against what MLX supports;
    quantization options without ``quantize`` are refused, not ignored."""
    given = {"--q-bits": q_bits, "--q-group-size": q_group_size, "--q-mode": q_mode,
             "--mixed": mixed or None}
    if not quantize:
        if unused := [flag for flag, v in given.items() if v is not None]:
            need = "needs" if len(unused) == 1 else "need"
            raise ValueError(f"{', '.join(unused)} {need} -q/--quantize.")
        return 0, 0, ""
    mode = q_mode or "affine"
    if mode not in Q_MODES:
        raise ValueError(f"Unknown --q-mode {mode!r}; choose one of {', '.join(Q_MODES)}.")
    sizes, bit_widths = Q_SUPPORTED[mode]
    group_size = Q_MODES[mode][0] if q_group_size is None else q_group_size
    bits = Q_MODES[mode][1] if q_bits is None else q_bits
    if group_size not in sizes:
        raise ValueError(f"--q-group-size {group_size} is not supported by --q-mode {mode}; "
                         f"choose {_one_of(sizes)}.")
    if bits not in bit_widths:
        raise ValueError(f"--q-bits {bits} is not supported by --q-mode {mode}; "
                         f"choose {_one_of(bit_widths)}.")
    return group_size, bits, mode


def _one_of(values: tuple[int, ...]) -> str:
    *rest, last = map(str, values)
    return f"{', '.join(rest)} or {last}" if rest else last


def _read_source_weights(src: Path) -> dict[str, mx.array]:
    if src.is_file():
        return read_safetensors([src]) if src.suffix == ".safetensors" else read_state_dict(src)
    try:
        return read_safetensors(weight_files(src))
    except CheckpointError:
        files = torch_files(src)
        if not files:
            raise
    weights = {}
    for f in tqdm(files, desc="reading .bin", unit="file"):
        weights.update(read_state_dict(f))
    return weights


def _chat_end_id(tokenizer_dir: Path) -> int | None:
    file = tokenizer_dir / "tokenizer.json"
    if not file.exists():
        return None
    added = read_json_object(file).get("added_tokens", [])
    if not isinstance(added, list) or not all(isinstance(t, dict) for t in added):
        raise CheckpointError(f"{file}: added_tokens must be a list of objects.")
    for tok in added:
        if tok.get("content") == "<|im_end|>" and isinstance(tok.get("id"), int):
            return tok["id"]
    return None


def _write_generation_config(dst: Path, config: dict, chat_end: int | None) -> None:
    """Make chat turns stop at ``<|im_end|>`` in any tool that reads
    generation_config.json (mlx-lm does), not only at the config's eos."""
    file = dst / "generation_config.json"
    gen = json.loads(file.read_text()) if file.exists() else {}
    eos = gen.get("eos_token_id", config.get("eos_token_id", 0))
    eos = [eos] if isinstance(eos, int) else list(eos)
    if chat_end is not None and chat_end not in eos:
        eos.append(chat_end)
    gen.update(eos_token_id=eos, bos_token_id=config.get("bos_token_id", 0))
    file.write_text(json.dumps(gen, indent=2) + "\n")


def _quant_predicate(mixed: bool, group_size: int):
    def predicate(path: str, module) -> bool | dict:
        if "early_exit_gate" in path:
            return False  # the gate decides every token's depth
        if mixed and ("embed_tokens" in path or "lm_head" in path):
            return {"group_size": 64, "bits": 8, "mode": "affine"}
        return True

    return predicate


def _materialise(model: Model, desc: str) -> None:
    for _, v in tqdm(tree_flatten(model.parameters()), desc=desc, unit="tensor"):
        mx.eval(v)


def _logits(model: Model, vocab_size: int, n_tokens: int = 16) -> mx.array:
    ids = (mx.arange(n_tokens) * 7919 + 17) % vocab_size
    return model(ids[None])[0].astype(mx.float32)


def max_logit_diff(a: Model, b: Model, vocab_size: int, n_tokens: int = 16) -> float:
    """Largest |logit| difference of two models on a few fixed tokens, in float32."""
    la, lb = _logits(a, vocab_size, n_tokens), _logits(b, vocab_size, n_tokens)
    return (la - lb).abs().max().item()


# Tolerated |logit difference| between the written model and the converted one held in
# memory, relative to the largest |logit|, by the dtype they compute in. They hold the
# same weights, so any difference beyond rounding means the directory is wrong.
VERIFY_TOLERANCE = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}


@dataclass
class Verification:
    """What ``verify`` measured on a few fixed tokens: the written directory against the
    converted model held in memory (must agree within ``tolerance``), and, when the
    conversion was lossy on purpose (a cast, quantization), how far it moved from the
    source (reported, not judged: the error is the one asked for)."""

    diff: float
    tolerance: float
    dtype: str
    lossy: str | None = None
    drift: float | None = None
    same_top: int = 0
    positions: int = 0

    @property
    def ok(self) -> bool:
        return self.diff <= self.tolerance

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        line = (f"verify: {verdict} — largest |logit difference| written vs converted "
                f"{self.diff:.1e} ({self.dtype} tolerance {self.tolerance:.1e})")
        if self.lossy:
            line += (f"\nverify: {self.lossy} moves the logits by up to {self.drift:.3g}; "
                     f"the top token matches the source at {self.same_top} of "
                     f"{self.positions} positions")
        return line


def _verify(converted: Model, written: Model, vocab_size: int, source: Model | None = None,
            lossy: str | None = None) -> Verification:
    lc, lw = _logits(converted, vocab_size), _logits(written, vocab_size)
    dtype = str(converted.model.norm.weight.dtype).split(".")[-1]
    scale = max(1.0, lc.abs().max().item())
    tolerance = VERIFY_TOLERANCE.get(dtype, 1e-2) * scale
    v = Verification((lc - lw).abs().max().item(), tolerance, dtype)
    if source is not None and lossy:
        ls = _logits(source, vocab_size)
        v.lossy, v.drift = lossy, (ls - lw).abs().max().item()
        v.same_top = (ls.argmax(-1) == lw.argmax(-1)).sum().item()
        v.positions = ls.shape[0]
    return v


def _check_verified(v: Verification, dst: Path) -> Verification:
    if not v.ok:  # raised inside atomic_directory: dst keeps what it held
        raise ValueError(f"{str(v).replace(chr(10), '; ')}; {dst} was not written.")
    return v


def hf_to_mlx(
    hf_path: str | Path,
    mlx_path: str | Path,
    *,
    config_path: str | Path | None = None,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_mode: str | None = None,
    mixed: bool = False,
    dequantize: bool = False,
    force: bool = False,
    verify: bool = False,
    revision: str | None = None,
) -> Verification | None:
    """Convert an HF Ouro checkpoint (directory, repo id, or a raw ``.bin``/``.pt``
    file with ``config_path``) into an MLX directory; ``dequantize`` reads a quantized
    MLX directory instead, as mlx-lm's ``convert -d``. Every option is checked before
    any work; with ``verify`` the written model is run against the converted one and
    the source (a mismatch raises and writes nothing)."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    dtype = parse_dtype(dtype)
    group_size, bits, q_mode = quant_options(quantize, q_bits, q_group_size, q_mode, mixed)
    if quantize and dequantize:
        raise ValueError("-q/--quantize and -d/--dequantize exclude each other.")
    config_dir = Path(config_path).expanduser() if config_path else None
    if config_dir is not None and config_dir.is_file():
        config_dir = config_dir.parent
    dst = destination(mlx_path, "--mlx-path", force,
                      sources=[("--hf-path", hf_path), ("--config", config_dir)])
    src = Path(hf_path).expanduser()
    if not src.exists():
        src = resolve(hf_path, revision, CONFIG_FILES + TOKENIZER_FILES + WEIGHT_PATTERNS
                      + TORCH_DOWNLOAD)
    if src.is_file() and config_path is None:
        raise ValueError(f"{src} is a weights file; pass the model's config.json too.")
    meta_dir = config_dir or src
    if meta_dir.is_file():
        meta_dir = meta_dir.parent
    check_apart(dst, "--mlx-path", [("--hf-path", src), ("--config", meta_dir)])
    config = read_config(meta_dir)
    if "quantization" in config and not dequantize:
        raise CheckpointError(f"{meta_dir} is a quantized MLX checkpoint: pass "
                              "-d/--dequantize to write it dequantized.")
    if dequantize and "quantization" not in config:
        raise CheckpointError(f"-d/--dequantize: {meta_dir / 'config.json'} is not quantized.")
    source_config = dict(config)
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    args = _model_args(config, meta_dir)
    check_fits(estimate_model_bytes(args), f"The model in {meta_dir / 'config.json'}")
    if quantize:
        _check_quantizable(args, group_size)
    chat_end = _chat_end_id(meta_dir)

    with atomic_directory(dst, force=force, verb="convert") as tmp:
        model = _source_model(src, source_config, args)
        if dtype is not None:
            weights = cast_floats(dict(tree_flatten(model.parameters())), dtype)
            model.load_weights(list(weights.items()))
            config["torch_dtype"] = str(dtype).split(".")[-1]
            config.pop("dtype", None)
        _materialise(model, "converting")
        if quantize:
            model, config = quantize_model(
                model, config, group_size, bits, mode=q_mode,
                quant_predicate=_quant_predicate(mixed, group_size),
            )
        nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        with write_errors(dst, nbytes):
            save_model(tmp, model)
            save_config(dict(config), tmp / "config.json")
            copy_support_files(meta_dir, tmp)
            _write_generation_config(tmp, config, chat_end)
        if not verify:
            return None
        lossy = " and ".join(
            ([f"the {config['torch_dtype']} cast"] if dtype is not None else [])
            + ([f"{bits}-bit {q_mode} quantization{' (mixed)' if mixed else ''}"]
               if quantize else [])
        )
        source = _source_model(src, source_config, args) if lossy else None
        result = _verify(model, build_model(tmp, read_config(tmp)), args.vocab_size,
                         source, lossy)
        _check_verified(result, dst)
    return result


def _model_args(config: dict, where: Path) -> ModelArgs:
    try:
        return ModelArgs.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"Invalid Ouro config in {where / 'config.json'}: {e}") from e


def _source_model(src: Path, config: dict, args: ModelArgs) -> Model:
    """The source as a full-precision model (a quantized MLX source dequantized)."""
    if "quantization" in config:
        from mlx_lm.utils import dequantize_model

        return dequantize_model(build_model(src, config, lazy=True))
    model = Model(args)
    weights = model.sanitize(_read_source_weights(src))
    check_weights(model, weights)
    model.load_weights(list(weights.items()))
    return model


def _check_quantizable(args: ModelArgs, group_size: int) -> None:
    """Refuse quantizing when the group size divides no layer's input width (mlx-lm
    would then leave every layer as it is and still write a quantized config)."""
    widths = sorted({args.hidden_size, args.num_attention_heads * args.head_dim,
                     args.intermediate_size})
    if all(w % group_size for w in widths):
        raise ValueError(
            f"-q would quantize no layer: --q-group-size {group_size} divides none of this "
            f"model's input widths ({', '.join(map(str, widths))}); choose a smaller one."
        )


def mlx_to_hf(
    mlx_path: str | Path,
    hf_path: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    verify: bool = False,
) -> Verification | None:
    """Export an MLX directory (quantized or not) as an HF PyTorch-format checkpoint:
    dequantized safetensors under the HF key names and a released-style config.
    ``dtype`` casts the output (the released checkpoints are bfloat16); by default
    tensors keep their dtype (dequantized ones take their scales' dtype)."""
    from mlx_lm.utils import dequantize_model, make_shards

    dtype = parse_dtype(dtype)
    dst = destination(hf_path, "--hf-path", force, sources=[("--mlx-path", mlx_path)])
    src = resolve(mlx_path)
    check_apart(dst, "--hf-path", [("--mlx-path", src)])
    config = read_config(src)
    model = build_model(src, config, lazy=True)
    dequantize_model(model)
    weights = dict(tree_flatten(model.parameters()))
    if dtype is not None:
        weights = cast_floats(weights, dtype)
        model.load_weights(list(weights.items()))
    out_dtype = str(next(iter(weights.values())).dtype).split(".")[-1]
    hf_config = hf_config_from(config, out_dtype)

    with atomic_directory(dst, force=force, verb="convert") as tmp:
        shards = make_shards(weights)
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                  for i in range(len(shards))]
        )
        weight_map = {}
        nbytes = sum(v.nbytes for v in weights.values())
        with write_errors(dst, nbytes):
            for name, shard in tqdm(list(zip(names, shards)), desc="exporting",
                                    unit="shard"):
                mx.save_safetensors(str(tmp / name), shard, metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            if len(shards) > 1:
                index = {"metadata": {"total_size": nbytes},
                         "weight_map": dict(sorted(weight_map.items()))}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            copy_support_files(src, tmp)
        if not verify:
            return None
        lossy = " and ".join(
            (["dequantization"] if "quantization" in config else [])
            + ([f"the {out_dtype} cast"] if dtype is not None else [])
        )
        source = build_model(src, config) if lossy else None
        result = _verify(model, build_model(tmp, read_config(tmp)), config["vocab_size"],
                         source, lossy)
        _check_verified(result, dst)
    return result


def hf_config_from(config: dict, dtype: str) -> dict:
    """A config.json with the released fields, without MLX-only keys."""
    args = ModelArgs.from_dict(config)
    out = {k: v for k, v in config.items()
           if k not in ("quantization", "quantization_config", "dtype")}
    out.update(HF_FIXED)
    for k, v in HF_DEFAULTS.items():
        out.setdefault(k, v)
    L = args.num_hidden_layers
    out.update(
        head_dim=args.head_dim,
        num_key_value_heads=args.num_key_value_heads,
        total_ut_steps=args.total_ut_steps,
        early_exit_threshold=args.early_exit_threshold,
        max_position_embeddings=args.max_position_embeddings,
        rope_theta=args.rope_theta,
        rms_norm_eps=args.rms_norm_eps,
        torch_dtype=dtype,
    )
    out.setdefault("layer_types", ["full_attention"] * L)
    out.setdefault("max_window_layers", L)
    return dict(sorted(out.items()))
