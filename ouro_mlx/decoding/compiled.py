"""A compiled decode step: one token, batch 1, a fixed depth, as ONE ``mx.compile``d graph.

The plain decode path rebuilds the graph of every layer of every loop step for each
token; on small models (and on Metal at ~100 layer applications per token) building
the graph and launching kernels costs more than the math. Here the whole token (embed,
``n`` loop steps of every layer, ``model.norm`` after each, ``lm_head``) is traced once
and replayed:

- the KV cache is compiled state: fixed-capacity K/V buffers per (loop step, layer),
  written at an offset passed as an array (``mx.slice_update``), attention over the
  filled prefix by a boolean mask over the capacity, RoPE at the array offset. The
  graph does not change from token to token;
- when the capacity runs out, every buffer grows by ``chunk`` positions and the
  function is traced again for the new shape (mx.compile does that on a shape change);
- the prompt is prefilled on the plain path; its K/V are then copied into the buffers,
  and :meth:`CompiledDecoder.sync` writes the buffers back into the ``KVCache`` list
  (a chat's prompt cache keeps growing as on the plain path);
- the loop steps a token skips (``n`` < the cache's depth) receive copies of step
  ``n - 1``'s K/V, as ``commit_kv`` does on the plain path.

Only kv_mode "full", unquantized K/V, batch 1 and a fixed depth (no data-dependent
exit) are compiled; :func:`check_compilable` names what stands in the way otherwise.
"""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from ..exit import ExitRule
from ..model import Model, add_norm, add_norm_norm, cache_depth
from ..sampling import Sampler
from . import host
from .steps import prefill, sampling_step


def check_compilable(cache: list, fixed_loops: int | None, batch: int = 1) -> None:
    """Raise a one-line ValueError naming what the compiled step does not support."""
    if fixed_loops is None:
        raise ValueError("compile_step (--compile-step) needs a fixed depth: exit_threshold "
                         "1.0 or exit_at_step, no hidden_eps (--exit-threshold 1.0).")
    if batch != 1:
        raise ValueError("compile_step (--compile-step) decodes batch 1 only.")
    if cache_depth(cache) < fixed_loops:
        raise ValueError("compile_step (--compile-step) needs kv_mode 'full' (one cache "
                         "per loop step).")
    if any(type(c) is not KVCache for lc in cache for c in lc.caches):
        raise ValueError("compile_step (--compile-step) needs a plain KVCache (no kv_bits).")


class _Graphs(dict):
    """A model's compiled functions, by (kind, loops, cache depth, draft loops). Kept
    on the model so a new generation replays them instead of tracing again; a copy
    of the model starts without them (a traced graph belongs to its own weights)."""

    def __deepcopy__(self, memo):
        return _Graphs()


def _graph(model: Model, key: tuple, build):
    """The compiled function ``key`` of ``model``, from ``build()`` the first time."""
    graphs = model.__dict__.get("_ouro_compiled")
    if graphs is None:  # not a Module attribute: it must not join the parameters
        graphs = _Graphs()
        object.__setattr__(model, "_ouro_compiled", graphs)
    if key not in graphs:
        graphs[key] = mx.compile(build(), inputs=[model.state])
    return graphs[key]


def _causal_mask(pos: mx.array, length: int, cap: int) -> mx.array:
    """[1, 1, length, cap]: query i (at ``pos + i``) sees positions <= its own."""
    q = pos + mx.arange(length)
    return (mx.arange(cap)[None, :] <= q[:, None])[None, None]


def _run_steps(model: Model, x, steps, buffers, pos, mask):
    """Loop steps ``steps`` over ``x`` [1, L, H] at positions ``pos``.., writing each
    step's K/V into ``buffers[t]``; returns the normalised state, the buffers and
    the last step's per-layer (k, v)."""
    inner = model.model
    start = pos.reshape(1)
    kvs = []
    for t in steps:
        kvs, row = [], []
        for layer, buf in zip(inner.layers, buffers[t]):
            x, kv, buf = _layer(layer, x, t, buf, pos, start, mask)
            kvs.append(kv)
            row.append(buf)
        buffers[t] = row
        x = inner.norm(x)
    return x, buffers, kvs


def _copy_skipped(buffers, steps, kvs, pos):
    """Steps a fixed depth skips receive the last executed step's K/V."""
    start = pos.reshape(1)
    for t in steps:
        buffers[t] = [tuple(mx.slice_update(b, a, start, axes=(2,)) for b, a in zip(buf, kv))
                      for buf, kv in zip(buffers[t], kvs)]
    return buffers


