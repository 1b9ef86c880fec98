"""Load an Ouro checkpoint and generate, using the public API and mlx-lm's generator.

    python examples/generate.py MODEL "What is 2+2?" [UT_STEPS]
"""

import sys

from mlx_lm import generate

import ouro_mlx


def main() -> None:
    model_path, prompt = sys.argv[1], sys.argv[2]
    ut_steps = int(sys.argv[3]) if len(sys.argv) > 3 else None
    model, tokenizer = ouro_mlx.load(model_path, ut_steps=ut_steps)
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    print(generate(model, tokenizer, ids, max_tokens=32))


if __name__ == "__main__":
    main()
