"""Load an Ouro checkpoint and generate, using the public API and mlx-lm's generator.

    python examples/generate.py [MODEL] [PROMPT] [UT_STEPS]
    python examples/generate.py ByteDance/Ouro-1.4B-Thinking "What is 2+2?" 4

MODEL defaults to the bundled demo model, PROMPT to one of its questions.
"""

import argparse

from mlx_lm import generate

import ouro_mlx
from ouro_mlx.demo import model_path
from ouro_mlx.encoding import encode_chat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=str(model_path()),
                   help="Checkpoint directory or repo id (default: the bundled demo model).")
    p.add_argument("prompt", nargs="?", default="2,23,14,31", help="The user message.")
    p.add_argument("ut_steps", nargs="?", type=int, default=None,
                   help="Loop steps per token (default: the config's).")
    args = p.parse_args()
    model, tokenizer = ouro_mlx.load(args.model, ut_steps=args.ut_steps)
    messages = [{"role": "user", "content": args.prompt}]
    ids = encode_chat(tokenizer, messages, add_generation_prompt=True)  # content as plain text
    print(generate(model, tokenizer, ids, max_tokens=32))


if __name__ == "__main__":
    main()
