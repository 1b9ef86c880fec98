"""ouro-mlx train: train a looped model (from scratch, from a checkpoint, or the
exit gate only) on prepared data. Options come from --config X.yaml; flags win.

  ouro-mlx train --config recipe.yaml --iters 2000
  mlx.launch -n 2 --backend ring -- python -m ouro_mlx train --config recipe.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from ..training import HELP, TrainConfig

    p = argparse.ArgumentParser(prog="ouro-mlx train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="YAML",
                   help="YAML file whose keys are the options below (with _ for -).")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="Model directory, repo id or demo (the bundled demo model) whose "
                        "tokenizer files are copied into checkpoints.")
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()
        # the default shows in the help; None keeps "not given" apart so YAML values stand
        text = f"{HELP[f.name]} (default: {json.dumps(default)})"
        if isinstance(default, bool):
            kw = dict(type=_bool, metavar="true|false")
        elif isinstance(default, (list, dict)):
            kw = dict(type=_json, metavar="JSON")
        else:
            kw = dict(type=type(default) if default is not None else str)
        p.add_argument(f"--{f.name.replace('_', '-')}", default=None, help=text, **kw)
    return p


def _json(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg}): {s!r}") from None


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def load_config(args: argparse.Namespace):
    from ..training import TrainConfig

    values = {}
    if args.config:
        import yaml

        try:
            with open(args.config) as fh:
                values = yaml.safe_load(fh) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"Cannot read {args.config}: {e}") from e
        if not isinstance(values, dict):
            raise ValueError(f"{args.config} must hold a mapping of options.")
    for f in fields(TrainConfig):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    return TrainConfig.from_dict(values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args)
    from ..cli import command_line, error, os_message
    from ..outputs import output_dir
    from ..training import RUN_FILES, NonFiniteLoss, kept, train

    # before any work: a run directory of its own, apart from everything it reads
    output_dir(cfg.out, "--out", continues=RUN_FILES, verb="train",
               earlier=(Path(cfg.out).expanduser() / "latest").is_file(),
               sources=[("--data", cfg.data), ("--val-data", cfg.val_data),
                        ("--init-from", cfg.init_from), ("--tokenizer", args.tokenizer),
                        ("--config", args.config)])

    tokenizer_dir = None
    if args.tokenizer is not None:
        from ..loading import CONFIG_FILES, TOKENIZER_FILES, CheckpointError, resolve

        tokenizer_dir = resolve(args.tokenizer, allow_patterns=CONFIG_FILES + TOKENIZER_FILES)
        if not (tokenizer_dir / "tokenizer.json").is_file() and not (
                tokenizer_dir / "tokenizer.model").is_file():
            raise CheckpointError(f"--tokenizer {args.tokenizer}: no tokenizer.json in "
                                  f"{tokenizer_dir}.")
    try:
        last = train(cfg, tokenizer_dir=tokenizer_dir and str(tokenizer_dir))
    except KeyboardInterrupt as e:  # Ctrl-C: the step in flight was saved (or the last kept)
        from ..interrupt import TrainingInterrupted

        done = (str(e) if isinstance(e, TrainingInterrupted)
                else f"interrupted. {kept(Path(cfg.out))}")
        print(f"ouro-mlx train: {done}. Resume with: {command_line('train', argv)}",
              file=sys.stderr)
        return 130
    except NonFiniteLoss as e:
        print(f"ouro-mlx train: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk mid-run: say what survives
        return error("train", f"{os_message(e)} {kept(Path(cfg.out))}.")
    print(json.dumps(last))
    return 0
