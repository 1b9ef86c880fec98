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

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from .model import Model, add_norm, add_norm_norm, cache_depth


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


class CompiledDecoder:
    """Decode one token at a time at depth ``loops`` through a compiled graph whose
    K/V live in fixed-capacity buffers; built from a prefilled ``cache`` (a list of
    ``CacheList`` from ``Model.make_cache``, kv_mode "full")."""

    def __init__(self, model: Model, cache: list, loops: int, chunk: int = 256):
        check_compilable(cache, loops)
        self.model, self.cache, self.loops, self.chunk = model, cache, loops, chunk
        self.depth = cache_depth(cache)
        self.offset = cache[0][0].offset  # host copy of the filled length
        self.pos = mx.array(self.offset, dtype=mx.int32)
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
        self._step = mx.compile(self._token, inputs=[model.state])

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

    def _token(self, y: mx.array, pos: mx.array, buffers: list) -> tuple[mx.array, list]:
        """The traced graph: token ``y`` [1, 1] at position ``pos`` → logits [1, V]
        and the updated buffers."""
        inner = self.model.model
        cap = buffers[0][0][0].shape[2]
        mask = (mx.arange(cap) <= pos)[None, None, None, :]  # the filled prefix + this
        start = pos.reshape(1)
        x = inner.embed_tokens(y)
        out = [list(row) for row in buffers]
        for t in range(self.loops):
            kvs = []
            for l, layer in enumerate(inner.layers):
                x, kv, out[t][l] = self._layer(layer, x, t, out[t][l], pos, start, mask)
                kvs.append(kv)
            x = inner.norm(x)
        for t in range(self.loops, self.depth):  # skipped steps copy the last one's K/V
            out[t] = [tuple(mx.slice_update(b, a, start, axes=(2,)) for b, a in zip(buf, kv))
                      for buf, kv in zip(out[t], kvs)]
        return self.model.lm_head(x[:, -1]), out

    @staticmethod
    def _layer(layer, x, t, buf, pos, start, mask):
        """``DecoderLayer`` on one token with its K/V written into ``buf``."""
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        if attn.loop_keys:
            q, k, v = (attn.project(n, h, t) for n in ("q_proj", "k_proj", "v_proj"))
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q = q.reshape(1, 1, attn.n_heads, -1).transpose(0, 2, 1, 3)
        k = k.reshape(1, 1, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = v.reshape(1, 1, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = attn.rope(q, offset=pos), attn.rope(k, offset=pos)
        keys = mx.slice_update(buf[0], k, start, axes=(2,))
        values = mx.slice_update(buf[1], v, start, axes=(2,))
        o = mx.fast.scaled_dot_product_attention(q, keys, values, scale=attn.scale, mask=mask)
        o = o.transpose(0, 2, 1, 3).reshape(1, 1, -1)
        h = attn.project("o_proj", o, t) if attn.loop_keys else attn.o_proj(o)
        x, h = add_norm_norm(x, h, layer.input_layernorm_2.weight,
                             layer.post_attention_layernorm.weight, layer.eps)
        x = add_norm(x, layer.mlp(h, t), layer.post_attention_layernorm_2.weight, layer.eps)
        return x, (k, v), (keys, values)

    def __call__(self, y: mx.array) -> mx.array:
        """Logits [1, V] for token ``y`` [1, 1]; its K/V go into every step's buffer."""
        cap = self.buffers[0][0][0].shape[2]
        if self.offset + 1 > cap:  # full: grow by a chunk (the graph is traced again)
            cap = self._capacity(self.offset + 1)
            self.buffers = [[tuple(self._grow(a, cap) for a in kv) for kv in row]
                            for row in self.buffers]
        logits, self.buffers = self._step(y, self.pos, self.buffers)
        self.pos = self.pos + 1
        self.offset += 1
        return logits

    def sync(self) -> None:
        """Hand the buffers back to the ``KVCache`` list (a KVCache keeps spare
        capacity past its offset too, so nothing is copied)."""
        for row, t in zip(self.buffers, range(self.depth)):
            for (k, v), layer_cache in zip(row, self.cache):
                layer_cache[t].state = (k, v, self.offset)


def compiled_steps(model: Model, cache: list, loops: int, y: mx.array, logprobs: mx.array,
                   sample, max_tokens: int):
    """``generate_step``'s fixed-depth loop on a :class:`CompiledDecoder`: yields
    ``(token, logprobs, loops)``, token n+1 queued before token n is handed out.
    ``sample(logits) -> (y, logprobs)``. The prompt cache is brought up to date
    when the loop ends (or is closed)."""
    decoder = CompiledDecoder(model, cache, loops)
    mx.async_eval(y, logprobs)
    try:
        for n in range(max_tokens):
            if n + 1 < max_tokens:
                next_y, next_logprobs = sample(decoder(y[:, None]))
                mx.async_eval(next_y, next_logprobs)
            yield y.item(), logprobs[0], loops
            if n + 1 < max_tokens:
                y, logprobs = next_y, next_logprobs
            if n % 256 == 255:
                mx.clear_cache()
    finally:
        decoder.sync()
