"""Look inside the loop: each step's top prediction and the exit gate's distribution.

    python examples/loop_depth.py [MODEL] [TEXT]
    python examples/loop_depth.py ByteDance/Ouro-1.4B "The capital of France is"

MODEL defaults to the bundled demo model, TEXT to one of its questions.
"""

import argparse

import mlx.core as mx

import ouro_mlx
from ouro_mlx import exit as ex
from ouro_mlx.demo import model_path
from ouro_mlx.encoding import encode_text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=str(model_path()),
                   help="Checkpoint directory or repo id (default: the bundled demo model).")
    p.add_argument("text", nargs="?", default="2,23,14,31",
                   help="Text whose next token to look at.")
    args = p.parse_args()
    model, tokenizer = ouro_mlx.load(args.model)
    ids = mx.array([encode_text(tokenizer, args.text)])
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