def _layer(layer, x, t, buf, pos, start, mask):
    """``DecoderLayer`` on ``x`` [1, L, H] with its K/V written into ``buf``."""
    attn = layer.self_attn
    L = x.shape[1]
    q, k, v = attn.heads(layer.input_layernorm(x), pos, t)
    keys = mx.slice_update(buf[0], k, start, axes=(2,))
    values = mx.slice_update(buf[1], v, start, axes=(2,))
    o = mx.fast.scaled_dot_product_attention(q, keys, values, scale=attn.scale, mask=mask)
    o = o.transpose(0, 2, 1, 3).reshape(1, L, -1)
    h = attn.project("o_proj", o, t) if attn.loop_keys else attn.o_proj(o)
    x, h = add_norm_norm(x, h, layer.input_layernorm_2.weight,
                         layer.post_attention_layernorm.weight, layer.eps)
    x = add_norm(x, layer.mlp(h, t), layer.post_attention_layernorm_2.weight, layer.eps)
    return x, (k, v), (keys, values)


def _token_graph(model: Model, loops: int, depth: int, shadow: int = 0):
    def token(y: mx.array, pos: mx.array, buffers: list):
        """Token ``y`` [1, 1] at position ``pos`` through every step → logits [1, V]
        (with ``shadow`` k: and the draft step k-1 would propose [1]) and the
        updated buffers."""
        mask = _causal_mask(pos, 1, buffers[0][0][0].shape[2])
        x = model.model.embed_tokens(y)
        buffers = list(buffers)
        x, buffers, _ = _run_steps(model, x, range(shadow), buffers, pos, mask)
        draft = mx.argmax(model.lm_head(x[:, -1]), axis=-1) if shadow else None
        x, buffers, kvs = _run_steps(model, x, range(shadow, loops), buffers, pos, mask)
        buffers = _copy_skipped(buffers, range(loops, depth), kvs, pos)
        if shadow:
            return model.lm_head(x[:, -1]), draft, buffers
        return model.lm_head(x[:, -1]), buffers
    return token


def _draft_graph(model: Model, k: int):
    def draft(y: mx.array, pos: mx.array, buffers: list):
        """Token ``y`` [1, 1] through steps 0..k-1 (``buffers``: theirs) → its state
        [1, 1, H], the argmax of step k-1's logits [1] (the draft), the buffers."""
        mask = _causal_mask(pos, 1, buffers[0][0][0].shape[2])
        x = model.model.embed_tokens(y)
        x, buffers, _ = _run_steps(model, x, range(k), list(buffers), pos, mask)
        return x, mx.argmax(model.lm_head(x[:, -1]), axis=-1), buffers
    return draft


def _verify_graph(model: Model, k: int, loops: int, depth: int):
    def verify(x: mx.array, pos: mx.array, buffers: list):
        """States ``x`` [1, L, H] after steps 0..k-1 through steps k..loops-1
        (``buffers``: steps k..depth-1) → logits [L, V] and those buffers (steps
        past ``loops`` get copies of the last one's K/V)."""
        mask = _causal_mask(pos, x.shape[1], buffers[0][0][0].shape[2])
        full = [None] * k + list(buffers)
        x, full, kvs = _run_steps(model, x, range(k, loops), full, pos, mask)
        full = _copy_skipped(full, range(loops, depth), kvs, pos)
        return model.lm_head(x[0]), full[k:]
    return verify


