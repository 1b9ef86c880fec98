"""ouro-mlx lora: LoRA, DoRA, QLoRA or full finetuning of a looped model.

The flags and YAML keys of mlx_lm.lora, with the same meaning and defaults, plus the
loop-aware ones (--loss, --beta, --ut-steps, --per-loop-adapters, --train-gate).
Data: a --data directory with train/valid/test.jsonl in mlx-lm's formats (messages,
prompt/completion, text). Re-running with the same --adapter-path continues the run
(also after Ctrl-C, which saves first). Without --model it finetunes the bundled demo
model.

  ouro-mlx lora --model DIR --train --data DATA --iters 600 --adapter-path adapters
  ouro-mlx lora --train --data DATA --iters 100 --mask-prompt   # the bundled demo model
  ouro-mlx lora -c lora.yaml --per-loop-adapters --loss ouro --beta 0.05
"""

from __future__ import annotations

import argparse
import math
import sys
from types import SimpleNamespace

DEMO = "demo"  # the bundled demo model (see ouro_mlx.loading.resolve)

OURS = {"loss": "ouro", "beta": 0.1, "ut_steps": None, "per_loop_adapters": False,
        "train_gate": False}
# YAML-only keys mlx-lm reads (besides every flag's dest).
YAML_ONLY = {"lora_parameters", "lr_schedule", "optimizer_config", "prompt_feature",
             "completion_feature", "chat_feature", "text_feature", "hf_dataset"}
INTS = {  # name: lowest value (-1 allowed where noted)
    "batch_size": 1, "iters": 1, "steps_per_report": 1, "steps_per_eval": 1,
    "save_every": 1, "grad_accumulation_steps": 1, "max_seq_length": 2, "seed": 0,
    "clear_cache_threshold": 0}
MINUS_ONE_OK = {"num_layers", "val_batches", "test_batches"}
BOOLS = ("train", "test", "mask_prompt", "grad_checkpoint", "per_loop_adapters",
         "train_gate", "trust_remote_code")
STRINGS = ("model", "data", "adapter_path", "resume_adapter_file", "prompt_feature",
           "completion_feature", "chat_feature", "text_feature")
MODEL_HELP = ("A local Ouro model directory, Hugging Face repo id, or demo (the bundled demo "
              "model; a local directory named demo wins). Default: demo.")
SCHEDULES = ("cosine_decay", "exponential_decay", "linear_schedule", "step_decay")


def build_parser() -> argparse.ArgumentParser:
    from mlx_lm.lora import build_parser as mlx_parser

    p = mlx_parser()
    p.prog = "ouro-mlx lora"
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in p._actions:
        if action.dest == "model":
            action.help = MODEL_HELP
        elif action.dest == "data":
            action.help = "Directory with {train, valid, test}.jsonl files (local only)."
        elif action.dest == "trust_remote_code":
            action.help = argparse.SUPPRESS  # always refused: never offered
    g = p.add_argument_group("looped model")
    g.add_argument("--loss", choices=["ouro", "fixed"], default=None,
                   help="ouro: Stage I, Σ_t p_t·L_t − β·H over every loop step (the "
                        "entropy bonus can take the reported loss below 0 once the "
                        "answers are learnt); fixed: cross-entropy at the last step, as "
                        "mlx_lm.lora. (default: ouro)")
    g.add_argument("--beta", type=float, default=None,
                   help="Entropy weight β of --loss ouro. (default: 0.1)")
    g.add_argument("--ut-steps", type=int, default=None,
                   help="Loop steps T to train with. (default: the model's)")
    g.add_argument("--per-loop-adapters", action="store_true", default=None,
                   help="Give each loop step its own LoRA (A_t, B_t) over the shared "
                        "weights (lora only; cannot be fused).")
    g.add_argument("--train-gate", action="store_true", default=None,
                   help="Also train the exit gate (frozen otherwise).")
    return p


