"""A slow, obviously-correct Ouro decoder in NumPy float64 for checking the fast path.

No cache objects: every call recomputes the whole sequence token by token from the
weights, with the rules written out plainly:
- prompt tokens run all T steps;
- a generated token runs steps until its exit rule stops it; the deeper steps'
  K/V of that token are copies of its exit step's K/V (kv_mode "full"), or only the
  exit step's K/V is kept in one history per layer that every step reads ("last";
  the prompt keeps its last step's K/V).
"""

from __future__ import annotations

import numpy as np
from mlx.utils import tree_flatten


class Reference:
    def __init__(self, model):
        self.w = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(model.parameters())}
        a = model.args
        self.L, self.nh, self.nkv, self.hd = (a.num_hidden_layers, a.num_attention_heads,
                                              a.num_key_value_heads, a.head_dim)
        self.eps, self.theta = a.rms_norm_eps, a.rope_theta

    def rms(self, x, name):
        return self.w[name] * x / np.sqrt(np.mean(x * x) + self.eps)

    def rope(self, x, pos):  # x [heads, hd], half-split layout
        half = self.hd // 2
        inv = 1.0 / self.theta ** (np.arange(half) * 2 / self.hd)
        ang = pos * np.concatenate([inv, inv])
        rot = np.concatenate([-x[:, half:], x[:, :half]], axis=-1)
        return x * np.cos(ang) + rot * np.sin(ang)

    def layer(self, l, x, pos, past_k, past_v):
        """One sandwich block for one token; returns (x, k, v)."""
        p, W = f"model.layers.{l}.", self.w
        h = self.rms(x, p + "input_layernorm.weight")
        q = (W[p + "self_attn.q_proj.weight"] @ h).reshape(self.nh, self.hd)
        k = (W[p + "self_attn.k_proj.weight"] @ h).reshape(self.nkv, self.hd)
        v = (W[p + "self_attn.v_proj.weight"] @ h).reshape(self.nkv, self.hd)
        q, k = self.rope(q, pos), self.rope(k, pos)
        keys, values = np.stack(past_k + [k], 1), np.stack(past_v + [v], 1)  # [nkv, n, hd]
        rep = self.nh // self.nkv
        out = np.empty((self.nh, self.hd))
        for head in range(self.nh):
            s = keys[head // rep] @ q[head] / np.sqrt(self.hd)
            e = np.exp(s - s.max())
            out[head] = (e / e.sum()) @ values[head // rep]
        x = x + self.rms(W[p + "self_attn.o_proj.weight"] @ out.reshape(-1),
                         p + "input_layernorm_2.weight")
        h = self.rms(x, p + "post_attention_layernorm.weight")
        g, u = W[p + "mlp.gate_proj.weight"] @ h, W[p + "mlp.up_proj.weight"] @ h
        m = W[p + "mlp.down_proj.weight"] @ (g / (1 + np.exp(-g)) * u)
        return x + self.rms(m, p + "post_attention_layernorm_2.weight"), k, v

    def run(self, tokens, depths, n_prompt, T, rule, mode="full"):
        """Process ``tokens`` (the first ``n_prompt`` are the prompt); ``depths[i]`` is
        token i's loop count, None for "decide by ``rule``" (the last token). Returns
        the last token's logits and loops; a prompt token runs all T steps and the
        rule only picks which step's state gives its logits."""
        K = [[[] for _ in range(self.L)] for _ in range(T)]
        V = [[[] for _ in range(self.L)] for _ in range(T)]
        shared_k = shared_v = None
        for i, tok in enumerate(tokens):
            last = i == len(tokens) - 1
            if mode == "last" and i == n_prompt:
                # the prompt ended: keep only its last step's K/V
                shared_k = [list(K[T - 1][l]) for l in range(self.L)]
                shared_v = [list(V[T - 1][l]) for l in range(self.L)]
            x = self.w["model.embed_tokens.weight"][tok]
            hs, cdf, surv, stopped_at = [], 0.0, 1.0, None
            for t in range(depths[i] or T):
                kv = []
                for l in range(self.L):
                    if shared_k is not None:
                        x, k, v = self.layer(l, x, i, shared_k[l], shared_v[l])
                    else:
                        x, k, v = self.layer(l, x, i, K[t][l], V[t][l])
                    kv.append((k, v))
                x = self.rms(x, "model.norm.weight")
                hs.append(x)
                w = self.w
                gate = w["model.early_exit_gate.weight"] @ x + w["model.early_exit_gate.bias"]
                lam = 1 / (1 + np.exp(-gate[0]))
                cdf, surv = cdf + lam * surv, surv * (1 - lam)
                if stopped_at is None and rule_stops(rule, t, cdf, hs):
                    stopped_at = t
                if shared_k is None:
                    for l in range(self.L):
                        K[t][l].append(kv[l][0])
                        V[t][l].append(kv[l][1])
                if depths[i] is None and stopped_at is not None:
                    break
            ran = len(hs)
            if shared_k is not None:
                for l in range(self.L):
                    shared_k[l].append(kv[l][0])
                    shared_v[l].append(kv[l][1])
            else:
                for t in range(ran, T):  # copy the exit step's K/V into skipped steps
                    for l in range(self.L):
                        K[t][l].append(kv[l][0])
                        V[t][l].append(kv[l][1])
            if last:
                chosen = stopped_at if stopped_at is not None else ran - 1
                return self.w["lm_head.weight"] @ hs[chosen], chosen + 1


def rule_stops(rule, t, cdf, hs) -> bool:
    loops = t + 1
    if loops >= rule.ceiling:
        return True
    if rule.at_step is not None:
        return loops >= max(rule.at_step + 1, rule.min_loops)
    if loops < rule.min_loops:
        return False
    if rule.threshold is not None and rule.threshold < 1.0 and cdf >= rule.threshold:
        return True
    if rule.hidden_eps is not None and t > 0:
        change = np.linalg.norm(hs[t] - hs[t - 1]) / np.linalg.norm(hs[t - 1])
        return change < rule.hidden_eps
    return False


def reference_greedy(ref, prompt, n, T, rule, mode="full"):
    """Greedy tokens and their loop counts, recomputing everything for each token."""
    tokens, depths = list(prompt), [T] * len(prompt)
    logits, loops = ref.run(tokens, depths, len(prompt), T, rule, mode)
    out, out_loops = [int(np.argmax(logits))], [loops]
    for _ in range(n - 1):
        tokens.append(out[-1])
        depths.append(None)
        logits, loops = ref.run(tokens, depths, len(prompt), T, rule, mode)
        depths[-1] = loops
        out.append(int(np.argmax(logits)))
        out_loops.append(loops)
    return out, out_loops
