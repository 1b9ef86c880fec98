"""Ouro (LoopLM), ByteDance, arXiv 2510.25741, in mlx-lm's model-file style.

What differs from a Llama-style decoder:
- the stack of ``num_hidden_layers`` layers is applied ``total_ut_steps`` times with
  shared weights; each (loop step, layer) pair has its own KV cache, or all steps
  of a layer share one (kv_mode "last", paper §5.4.2);
- "sandwich" blocks: four RMSNorms per layer, the attention and MLP *outputs* are
  normalised before their residual adds;
- the final norm ``model.norm`` closes *every* loop step and its output is the next
  step's input;
- an exit gate (Linear with bias) reads each step's normalised state; the exit math
  lives in ``ouro_mlx.exit``;
- untied ``lm_head``, no embedding scaling, half-split RoPE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu
from mlx_lm.models.base import (
    BaseModelArgs,
    create_attention_mask,
    scaled_dot_product_attention,
)
from mlx_lm.models.cache import CacheList, KVCache, QuantizedKVCache

from . import exit as ex
from . import limits
from .linears import PLAIN_LINEARS, concat_linears, split_linear


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
        for name in SIZES:
            check_positive_int(getattr(self, name), name, optional=name == "head_dim")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of "
                    f"num_attention_heads ({self.num_attention_heads}) without head_dim."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})."
            )
        check_ut_steps(self.total_ut_steps, "total_ut_steps")
        for name in ("rms_norm_eps", "rope_theta"):
            if not is_number(value := getattr(self, name)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number, got {value!r}.")
        t = self.early_exit_threshold
        if t is not None and (not is_number(t) or not 0 <= t <= 1):
            raise ValueError(f"early_exit_threshold must be in [0, 1] or null, got {t!r}.")
        s = self.early_exit_step
        if s is not None and (not isinstance(s, int) or not 0 <= s < self.total_ut_steps):
            raise ValueError(f"early_exit_step must be in [0, {self.total_ut_steps}) or "
                             f"null, got {s!r}.")
        unsupported = {
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": self.use_sliding_window,
            "hidden_act != silu": self.hidden_act != "silu",
        }
        if bad := [k for k, v in unsupported.items() if v]:
            raise ValueError(f"Unsupported Ouro config options: {', '.join(bad)}.")


SIZES = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
         "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_positive_int(value: Any, name: str, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


class LoopOutputs(NamedTuple):
    """Per-loop-step results: ``hidden[t]`` [B, S, H] after ``model.norm``;
    ``gate_logits[t]`` [B, S], before the sigmoid."""

    hidden: list[mx.array]
    gate_logits: list[mx.array]


class LoopAware:
    """Mixin of the blocks whose projections may be per-loop adapters
    (``ouro_mlx.adapters.LoopLoRALinear``): those named in ``loop_keys`` are called
    with the loop step ``t`` as well, the others with the input only. Empty (the
    default, a class attribute) costs one truth test per call."""

    loop_keys: frozenset = frozenset()

    def project(self, name: str, x: mx.array, t: int) -> mx.array:
        module = self[name]
        return module(x, t) if name in self.loop_keys else module(x)


class Attention(LoopAware, nn.Module):
    fused = False  # q/k/v as one ``qkv_proj`` (see ``Model.fuse_projections``)

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hd = args.hidden_size, args.head_dim
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = hd
        self.scale = hd**-0.5
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=False)
        self.rope = nn.RoPE(hd, traditional=False, base=args.rope_theta)

    def __call__(
        self,
        x: mx.array,
        mask: Any,
        cache: Any = None,
        frozen: tuple | None = None,
        last_only: bool = False,
        t: int = 0,
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """Returns the output and this call's new (k, v). ``frozen = (active
        [B,1,1,1], k, v)``: inactive rows store the given K/V instead of their own.
        ``last_only``: K/V for every position, the output for the last one only.
        ``t``: the loop step, for per-loop adapters."""
        B, S, _ = x.shape
        q, k, v = self.heads(x, cache.offset if cache is not None else 0, t, last_only)
        Sq = q.shape[2]
        if frozen is not None:
            active, fk, fv = frozen
            k, v = mx.where(active, k, fk), mx.where(active, v, fv)
        keys, values = (k, v) if cache is None else cache.update_and_fetch(k, v)
        if Sq < S:  # the last query sees every key: the causal mask's last row
            mask = None if isinstance(mask, str) or mask is None else mask[..., -1:, :]
        out = scaled_dot_product_attention(q, keys, values, cache, self.scale, mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, Sq, -1)
        return (self.project("o_proj", out, t) if self.loop_keys else self.o_proj(out)), (k, v)

    def heads(
        self, x: mx.array, offset: int | mx.array, t: int = 0, last_only: bool = False
    ) -> tuple[mx.array, mx.array, mx.array]:
        """q [B, heads, S or 1 (``last_only``), hd], k and v [B, kv_heads, S, hd] of
        ``x`` [B, S, H] at positions ``offset``.., q and k rotated. Fused, for every
        position: q and k are rotated by one RoPE call (the same rotation per head:
        one kernel fewer a layer application)."""
        B, S, _ = x.shape
        if self.fused and not last_only:
            nq, nk = self.n_heads, self.n_heads + self.n_kv_heads
            qkv = self.qkv_proj(x).reshape(B, S, nk + self.n_kv_heads, -1)
            qkv = qkv.transpose(0, 2, 1, 3)
            qk = self.rope(qkv[:, :nk], offset=offset)
            return qk[:, :nq], qk[:, nq:], qkv[:, nk:]
        q, k, v = self.qkv(x, t, last_only)
        Sq = q.shape[1]
        q = q.reshape(B, Sq, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(B, S, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(B, S, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q = self.rope(q, offset=offset if Sq == S else offset + (S - Sq))
        return q, self.rope(k, offset=offset), v

    def qkv(
        self, x: mx.array, t: int = 0, last_only: bool = False
    ) -> tuple[mx.array, mx.array, mx.array]:
        """The projections of ``x`` [B, S, H]: q [B, S or 1 (``last_only``), heads·hd],
        k and v [B, S, kv_heads·hd]; one matmul when fused, per-loop adapters by ``t``."""
        if self.fused:
            n, m = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = mx.split(self.qkv_proj(x), [n, n + m], axis=-1)
            return (q[:, -1:] if last_only else q), k, v
        xq = x[:, -1:] if last_only else x
        if self.loop_keys:
            return (self.project("q_proj", xq, t), self.project("k_proj", x, t),
                    self.project("v_proj", x, t))
        return self.q_proj(xq), self.k_proj(x), self.v_proj(x)


class MLP(LoopAware, nn.Module):
    fused = False  # gate/up as one ``gate_up_proj`` (see ``Model.fuse_projections``)

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden = args.hidden_size, args.intermediate_size
        self.hidden = hidden
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array, t: int = 0) -> mx.array:
        if self.loop_keys:
            h = swiglu(self.project("gate_proj", x, t), self.project("up_proj", x, t))
            return self.project("down_proj", h, t)
        if self.fused:
            gate, up = mx.split(self.gate_up_proj(x), [self.hidden], axis=-1)
            return self.down_proj(swiglu(gate, up))
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
        self.eps = eps

    def __call__(
        self,
        x: mx.array,
        mask: Any,
        cache: Any = None,
        frozen: tuple | None = None,
        last_only: bool = False,
        t: int = 0,
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """``t``: the loop step being run (per-loop adapters pick theirs by it)."""
        h, kv = self.self_attn(self.input_layernorm(x), mask, cache, frozen, last_only, t)
        if last_only:
            x = x[:, -1:]
        x, h = add_norm_norm(x, h, self.input_layernorm_2.weight,
                             self.post_attention_layernorm.weight, self.eps)
        h = self.mlp(h, t)
        return add_norm(x, h, self.post_attention_layernorm_2.weight, self.eps), kv


@partial(mx.compile, shapeless=True)
def add_norm_norm(x, h, w_out, w_next, eps):
    """The sandwich boundary in one compiled kernel group: normalise the sub-layer
    output, add it to the residual, normalise the sum for the next sub-layer."""
    x = x + mx.fast.rms_norm(h, w_out, eps)
    return x, mx.fast.rms_norm(x, w_next, eps)


@partial(mx.compile, shapeless=True)
def add_norm(x, h, w_out, eps):
    return x + mx.fast.rms_norm(h, w_out, eps)


class OuroModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.early_exit_gate = nn.Linear(args.hidden_size, 1, bias=True)

    def loop_step(
        self,
        x: mx.array,
        t: int,
        cache: list | None,
        mask: Any,
        frozen: tuple | None = None,
        last_only: bool = False,
        gate: bool = True,
    ) -> tuple[mx.array, mx.array | None, list]:
        """Loop step ``t`` on its input ``x``: the normalised state (next step's
        input), gate logits [B, S] (None with ``gate=False``: a fixed depth never
        reads them) and each layer's new (k, v). ``frozen = (active
        [B], per-layer (k, v))``: rows not active store those K/V instead.
        ``last_only``: the state and gate of the last position only ([B, 1, H],
        [B, 1]); every position's K/V is still computed and cached. The last layer
        then runs its query, attention output and MLP on one row instead of S.

        A shared cache (one per layer, kv_mode "last") holds one entry per token:
        step t > 0 overwrites, in place, what step t − 1 wrote for this call's
        tokens, so every step attends to the shared history plus its own K/V and
        the last step executed is what stays."""
        shared = cache is not None and cache_depth(cache) == 1
        kvs = []
        for l, layer in enumerate(self.layers):
            c = None if cache is None else cache[l][0 if shared else t]
            if shared and t > 0:
                c.trim(x.shape[1])
            f = None if frozen is None else (frozen[0][:, None, None, None], *frozen[1][l])
            x, kv = layer(x, mask, c, f, last_only and l == len(self.layers) - 1, t)
            kvs.append(kv)
        x = self.norm(x)  # closes every step; the normalised state feeds step t+1
        return x, self.early_exit_gate(x).squeeze(-1) if gate else None, kvs

    def __call__(
        self, inputs: mx.array, cache: list | None, ut_steps: int, last_only: bool = False
    ) -> LoopOutputs:
        """``last_only``: the final step keeps only the last position (see
        ``loop_step``), so ``hidden[-1]`` is [B, 1, H]: what a prefill needs."""
        x = self.embed_tokens(inputs)
        check_cache(cache, ut_steps)
        mask = create_attention_mask(x, cache[0][0] if cache else None)
        hidden, gates = [], []
        for t in range(ut_steps):
            x, gate, kvs = self.loop_step(x, t, cache, mask, None, last_only and t == ut_steps - 1)
            hidden.append(x)
            gates.append(gate)
        if cache:
            commit_kv(cache, kvs, ut_steps)
        return LoopOutputs(hidden, gates)


def cache_depth(cache: list | None) -> int | None:
    """Loop steps a cache from ``Model.make_cache`` holds per layer (1: shared)."""
    return len(cache[0].caches) if cache else None


def check_cache(cache: list | None, ut_steps: int) -> None:
    depth = cache_depth(cache)
    if depth is not None and 1 < depth < ut_steps:
        raise ValueError(
            f"The cache holds {depth} loop steps but ut_steps={ut_steps}; "
            f"build it with model.make_cache(ut_steps={ut_steps})."
        )


def commit_kv(cache: list, kvs: list, executed: int) -> None:
    """Finish a call that ran ``executed`` loop steps, the last of which produced
    ``kvs`` (per layer): copy that K/V into the deeper steps that did not run, so
    every cache advances by the same tokens and later, deeper tokens attend to a
    complete history. (A shared cache already holds it.)"""
    for layer_cache, (k, v) in zip(cache, kvs):
        for c in layer_cache.caches[executed:]:
            c.update_and_fetch(k, v)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        check_model_fits(args)  # before any layer exists: stock mlx-lm loaders come here
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
        loop's job, see ``ouro_mlx.generation``)."""
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
            # The chosen step is discrete: no gradient through it (a training step,
            # e.g. mlx_lm.lora on a model whose config sets a threshold, needs this).
            cdf = mx.stop_gradient(ex.exit_cdf(ex.exit_pdf(out.gate_logits)))
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

    def make_cache(
        self,
        ut_steps: int | None = None,
        kv_mode: str = "full",
        kv_bits: int | None = None,
        kv_group_size: int = 64,
    ) -> list[CacheList]:
        """One ``CacheList`` per physical layer. ``kv_mode="full"``: one cache per
        loop step, ``cache[l][t]`` is the official cache's slot ``t * L + l``.
        ``"last"``: one cache per layer shared by every step, holding for each token
        the K/V of the last step it ran (1/T of the memory). ``kv_bits`` (4 or 8)
        stores K/V quantized, like mlx-lm's ``QuantizedKVCache``."""
        if kv_mode not in KV_MODES:
            raise ValueError(f"Unknown kv_mode {kv_mode!r}; choose one of {', '.join(KV_MODES)}.")
        if kv_bits is not None and kv_bits not in (4, 8):
            raise ValueError(f"kv_bits must be 4 or 8, got {kv_bits}.")
        if kv_bits is not None and (
            kv_group_size not in (32, 64, 128) or self.args.head_dim % kv_group_size
        ):
            raise ValueError(f"kv_group_size must be 32, 64 or 128 and divide head_dim "
                             f"({self.args.head_dim}); got {kv_group_size}.")
        n = self._steps(ut_steps) if kv_mode == "full" else 1
        if kv_bits is None:
            new = KVCache
        else:
            new = lambda: QuantizedKVCache(group_size=kv_group_size, bits=kv_bits)  # noqa: E731
        return [CacheList(*(new() for _ in range(n))) for _ in self.layers]

    def shard(self, group: mx.distributed.Group | None = None) -> None:
        """Tensor parallelism over ``group`` (mlx-lm's convention): attention heads and
        MLP columns split across devices, one all-reduce after ``o_proj`` and
        ``down_proj``. Prefer it to pipelining: a looped stack would cross devices
        T times per token."""
        from mlx.nn.layers.distributed import shard_linear

        self.check_unfused("shard")
        group = group or mx.distributed.init()
        N = group.size()
        a = self.args
        if a.num_key_value_heads % N or a.intermediate_size % N:
            raise ValueError(f"Cannot shard over {N} devices: kv heads "
                             f"({a.num_key_value_heads}) and intermediate_size "
                             f"({a.intermediate_size}) must divide by it.")
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for name in ("q_proj", "k_proj", "v_proj"):
                sharded = shard_linear(getattr(attn, name), "all-to-sharded", group=group)
                setattr(attn, name, sharded)
            attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
            attn.n_heads //= N
            attn.n_kv_heads //= N
            mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
            mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
            mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)

    def quant_predicate(self, path: str, module: nn.Module) -> bool | dict:
        # The gate decides depth for every token; keep it in full precision.
        return "early_exit_gate" not in path

    # -- inference-time fusion of projections that read the same input ----------------

    def fuse_projections(self) -> bool:
        """For inference only: every layer's q/k/v become one ``qkv_proj`` and its
        gate/up one ``gate_up_proj`` (weights, and a quantized model's scales and
        biases, concatenated along the output axis), so a layer application runs 4
        matmuls instead of 7, with the same outputs. Each layer's separate arrays are
        released as soon as it is fused: memory grows by one layer's projections
        at most, and only while fusing.

        Returns whether anything was fused. Nothing is when a projection is not a plain
        ``nn.Linear``/``nn.QuantizedLinear`` (LoRA/DoRA or per-loop adapters, a sharded
        model); a group whose members differ (dtype, bits, group size) stays separate.

        Checkpoints, adapters, training, export and sharding keep the Hugging Face
        layout (``q_proj``, ..., ``up_proj``): ouro-mlx refuses to save, adapt, train or
        shard a fused model with a one-line ``ValueError`` (see :meth:`check_unfused`)
        rather than unfusing behind the caller's back; :meth:`unfuse_projections`
        restores the layout. mlx-lm's own ``save_model`` is not guarded: unfuse
        before calling it."""
        blocks = [b for layer in self.layers for b in (layer.self_attn, layer.mlp)]
        if any(b.loop_keys or any(type(m) not in PLAIN_LINEARS for k, m in b.items()
                                  if k.endswith("_proj")) for b in blocks):
            return False
        for block in blocks:
            name, parts = FUSED[type(block)]
            if block.fused or (linear := concat_linears([block[p] for p in parts])) is None:
                continue
            mx.eval(linear.parameters())
            for p in parts:
                del block[p]  # the separate arrays go with their modules
            block[name] = linear
            block.fused = True
        return self.fused

    def unfuse_projections(self) -> None:
        """Undo :meth:`fuse_projections`: the Hugging Face layout again (the separate
        projections are views of the fused arrays: nothing is copied)."""
        for layer in self.layers:
            for block in (layer.self_attn, layer.mlp):
                if not block.fused:
                    continue
                name, parts = FUSED[type(block)]
                if isinstance(block, Attention):
                    hd = block.head_dim
                    sizes = [block.n_heads * hd, block.n_kv_heads * hd, block.n_kv_heads * hd]
                else:
                    sizes = [block.hidden, block.hidden]
                for p, linear in zip(parts, split_linear(block.pop(name), sizes)):
                    block[p] = linear
                block.fused = False

    @property
    def fused(self) -> bool:
        """Whether :meth:`fuse_projections` fused any layer's projections."""
        return any(layer.self_attn.fused or layer.mlp.fused for layer in self.layers)

    def check_unfused(self, action: str) -> None:
        """A one-line ValueError if the model is fused: ``action`` (e.g. "save")
        needs the Hugging Face layout."""
        if self.fused:
            raise ValueError(f"Cannot {action} a model whose projections are fused for "
                             "inference (Model.fuse_projections); call "
                             "model.unfuse_projections() first.")


