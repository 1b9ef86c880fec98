"""Random-weight Ouro checkpoints in the released Hugging Face layout.

For tests, benchmarks and trying the tools without downloading a model: the config
has the released fields, the tensors the real key names, and the tokenizer is a
byte-level BPE with Ouro's 17 special tokens (ids 0–16) and the ChatML template.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx

from .limits import check_fits
from .loading import (atomic_directory, declare_chat_end, destination, parse_dtype,
                      write_errors)
from .model import ModelArgs, check_ut_steps, estimate_model_bytes

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=128,
                 vocab_size=512, max_position_embeddings=2048, rope_theta=10000.0),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=64, intermediate_size=704,
                  vocab_size=512, max_position_embeddings=4096, rope_theta=10000.0),
    "ouro-1.4b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                      num_key_value_heads=16, head_dim=128, intermediate_size=5632,
                      vocab_size=49152, max_position_embeddings=65536,
                      rope_theta=1000000.0),
    "ouro-2.6b": dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=16,
                      num_key_value_heads=16, head_dim=128, intermediate_size=5632,
                      vocab_size=49152, max_position_embeddings=65536,
                      rope_theta=1000000.0),
}

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<file_sep>",
    "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
    "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>",
    "<jupyter_script>", "<empty_output>",
]
def chat_template(default_system: str | None = "You are a helpful assistant.") -> str:
    """Ouro's ChatML template; ``default_system`` is added when a chat has no system
    message (None: never)."""
    head = ""
    if default_system:
        head = (
            "{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\n" + default_system + "<|im_end|>\n' }}{% endif %}"
        )
    return (
        "{% for message in messages %}" + head
        + "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


CHAT_TEMPLATE = chat_template()


def hf_config(shape: str | dict, *, total_ut_steps: int = 4, dtype: str = "float32") -> dict:
    """A config.json with the fields the official code saves."""
    dims = dict(SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    L = dims["num_hidden_layers"]
    return {
        "architectures": ["OuroForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "early_exit_threshold": 1.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "layer_types": ["full_attention"] * L,
        "max_window_layers": L,
        "model_type": "ouro",
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "total_ut_steps": total_ut_steps,
        "use_cache": True,
        "use_sliding_window": False,
        **dims,
    }


def random_weights(config: dict, seed: int = 0, dtype: mx.Dtype = mx.float32) -> dict:
    """Weights under the HF key names, scaled like the reference fixture so that gates
    differ per token and step. Generated one tensor at a time (lazy)."""
    key = mx.random.key(seed)
    H, V = config["hidden_size"], config["vocab_size"]
    I = config["intermediate_size"]
    hd = config.get("head_dim") or H // config["num_attention_heads"]
    q_out = config["num_attention_heads"] * hd
    kv_out = config.get("num_key_value_heads", config["num_attention_heads"]) * hd
    shapes = {"model.embed_tokens.weight": (V, H)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q_out, H),
            p + "self_attn.k_proj.weight": (kv_out, H),
            p + "self_attn.v_proj.weight": (kv_out, H),
            p + "self_attn.o_proj.weight": (H, q_out),
            p + "mlp.gate_proj.weight": (I, H),
            p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
        })
        for n in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm",
                  "post_attention_layernorm_2"):
            shapes[p + n + ".weight"] = (H,)
    shapes.update({
        "model.norm.weight": (H,),
        "model.early_exit_gate.weight": (1, H),
        "model.early_exit_gate.bias": (1,),
        "lm_head.weight": (V, H),
    })
    weights = {}
    for k, (name, shape) in zip(mx.random.split(key, len(shapes)), shapes.items()):
        x = mx.random.normal(shape, key=k)
        if "norm" in name:
            x = 1.0 + 0.1 * x
        elif name == "lm_head.weight":
            x = 2.0 * x / math.sqrt(H)
        elif name == "model.early_exit_gate.weight":
            x = 1.5 * x / math.sqrt(H)
        elif name == "model.early_exit_gate.bias":
            x = 0.5 * x
        elif name != "model.embed_tokens.weight":
            x = x / math.sqrt(shape[1])
        weights[name] = x.astype(dtype)
    return weights


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character map used by byte-level BPE."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_byte_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer (no merges): specials 0–16, bytes 17–272."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in _bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}
             for i, t in enumerate(SPECIAL_TOKENS)]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                          "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True,
                    "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def make_random_checkpoint(
    path: str | Path,
    shape: str | dict = "tiny",
    *,
    dtype: str = "float32",
    seed: int = 0,
    total_ut_steps: int = 4,
    force: bool = False,
) -> Path:
    """Write a random-weight Ouro checkpoint (HF layout, safetensors, tokenizer).
    Sizes are checked against the machine's memory before anything is allocated."""
    if isinstance(shape, str) and shape not in SHAPES:
        raise ValueError(f"Unknown shape {shape!r}; choose one of {', '.join(SHAPES)}.")
    mx_dtype = parse_dtype(dtype)
    check_ut_steps(total_ut_steps, "total_ut_steps")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}.")
    dims = SHAPES[shape] if isinstance(shape, str) else shape
    for k in ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "vocab_size"]:
        v = dims.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be a positive integer, got {v!r}.")
    if dims["vocab_size"] < len(SPECIAL_TOKENS) + 256:
        raise ValueError("vocab_size must be at least 273 for the byte tokenizer.")
    config = hf_config(shape, total_ut_steps=total_ut_steps, dtype=dtype)
    nbytes = estimate_model_bytes(ModelArgs.from_dict(config), mx_dtype.size)
    check_fits(nbytes, f"A random {shape if isinstance(shape, str) else 'custom'} model")
    dest = destination(path, "--out", force)
    with atomic_directory(dest, force=force, verb="random") as tmp:
        weights = random_weights(config, seed, mx_dtype)
        with write_errors(dest, nbytes):
            mx.save_safetensors(str(tmp / "model.safetensors"), weights,
                                metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            write_byte_tokenizer(tmp)
            declare_chat_end(tmp)  # stock mlx-lm stops at the end of a turn too
    return dest
