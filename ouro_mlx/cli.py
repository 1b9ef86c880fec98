"""``ouro-mlx <verb>``: a small lazy dispatcher, one module per verb."""

from __future__ import annotations

import errno
import importlib
import os
import sys

VERBS = {
    "generate": "Generate text from a prompt.",
    "chat": "Chat in the terminal (multi-turn, loop depth shown with --show-depth).",
    "bench": "Benchmark speed, memory and loop depth against an unrolled mlx-lm peer.",
    "convert": "Convert between HF PyTorch-format and MLX checkpoints.",
    "data": "Tokenize .txt/.jsonl files into packed training shards.",
    "tokenizer": "Train a sentencepiece tokenizer (BPE or unigram) with ChatML tokens.",
    "lora": "Finetune with LoRA/DoRA/QLoRA/full (loop-aware: Stage I loss, per-loop adapters).",
    "train": "Train a looped model (Stage I, Stage II gate, fixed depth; MLX distributed).",
    "eval": "Score lm-eval tasks at every loop depth from one pass (needs the eval extra).",
    "perplexity": "Perplexity at every loop depth and with adaptive exit, from one pass.",
    "demo-eval": "Accuracy of the bundled demo model at each loop depth and with early exit.",
    "demo-train": "Train the bundled demo model from nothing (its full recipe).",
    "calibrate-exit": "Train only the exit gate on your data (Stage II); fewer loops.",
    "quantize": "Quantize keeping every loop step (loop-aware DWQ, or round to nearest).",
    "fuse": "Merge trained adapters into the base model (MLX, or HF with --export-hf).",
    "random": "Write a random-weight Ouro checkpoint (for trying tools and benchmarks).",
    "app": "A desktop chat window (tokens coloured by loop depth; needs the desktop extra).",
    "serve": "An OpenAI-compatible HTTP server on localhost (needs the server extra).",
}


def usage() -> str:
    lines = ["usage: ouro-mlx <verb> [options]", "", "verbs:"]
    width = max(map(len, VERBS))
    lines += [f"  {verb:<{width}}  {text}" for verb, text in VERBS.items()]
    lines += ["", "ouro-mlx <verb> --help shows a verb's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # no verb: a usage error, the list of verbs on stderr
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        try:
            print(usage(), flush=True)
        except BrokenPipeError:
            quiet_stdout()
        return 0
    verb, rest = argv[0], argv[1:]
    if verb in ("-V", "--version"):
        from . import __version__

        print(f"ouro-mlx {__version__}")
        return 0
    if verb not in VERBS:
        print(unknown_verb(verb), file=sys.stderr)
        return 2
    module = importlib.import_module(f"ouro_mlx.commands.{verb.replace('-', '_')}")
    try:
        return module.main(rest) or 0
    except KeyboardInterrupt as e:  # Ctrl-C: one line and the shell's 130, no traceback
        print(f"\nouro-mlx {verb}: {str(e) or 'interrupted'}.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `ouro-mlx ... | head`: the reader left; stop quietly, as cat does.
        quiet_stdout()
        return 141
    except (ValueError, ImportError, RecursionError) as e:
        # Bad input: say what is wrong, without a traceback.
        return error(verb, e)
    except OSError as e:  # missing files, a full disk, permissions: one line, no traceback
        return error(verb, os_message(e))


def unknown_verb(verb: str) -> str:
    """One line for a verb that is not one: the closest verb, or where the list is."""
    import difflib

    close = difflib.get_close_matches(verb, VERBS, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "ouro-mlx --help lists the verbs."
    return f"ouro-mlx: unknown verb {verb!r}; {hint}"


def command_line(verb: str, argv: list[str] | None) -> str:
    """The command that ran ``verb`` with ``argv``, to paste into a shell."""
    import shlex

    return shlex.join(["ouro-mlx", verb, *(sys.argv[2:] if argv is None else argv)])


def error(verb: str, message: object) -> int:
    print(f"ouro-mlx {verb}: error: {message}", file=sys.stderr)
    return 1


def os_message(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return f"no space left on the device{f' writing {e.filename}' if e.filename else ''}."
    if e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def quiet_stdout() -> None:
    """After a broken pipe, point stdout at devnull so the interpreter's final flush
    does not raise again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