class CompiledDecoder:
    """Decode at depth ``loops`` through compiled graphs whose K/V live in
    fixed-capacity buffers; built from a prefilled ``cache`` (a list of ``CacheList``
    from ``Model.make_cache``, kv_mode "full").

    ``decoder(y)``: one token through every step. ``draft_and_verify(y, k, n)``: the
    self-speculative round of ``ouro_mlx.speculative`` (n drafts from steps 0..k-1,
    the block through steps k..loops-1 in one call), then ``rollback(r)`` drops the
    r rejected positions: the buffers past the filled length are masked, so
    dropping them is moving the offset back."""

    def __init__(self, model: Model, cache: list, loops: int, chunk: int = 256):
        check_compilable(cache, loops)
        self.model, self.cache, self.loops, self.chunk = model, cache, loops, chunk
        self.depth = cache_depth(cache)
        self.offset = cache[0][0].offset  # the filled length
        cap = self._capacity(self.offset + 1)
        # buffers[t][l] = (keys, values) [1, kv_heads, cap, head_dim]
        self.buffers = []
        for t in range(self.depth):
            row = []
            for layer_cache in cache:
                c = layer_cache[t]
                row.append((self._grow(c.keys, cap), self._grow(c.values, cap))
                           if c.keys is not None else self._empty(cap))
            self.buffers.append(row)
        # traced graphs close over the model and the depths only, never a decoder
        self._step = _graph(model, ("token", loops, self.depth),
                            lambda: _token_graph(model, loops, self.depth))

    def _capacity(self, n: int) -> int:
        return -(-n // self.chunk) * self.chunk

    def _empty(self, cap: int) -> tuple[mx.array, mx.array]:
        a = self.model.args
        shape = (1, a.num_key_value_heads, cap, a.head_dim)
        dtype = self.model.model.embed_tokens.weight.dtype
        if hasattr(self.model.model.embed_tokens, "scales"):  # quantized embedding
            dtype = self.model.model.embed_tokens.scales.dtype
        return mx.zeros(shape, dtype=dtype), mx.zeros(shape, dtype=dtype)

    @staticmethod
    def _grow(a: mx.array, cap: int) -> mx.array:
        """``a`` [B, H, S', D] padded or cut to ``cap`` positions (those past the
        filled prefix are masked, whatever they hold)."""
        if a.shape[2] >= cap:
            return a[:, :, :cap]
        pad = mx.zeros((*a.shape[:2], cap - a.shape[2], a.shape[3]), dtype=a.dtype)
        return mx.concatenate([a, pad], axis=2)

    def _reserve(self, n: int) -> None:
        """Room for ``n`` more positions: grow every buffer by whole chunks (the
        graphs are traced again for the new shape)."""
        cap = self.buffers[0][0][0].shape[2]
        if self.offset + n > cap:
            cap = self._capacity(self.offset + n)
            self.buffers = [[tuple(self._grow(a, cap) for a in kv) for kv in row]
                            for row in self.buffers]

    # -- decoding ----------------------------------------------------------------

    def _pos(self, i: int = 0) -> mx.array:
        """Position ``offset + i`` as the array the graphs take (a traced constant
        would change the graph every token)."""
        return mx.array(self.offset + i, dtype=mx.int32)

    def __call__(self, y: mx.array) -> mx.array:
        """Logits [1, V] for token ``y`` [1, 1]; its K/V go into every step's buffer."""
        self._reserve(1)
        logits, self.buffers = self._step(y, self._pos(), self.buffers)
        self.offset += 1
        return logits

    def shadow(self, y: mx.array, k: int) -> tuple[mx.array, mx.array]:
        """As ``decoder(y)``, also returning the draft steps 0..k-1 propose [1]:
        what a round would have drafted, to estimate the acceptance for free."""
        step = _graph(self.model, ("shadow", self.loops, self.depth, k),
                      lambda: _token_graph(self.model, self.loops, self.depth, k))
        self._reserve(1)
        logits, draft, self.buffers = step(y, self._pos(), self.buffers)
        self.offset += 1
        return logits, draft

    def draft_and_verify(self, y: mx.array, k: int, n: int) -> tuple[mx.array, mx.array]:
        """One speculative round, lazily: the pending token ``y`` [1] and ``n``
        drafts through steps 0..k-1, one compiled call per token, then the block
        through steps k..loops-1 in one call. Returns the drafts [n] and the target
        logits [n+1, V]; the n+1 positions count as filled until ``rollback``."""
        key = (self.loops, self.depth, k)
        draft = _graph(self.model, ("draft", *key), lambda: _draft_graph(self.model, k))
        verify = _graph(self.model, ("verify", *key),
                        lambda: _verify_graph(self.model, k, self.loops, self.depth))
        self._reserve(n + 1)
        head, states, drafts = self.buffers[:k], [], []
        y = y[None]
        for i in range(n + 1):
            x, d, head = draft(y, self._pos(i), head)
            states.append(x)
            if i < n:
                drafts.append(d)
                y = d[None]
        x = mx.concatenate(states, axis=1) if n else states[0]
        logits, tail = verify(x, self._pos(), self.buffers[k:])
        self.buffers = head + tail
        self.offset += n + 1
        d = mx.concatenate(drafts) if n else mx.zeros((0,), dtype=mx.int32)
        return d, logits

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` positions (their buffer slots are masked and will
        be overwritten)."""
        self.offset -= n

    def sync(self) -> None:
        """Hand the buffers back to the ``KVCache`` list (a KVCache keeps spare
        capacity past its offset too, so nothing is copied)."""
        for row, t in zip(self.buffers, range(self.depth)):
            for (k, v), layer_cache in zip(row, self.cache):
                layer_cache[t].state = (k, v, self.offset)


def compiled_step(
    prompt: mx.array,
    model: Model,
    rule: ExitRule,
    cache: list,
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: list | None = None,
    prefill_step_size: int = 2048,
) -> Iterator[tuple[int, mx.array, int]]:
    """Yield ``(token, logprobs, loops)`` like ``plain.generate_step`` at a fixed
    depth, each token one call of a :class:`CompiledDecoder`, token n+1 queued before
    token n is read. The prompt cache is brought up to date when the generator ends
    or is closed."""
    loops = rule.fixed_loops
    check_compilable(cache, loops)
    step = sampling_step(prompt, sampler, logits_processors)
    logits, _ = prefill(model, prompt[None], cache, rule, prefill_step_size)
    y, logprobs = step(logits)
    decoder = CompiledDecoder(model, cache, loops)
    mx.async_eval(y, logprobs)
    try:
        for n in range(max_tokens):
            if n + 1 < max_tokens:
                next_y, next_logprobs = step(decoder(y[:, None]))
                mx.async_eval(next_y, next_logprobs)
            yield host.read(y[0]), logprobs[0], loops
            if n + 1 < max_tokens:
                y, logprobs = next_y, next_logprobs
            if n % 256 == 255:
                mx.clear_cache()
    finally:
        decoder.sync()
