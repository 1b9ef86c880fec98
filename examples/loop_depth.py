"""Look inside the loop: each step's top prediction and the exit gate's distribution.

    python examples/loop_depth.py MODEL "The capital of France is"
"""

import sys

import mlx.core as mx

import ouro_mlx
from ouro_mlx import exit as ex


def main() -> None:
    model, tokenizer = ouro_mlx.load(sys.argv[1])
    ids = mx.array([tokenizer.encode(sys.argv[2], add_special_tokens=False)])
    out = model.loop_outputs(ids)
    pdf = ex.exit_pdf(out.gate_logits)[0, -1]  # last position, [T]
    for t, h in enumerate(out.hidden):
        token = mx.argmax(model.lm_head(h[:, -1]), axis=-1).item()
        print(f"step {t + 1}: next token {tokenizer.decode([token])!r:>16}  "
              f"p(exit here) = {pdf[t].item():.3f}")
    for q in (0.5, 0.9, 1.0):
        step = ex.select_exit_step(ex.exit_cdf(pdf[None, None]), q).item()
        print(f"Q-exit at threshold {q}: step {step + 1}")


if __name__ == "__main__":
    main()