def merge(args: argparse.Namespace) -> dict:
    """Flags win, then the YAML file, then mlx_lm.lora's defaults and ours."""
    from mlx_lm.lora import CONFIG_DEFAULTS

    values = vars(args)
    if values.get("clear_cache_threshold") == 0:
        values["clear_cache_threshold"] = None  # argparse's default: let YAML set it
    if args.config:
        import yaml

        try:
            with open(args.config, encoding="utf-8") as fh:
                config = yaml.safe_load(fh)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"-c {args.config}: cannot read it ({str(e).splitlines()[0]}).")
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise ValueError(f"-c {args.config}: must hold a mapping of options.")
        known = set(values) | set(CONFIG_DEFAULTS) | YAML_ONLY | set(OURS)
        for k, v in config.items():
            if k not in known or k == "config":
                raise ValueError(f"-c {args.config}: unknown key {k!r}.")
            if values.get(k) is None:
                values[k] = v
    values["defaulted"] = set()  # not JSON: never written to adapter_config.json
    if values.get("model") is None:  # mlx-lm's default is a hub model; ours is bundled
        values["model"] = DEMO
        values["defaulted"].add("model")
    for k, v in {**CONFIG_DEFAULTS, **OURS}.items():
        if values.get(k) is None:
            values[k] = v
            values["defaulted"].add(k)
    return values


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(v: dict) -> SimpleNamespace:
    """Every option checked; a refusal is one line naming the flag or key."""
    if not v.get("train") and not v.get("test"):
        raise ValueError("give --train, --test or both.")
    if v.get("hf_dataset"):
        raise ValueError("hf_dataset: ouro-mlx lora reads local --data directories only.")
    if v.get("report_to"):
        raise ValueError("--report-to: not supported by ouro-mlx lora.")
    for k in BOOLS:
        if not isinstance(v.get(k), bool):
            raise ValueError(f"{flag(k)} must be true or false, got {v.get(k)!r}.")
    if v["trust_remote_code"]:
        raise ValueError("--trust-remote-code: ouro-mlx never runs code from a model "
                         "directory.")
    for k in STRINGS:
        if v.get(k) is not None and not isinstance(v[k], str):
            raise ValueError(f"{flag(k)} must be a string, got {v[k]!r}.")
    for k, low in INTS.items():
        x = v[k]
        if isinstance(x, bool) or not isinstance(x, int) or x < low:
            raise ValueError(f"{flag(k)} must be an integer ≥ {low}, got {x!r}.")
    for k in MINUS_ONE_OK:
        x = v[k]
        if isinstance(x, bool) or not isinstance(x, int) or not (x == -1 or x >= 1):
            raise ValueError(f"{flag(k)} must be -1 (all) or an integer ≥ 1, got {x!r}.")
    if v["ut_steps"] is not None:
        from ..model import check_ut_steps

        try:
            check_ut_steps(v["ut_steps"], "--ut-steps")
        except (ValueError, TypeError) as e:
            raise ValueError(str(e)) from None
    lr = v["learning_rate"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (
            math.isfinite(lr) and lr > 0):
        raise ValueError(f"--learning-rate must be a finite number > 0, got {lr!r}.")
    beta = v["beta"]
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (
            math.isfinite(beta) and beta >= 0):
        raise ValueError(f"--beta must be a finite number ≥ 0, got {beta!r}.")
    if v["fine_tune_type"] not in ("lora", "dora", "full"):
        raise ValueError(f"--fine-tune-type must be lora, dora or full, "
                         f"got {v['fine_tune_type']!r}.")
    if v["optimizer"] not in ("adam", "adamw", "muon", "sgd", "adafactor"):
        raise ValueError(f"--optimizer must be adam, adamw, muon, sgd or adafactor, "
                         f"got {v['optimizer']!r}.")
    if v["loss"] not in ("ouro", "fixed"):
        raise ValueError(f"--loss must be ouro or fixed, got {v['loss']!r}.")
    if v["per_loop_adapters"] and v["fine_tune_type"] != "lora":
        raise ValueError("--per-loop-adapters needs --fine-tune-type lora.")
    if not v.get("model"):
        raise ValueError("--model must name an Ouro model directory, repo id or demo.")
    if not v.get("adapter_path") and v["train"]:
        raise ValueError("--adapter-path must name a directory to save the adapters in.")
    check_optimizer_config(v["optimizer_config"])
    check_schedule(v["lr_schedule"])
    lp = v["lora_parameters"]
    if not isinstance(lp, dict):
        raise ValueError(f"lora_parameters must be a mapping, got {lp!r}.")
    if "alpha" in lp:
        raise ValueError("lora_parameters: 'alpha' is not a key here; mlx-lm's LoRA uses "
                         "'scale' (the factor applied to the adapter's output).")
    if v["fine_tune_type"] != "full":
        v["lora_parameters"] = {"rank": 8, "dropout": 0.0, "scale": 20.0, **lp}
    return SimpleNamespace(**v)


def check_optimizer_config(oc) -> None:
    if not isinstance(oc, dict):
        raise ValueError(f"optimizer_config must be a mapping, got {oc!r}.")
    for name, kw in oc.items():
        if kw is None:
            continue
        if not isinstance(kw, dict) or not all(isinstance(k, str) for k in kw):
            raise ValueError(f"optimizer_config.{name} must be a mapping of arguments.")
        for k, x in kw.items():
            items = x if isinstance(x, list) else [x]
            if not all(isinstance(i, (int, float, bool)) and math.isfinite(i) for i in items):
                raise ValueError(f"optimizer_config.{name}.{k} must be a finite number "
                                 "(or a list of them).")


def check_schedule(s) -> None:
    if s is None:
        return
    if not isinstance(s, dict) or set(s) - {"name", "arguments", "warmup", "warmup_init"}:
        raise ValueError("lr_schedule must be a mapping of name, arguments, warmup, "
                         "warmup_init.")
    if s.get("name") not in SCHEDULES:
        raise ValueError(f"lr_schedule.name must be one of {', '.join(SCHEDULES)}, "
                         f"got {s.get('name')!r}.")
    a = s.get("arguments")
    if not isinstance(a, list) or not a or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            for x in a):
        raise ValueError("lr_schedule.arguments must be a non-empty list of numbers.")
    w = s.get("warmup", 0)
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
        raise ValueError(f"lr_schedule.warmup must be an integer ≥ 0, got {w!r}.")
    wi = s.get("warmup_init", 0.0)
    if isinstance(wi, bool) or not isinstance(wi, (int, float)) or not math.isfinite(wi):
        raise ValueError(f"lr_schedule.warmup_init must be a finite number, got {wi!r}.")
    import mlx.optimizers as optim

    try:
        getattr(optim.schedulers, s["name"])(*a)(0)
    except (TypeError, ValueError) as e:
        raise ValueError(f"lr_schedule.arguments do not fit {s['name']}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = validate(merge(args))
    from ..cli import command_line
    from ..finetune import run

    if options.train:  # before any work: a run directory of its own, apart from its sources
        from pathlib import Path

        from ..finetune import RUN_FILES, STATE
        from ..outputs import output_dir

        output_dir(options.adapter_path, "--adapter-path", continues=RUN_FILES, verb="lora",
                   earlier=(Path(options.adapter_path).expanduser() / STATE).is_file(),
                   sources=[("--model", options.model), ("--data", options.data),
                            ("--resume-adapter-file", options.resume_adapter_file),
                            ("-c", options.config)])

    try:
        run(options)
    except KeyboardInterrupt as e:  # Ctrl-C: saved at the last update step (or kept)
        from ..interrupt import TrainingInterrupted

        done = str(e) if isinstance(e, TrainingInterrupted) else (
            f"interrupted; {options.adapter_path} keeps its last checkpoint, if any")
        print(f"ouro-mlx lora: {done}. Resume with: {command_line('lora', argv)}",
              file=sys.stderr)
        return 130
    except OSError as e:  # a full disk while saving: say what survives
        import errno

        if not (options.train and e.errno == errno.ENOSPC):
            raise
        from ..cli import error, os_message

        return error("lora", f"{os_message(e)} {kept(options.adapter_path)}")
    return 0


def kept(adapter_path: str) -> str:
    """What a stopped run leaves in ``adapter_path``: its last checkpoint, or none."""
    import json
    from pathlib import Path

    from ..finetune import STATE

    try:
        n = json.loads((Path(adapter_path) / STATE).read_text())["iteration"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"No checkpoint was written to {adapter_path}."
    return (f"The last checkpoint is kept: {adapter_path} (iteration {n}); free some space "
            "and run the same command to continue.")
