"""Ouro (LoopLM), ByteDance, arXiv 2510.25741, in mlx-lm's model-file style.

What differs from a Llama-style decoder:
- the stack of ``num_hidden_layers`` layers is applied ``total_ut_steps`` times with
  shared weights; each (loop step, layer) pair has its own KV cache;
- "sandwich" blocks: four RMSNorms per layer, the attention and MLP *outputs* are
  normalised before their residual adds;
- the final norm ``model.norm`` closes *every* loop step and its output is the next
  step's input;
- an exit gate (Linear with bias) reads each step's normalised state; the exit math
  lives in ``ouro_mlx.exit``;
- untied ``lm_head``, no embedding scaling, half-split RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import BaseModelArgs, create_attention_mask
from mlx_lm.models.cache import CacheList, KVCache

from . import exit as ex


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 65536
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    use_sliding_window: bool = False
    total_ut_steps: int = 4
    early_exit_threshold: float | None = 1.0
    early_exit_step: int | None = None

    def __post_init__(self):
        if self.model_type != "ouro":
            raise ValueError(f"model_type is {self.model_type!r}, expected 'ouro'.")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.total_ut_steps < 1:
            raise ValueError(f"total_ut_steps must be >= 1, got {self.total_ut_steps}.")
        unsupported = {
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": self.use_sliding_window,
            "hidden_act != silu": self.hidden_act != "silu",
        }
        if bad := [k for k, v in unsupported.items() if v]:
            raise ValueError(f"Unsupported Ouro config options: {', '.join(bad)}.")


class LoopOutputs(NamedTuple):
    """Per-loop-step results: ``hidden[t]`` [B, S, H] after ``model.norm``;
    ``gate_logits[t]`` [B, S], before the sigmoid."""

    hidden: list[mx.array]
    gate_logits: list[mx.array]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hd = args.hidden_size, args.head_dim
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.scale = hd**-0.5
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=False)
        self.rope = nn.RoPE(hd, traditional=False, base=args.rope_theta)

    def __call__(self, x: mx.array, mask: Any, cache: Any = None) -> mx.array:
        B, S, _ = x.shape
        q = self.q_proj(x).reshape(B, S, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, S, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, S, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset=offset)
        k = self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Sandwich block. Names follow the checkpoint: ``post_attention_layernorm`` is
    the pre-MLP norm, the ``_2`` norms normalise the sub-layer outputs."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(dim, eps=eps)
        self.input_layernorm_2 = nn.RMSNorm(dim, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_attention_layernorm_2 = nn.RMSNorm(dim, eps=eps)

    def __call__(self, x: mx.array, mask: Any, cache: Any = None) -> mx.array:
        h = self.self_attn(self.input_layernorm(x), mask, cache)
        x = x + self.input_layernorm_2(h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + self.post_attention_layernorm_2(h)


class OuroModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.early_exit_gate = nn.Linear(args.hidden_size, 1, bias=True)

    def __call__(self, inputs: mx.array, cache: list | None, ut_steps: int) -> LoopOutputs:
        x = self.embed_tokens(inputs)
        S = x.shape[1]
        depth = cache_depth(cache)
        if depth is not None and depth < ut_steps:
            raise ValueError(
                f"The cache holds {depth} loop steps but ut_steps={ut_steps}; "
                f"build it with model.make_cache(ut_steps={ut_steps})."
            )
        mask = create_attention_mask(x, cache[0][0] if cache else None)
        hidden, gates = [], []
        for t in range(ut_steps):
            for l, layer in enumerate(self.layers):
                x = layer(x, mask, cache[l][t] if cache else None)
            x = self.norm(x)  # closes every step; the normalised state feeds step t+1
            hidden.append(x)
            gates.append(self.early_exit_gate(x).squeeze(-1))
        if depth is not None and depth > ut_steps:
            fill_skipped_steps(cache, ut_steps, S)
        return LoopOutputs(hidden, gates)


def cache_depth(cache: list | None) -> int | None:
    """Number of loop steps a cache from ``Model.make_cache`` holds per layer."""
    return len(cache[0].caches) if cache else None


def fill_skipped_steps(cache: list, executed: int, n: int) -> None:
    """Copy the K/V of the last ``n`` tokens at step ``executed - 1`` into the
    deeper steps that did not run, so every cache advances by the same number of
    tokens and later, deeper tokens attend to a complete history."""
    for layer_cache in cache:
        src = layer_cache[executed - 1]
        k = src.keys[..., src.offset - n : src.offset, :]
        v = src.values[..., src.offset - n : src.offset, :]
        for dst in layer_cache.caches[executed:]:
            dst.update_and_fetch(k, v)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = OuroModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # Runtime defaults; ``ouro_mlx.load(..., ut_steps=, exit_threshold=)`` sets them.
        self.ut_steps = args.total_ut_steps
        self.exit_threshold = args.early_exit_threshold
        self.exit_at_step = args.early_exit_step

    def loop_outputs(
        self, inputs: mx.array, cache: list | None = None, *, ut_steps: int | None = None
    ) -> LoopOutputs:
        """Run the loop and return every step's normalised state and gate logits."""
        return self.model(inputs, cache, self._steps(ut_steps))

    def __call__(
        self,
        inputs: mx.array,
        cache: list | None = None,
        *,
        ut_steps: int | None = None,
        exit_threshold: float | None = None,
        exit_at_step: int | None = None,
        weighted_exit: bool = False,
    ) -> mx.array:
        """Logits [B, S, V]. Selection, like the official ``OuroForCausalLM``:
        ``weighted_exit`` → expected logits Σ p_t·logits_t; else ``exit_at_step``
        (0-based) → that step; else Q-exit at ``exit_threshold`` per token; else the
        last step. All ``ut_steps`` are computed (skipping compute is the generation
        loop's job, see ``ouro_mlx.generate``)."""
        T = self._steps(ut_steps)
        if exit_at_step is None:
            exit_at_step = self.exit_at_step
        if exit_threshold is None:
            exit_threshold = self.exit_threshold
        out = self.model(inputs, cache, T)
        if weighted_exit:
            pdf = ex.exit_pdf(out.gate_logits)
            h = ex.expected_logits(out.hidden, pdf).astype(out.hidden[-1].dtype)
        elif exit_at_step is not None:
            if not 0 <= exit_at_step < T:
                raise ValueError(f"exit_at_step must be in [0, {T}), got {exit_at_step}.")
            h = out.hidden[exit_at_step]
        elif exit_threshold is not None and ex.check_threshold(exit_threshold) < 1.0:
            cdf = ex.exit_cdf(ex.exit_pdf(out.gate_logits))
            h = ex.gather_steps(out.hidden, ex.select_exit_step(cdf, exit_threshold))
        else:
            h = out.hidden[-1]
        # lm_head is linear and bias-free: mixing or gathering states before it
        # equals doing so on per-step logits, at 1/T of the head's cost.
        return self.lm_head(h)

    def _steps(self, ut_steps: int | None) -> int:
        return check_ut_steps(self.ut_steps if ut_steps is None else ut_steps)

    def sanitize(self, weights: dict) -> dict:
        return {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self, ut_steps: int | None = None) -> list[CacheList]:
        """One ``CacheList`` per physical layer holding one ``KVCache`` per loop
        step: ``cache[l][t]`` is the official cache's slot ``t * L + l``."""
        T = self._steps(ut_steps)
        return [CacheList(*(KVCache() for _ in range(T))) for _ in self.layers]

    def quant_predicate(self, path: str, module: nn.Module) -> bool | dict:
        # The gate decides depth for every token; keep it in full precision.
        return "early_exit_gate" not in path


def check_ut_steps(ut_steps: int) -> int:
    if not isinstance(ut_steps, int) or ut_steps < 1:
        raise ValueError(f"ut_steps must be an integer >= 1, got {ut_steps!r}.")
    return ut_steps
