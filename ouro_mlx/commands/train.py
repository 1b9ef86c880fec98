"""ouro-mlx train: train a looped model (from scratch, from a checkpoint, or the
exit gate only) on prepared data. Options come from --config X.yaml; flags win.

  ouro-mlx train --config recipe.yaml --iters 2000
  mlx.launch -n 2 --backend ring -- python -m ouro_mlx train --config recipe.yaml
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import MISSING, fields
from difflib import get_close_matches
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
    """The options: flags win over the --config file. A refusal is one line that names
    the file, or the flag, at fault."""
    from ..training import TrainConfig

    values = read_config_file(args.config) if args.config else {}
    from_file = set(values)
    for f in fields(TrainConfig):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
            from_file.discard(f.name)
    try:
        return TrainConfig.from_dict(values)
    except ValueError as e:
        # a value the file set (and no flag replaced): say which file
        # ("lr must be ...", "model: ...", "a loop_schedule entry's ut_steps ...")
        key = re.match(r"(?:a )?(\w+)", str(e))
        if key and key[1] in from_file:
            raise ValueError(f"--config {args.config}: {e}") from None
        raise


def read_config_file(path: str) -> dict:
    """The option mapping of a YAML recipe; its unknown keys refused, by name."""
    import yaml

    from ..training import TrainConfig

    try:
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh)
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({(e.strerror or str(e)).lower()})"
                         ) from None
    except UnicodeDecodeError:
        raise ValueError(f"--config {path}: cannot read it (not UTF-8 text)") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: cannot read it ({_yaml_message(e)})") from None
    if values is None:  # an empty file
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: must hold a mapping of options (key: value "
                         f"lines), not a {_yaml_kind(values)}")
    names = [f.name for f in fields(TrainConfig)]
    if unknown := [k for k in values if k not in names]:
        raise ValueError(f"--config {path}: unknown option{'s' * (len(unknown) > 1)} "
                         + ", ".join(_unknown(k, names) for k in unknown))
    return dict(values)


def _unknown(key, names: list[str]) -> str:
    """An unknown key, with the option it likely meant (batch-size: batch_size)."""
    text = str(key)
    close = (text.replace("-", "_") if text.replace("-", "_") in names
             else next(iter(get_close_matches(text, names, n=1)), None))
    return f"{key!r} (did you mean {close!r}?)" if close else repr(key)


def _yaml_message(e: Exception) -> str:
    """A YAML parser error in one line: what is wrong, and where."""
    problem = getattr(e, "problem", None) or getattr(e, "context", None)
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return (str(e).splitlines() or [type(e).__name__])[0]


def _yaml_kind(value) -> str:
    return {list: "list", str: "string", int: "number", float: "number",
            bool: "true/false value"}.get(type(value), type(value).__name__)


def summary(last: dict) -> dict:
    """The final metrics as printed: rounded to what they mean (the run's
    history.jsonl keeps them whole)."""
    def loss(x):
        return round(x, 4)

    rounding = {"loss": loss, "lr": lambda x: float(f"{x:.3g}"),
                "tokens_per_s": lambda x: round(x, 1),
                "eval_step_losses": lambda xs: [loss(x) for x in xs],
                "eval_exit_dist": lambda xs: [round(x, 4) for x in xs],
                "eval_expected_loops": lambda x: round(x, 3)}
    return {k: rounding[k](v) if k in rounding and v is not None else v
            for k, v in last.items()}


def saved_line(out: str, trained: bool) -> str | None:
    """Where the run's latest checkpoint is, and how to use it (None without one).
    ``trained``: whether this run took any step (else it was already at --iters)."""
    from ..loading import has_tokenizer, latest_checkpoint

    run = Path(out)
    try:
        ckpt = latest_checkpoint(run.expanduser())
        step = json.loads((ckpt / "trainer_state.json").read_text())["step"] if ckpt else None
    except (OSError, ValueError, KeyError, TypeError):  # CheckpointError is a ValueError
        return None
    if ckpt is None:
        return None
    where = (f"saved {run / ckpt.name} (step {step})" if trained else
             f"nothing to train: {run / ckpt.name} is already at step {step} (raise --iters "
             "to continue)")
    if not has_tokenizer(ckpt):
        return (f"{where}; it holds no tokenizer, so generate cannot use it (pass --tokenizer "
                "DIR, the one the data was prepared with, so checkpoints carry it)")
    return (f"{where}; generate with: ouro-mlx generate --model {shlex.quote(str(run))} "
            '--prompt "Hi"')


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
        from ..loading import (CONFIG_FILES, TOKENIZER_FILES, CheckpointError, has_tokenizer,
                               resolve)

        tokenizer_dir = resolve(args.tokenizer, allow_patterns=CONFIG_FILES + TOKENIZER_FILES)
        if not has_tokenizer(tokenizer_dir):
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
    print(json.dumps(summary(last)), flush=True)  # stdout: the figures, for scripts
    if mx_rank() == 0 and (line := saved_line(cfg.out, trained=bool(last))):
        print(line, file=sys.stderr)
    return 0


def mx_rank() -> int:
    import mlx.core as mx

    return mx.distributed.init().rank()
