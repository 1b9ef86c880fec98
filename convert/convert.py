"""HF PyTorch-format Ouro checkpoints ↔ MLX directories.

Both directions write into a temporary directory beside the destination and rename
it into place at the end, so an interrupted run leaves nothing half-written, and
neither ever modifies the source.
"""

from __future__ import annotations

import json
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
    parse_dtype,
    read_config,
    read_safetensors,
    resolve,
    weight_files,
)
from ..model import Model, ModelArgs
from .torch_io import read_state_dict, torch_files

Q_MODES = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
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


def _read_source_weights(src: Path) -> dict[str, mx.array]:
    if src.is_file():
        return read_state_dict(src)
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
    for tok in json.loads(file.read_text()).get("added_tokens", []):
        if tok.get("content") == "<|im_end|>":
            return tok["id"]
    return None


def _write_generation_config(dst: Path, config: dict, tokenizer_dir: Path) -> None:
    """Make chat turns stop at ``<|im_end|>`` in any tool that reads
    generation_config.json (mlx-lm does), not only at the config's eos."""
    file = dst / "generation_config.json"
    gen = json.loads(file.read_text()) if file.exists() else {}
    eos = gen.get("eos_token_id", config.get("eos_token_id", 0))
    eos = [eos] if isinstance(eos, int) else list(eos)
    if (end := _chat_end_id(tokenizer_dir)) is not None and end not in eos:
        eos.append(end)
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


def max_logit_diff(a: Model, b: Model, vocab_size: int, n_tokens: int = 16) -> float:
    """Largest |logit| difference of two models on a few fixed tokens, in float32."""
    ids = (mx.arange(n_tokens) * 7919 + 17) % vocab_size
    la = a(ids[None]).astype(mx.float32)
    lb = b(ids[None]).astype(mx.float32)
    return (la - lb).abs().max().item()


def hf_to_mlx(
    hf_path: str | Path,
    mlx_path: str | Path,
    *,
    config_path: str | Path | None = None,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int | None = None,
    q_group_size: int | None = None,
    q_mode: str = "affine",
    mixed: bool = False,
    force: bool = False,
    verify: bool = False,
    revision: str | None = None,
) -> float | None:
    """Convert an HF Ouro checkpoint (directory, repo id, or a raw ``.bin``/``.pt``
    file with ``config_path``) into an MLX directory. Returns the largest logit
    difference source vs result when ``verify``."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    dtype = parse_dtype(dtype)
    if q_mode not in Q_MODES:
        raise ValueError(f"Unknown q_mode {q_mode!r}; choose one of {', '.join(Q_MODES)}.")
    if quantize and q_bits is not None and q_bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"q_bits must be one of 2, 3, 4, 5, 6, 8; got {q_bits}.")
    src = Path(hf_path).expanduser()
    if not src.exists():
        src = resolve(hf_path, revision, CONFIG_FILES + TOKENIZER_FILES + WEIGHT_PATTERNS
                      + TORCH_DOWNLOAD)
    if src.is_file() and config_path is None:
        raise ValueError(f"{src} is a weights file; pass the model's config.json too.")
    meta_dir = Path(config_path).expanduser() if config_path else src
    if meta_dir.is_file():
        meta_dir = meta_dir.parent
    config = read_config(meta_dir)
    dst = Path(mlx_path).expanduser()
    if dst.resolve() == (src if src.is_dir() else src.parent).resolve():
        raise ValueError("The destination must differ from the source.")

    with atomic_directory(dst, force=force) as tmp:
        model = Model(ModelArgs.from_dict(config))
        weights = model.sanitize(_read_source_weights(src))
        check_weights(model, weights)
        if dtype is not None:
            weights = cast_floats(weights, dtype)
            config["torch_dtype"] = str(dtype).split(".")[-1]
            config.pop("dtype", None)
        model.load_weights(list(weights.items()))
        _materialise(model, "converting")
        if quantize:
            group_size, bits = Q_MODES[q_mode]
            model, config = quantize_model(
                model,
                config,
                q_group_size or group_size,
                q_bits or bits,
                mode=q_mode,
                quant_predicate=_quant_predicate(mixed, q_group_size or group_size),
            )
        save_model(tmp, model)
        save_config(dict(config), tmp / "config.json")
        copy_support_files(meta_dir, tmp)
        _write_generation_config(tmp, config, meta_dir)
        diff = None
        if verify:
            source = Model(ModelArgs.from_dict(config))
            source.load_weights(list(model.sanitize(_read_source_weights(src)).items()))
            diff = max_logit_diff(source, build_model(tmp, read_config(tmp)),
                                  config["vocab_size"])
    return diff


def mlx_to_hf(
    mlx_path: str | Path,
    hf_path: str | Path,
    *,
    dtype: str | None = None,
    force: bool = False,
    verify: bool = False,
) -> float | None:
    """Export an MLX directory (quantized or not) as an HF PyTorch-format checkpoint:
    dequantized safetensors under the HF key names and a released-style config.
    ``dtype`` casts the output (the released checkpoints are bfloat16); by default
    tensors keep their dtype (dequantized ones take their scales' dtype)."""
    from mlx_lm.utils import dequantize_model, make_shards

    src = resolve(mlx_path)
    config = read_config(src)
    model = build_model(src, config, lazy=True)
    dequantize_model(model)
    weights = dict(tree_flatten(model.parameters()))
    if (dtype := parse_dtype(dtype)) is not None:
        weights = cast_floats(weights, dtype)
    out_dtype = str(next(iter(weights.values())).dtype).split(".")[-1]
    hf_config = hf_config_from(config, out_dtype)

    with atomic_directory(Path(hf_path).expanduser(), force=force) as tmp:
        shards = make_shards(weights)
        names = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                  for i in range(len(shards))]
        )
        weight_map = {}
        for name, shard in tqdm(list(zip(names, shards)), desc="exporting", unit="shard"):
            mx.save_safetensors(str(tmp / name), shard, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        copy_support_files(src, tmp)
        diff = None
        if verify:
            diff = max_logit_diff(model, build_model(tmp, read_config(tmp)),
                                  config["vocab_size"])
    return diff


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