# What ``Model.fuse_projections`` makes of each block: the new name, the parts.
FUSED = {Attention: ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         MLP: ("gate_up_proj", ("gate_proj", "up_proj"))}


KV_MODES = ("full", "last")


def check_ut_steps(ut_steps: int, name: str = "ut_steps") -> int:
    """``ut_steps`` if it is a sane loop count; ``name`` is what the message calls it."""
    if isinstance(ut_steps, bool) or not isinstance(ut_steps, int) or ut_steps < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {ut_steps!r}.")
    if ut_steps > (cap := limits.max_ut_steps()):
        raise ValueError(
            f"{name} is {ut_steps}, above the maximum of {cap} loop steps; "
            "set OURO_MLX_MAX_UT_STEPS to allow more."
        )
    return ut_steps


def num_parameters(args: ModelArgs) -> int:
    """Parameters of the full-precision model ``args`` describes (no allocation)."""
    H, hd, I, V = args.hidden_size, args.head_dim, args.intermediate_size, args.vocab_size
    attn = 2 * H * args.num_attention_heads * hd + 2 * H * args.num_key_value_heads * hd
    layer = attn + 3 * H * I + 4 * H
    return 2 * V * H + args.num_hidden_layers * layer + H + (H + 1)


def estimate_model_bytes(args: ModelArgs, bytes_per_param: float = 4) -> int:
    """Bytes ``Model(args)`` takes with weights of ``bytes_per_param``, plus ~90 KB
    of Python and MLX objects per layer (measured); check it with
    ``limits.check_fits`` before building a model from a stranger's config."""
    return int(num_parameters(args) * bytes_per_param) + args.num_hidden_layers * 2**17


# The fewest bytes a weight can take (mlx-lm's smallest quantization, 2 bits): the
# constructor does not know the stored precision, so it refuses only what cannot fit
# in any; ``ouro_mlx``'s loader checks the exact precision before building.
MIN_BYTES_PER_PARAM = 2 / 8


def check_model_fits(args: ModelArgs) -> None:
    """Refuse a config whose model cannot fit in this machine's memory, naming its
    sizes, before anything is built (a layer count of a million would otherwise end
    in ``std::bad_alloc`` minutes later)."""
    sizes = ", ".join(f"{name} {getattr(args, name):,}" for name in
                      ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size"))
    limits.check_fits(estimate_model_bytes(args, MIN_BYTES_PER_PARAM),
                      f"config.json describes a model ({sizes}) that, even at 2 bits a weight,")
