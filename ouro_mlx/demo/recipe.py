"""The recipe that trains the bundled demo model from nothing, with this package's
own training path (``ouro-mlx demo-train --out runs/demo``):

1. task data: ChatML problems from :mod:`ouro_mlx.demo.task` (train and validation
   seeds differ from the held-out evaluation seed);
2. a sentencepiece BPE tokenizer trained on that data (``ouro-mlx tokenizer train``);
3. unpacked shards, loss on the answer only (``ouro-mlx data --no-pack``);
4. Stage I (``loss: stage1``): the LM at every loop step under the exit distribution
   with an entropy bonus, T_max = 4;
5. Stage II (``loss: stage2``): LM frozen, the exit gate trained on per-step loss
   improvements;
6. the model directory (``model/``: weights, config with the demo's default exit
   threshold, tokenizer), ``eval.json`` from :mod:`ouro_mlx.demo.evaluate` and the
   training plots.

Every stage writes what it used (``stage1.yaml``, ``stage2.yaml``) next to its output,
so each step can be rerun by hand with ``ouro-mlx train --config``. Shipping the
result: copy ``model/`` over ``ouro_mlx/demo/model/``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

MODEL = {  # a few hundred thousand parameters: ~1 MB in float32
    "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
    "num_key_value_heads": 4, "intermediate_size": 256, "max_position_embeddings": 64,
    "rope_theta": 10000.0,
}
RECIPE = {
    "train_problems": 100_000,
    "val_problems": 1_000,
    "vocab_size": 320,
    "seq_len": 26,
    "stage1": {"loss": "stage1", "beta": 0.1, "ut_steps": 4, "batch_size": 64, "iters": 2500,
               "lr": 3e-3, "min_lr": 3e-4, "warmup": 100, "weight_decay": 0.01,
               "eval_every": 500, "eval_batches": 4, "save_every": 500},
    "stage2": {"loss": "stage2", "ut_steps": 4, "batch_size": 64, "iters": 300, "lr": 3e-3,
               "min_lr": 3e-4, "warmup": 20, "weight_decay": 0.0, "eval_every": 100,
               "eval_batches": 4, "save_every": 300},
    # the adaptive default: the lowest-loop threshold within 1 point of full depth on
    # validation games (not the held-out evaluation games)
    "exit_thresholds": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
    "threshold_problems": 500,
    "eval_problems": 1000,
}

def choose_threshold(model, tokenizer, n: int) -> tuple[float, list[dict]]:
    """The Q-exit threshold with the fewest loops whose accuracy on validation games
    (seed 1, like the validation data) is within 1 point of full depth."""
    from .evaluate import evaluate

    sweep = []
    for q in RECIPE["exit_thresholds"]:
        r = evaluate(model, tokenizer, n, seed=1, exit_threshold=q, depths=())
        sweep.append({"exit_threshold": q, "accuracy": r["accuracy"]["adaptive"],
                      "avg_loops": r["avg_loops_adaptive"]})
    full = evaluate(model, tokenizer, n, seed=1, exit_threshold=1.0, depths=())
    target = full["accuracy"]["adaptive"] - 0.01
    ok = [s for s in sweep if s["accuracy"] >= target] or [max(sweep, key=lambda s: s["accuracy"])]
    return min(ok, key=lambda s: s["avg_loops"])["exit_threshold"], sweep


def resume_point(out: Path, recipe: dict) -> list[str]:
    """The stages a demo-train run in ``out`` finished, checked to be a run of this
    recipe at this scale."""
    file = out / "recipe.json"
    if not file.is_file():
        raise ValueError(f"--resume: {out} holds no demo-train run (no recipe.json); "
                         "start one without --resume.")
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--resume: {file} is unreadable ({e}); start over with --force.")
    if not isinstance(saved, dict) or saved.get("scale") != recipe["scale"]:
        scale = saved.get("scale") if isinstance(saved, dict) else None
        raise ValueError(f"--resume: {out} was started with --scale {scale}; resume it with "
                         "that --scale, or start over with --force.")
    if saved != json.loads(json.dumps(recipe)):
        raise ValueError(f"--resume: {out} was started by another version of the recipe; "
                         "start over with --force.")
    try:
        done = json.loads((out / PROGRESS).read_text())["done"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [d for d in done if d in ("data", "tokenizer", "shards")] if isinstance(
        done, list) else []


def mark_done(out: Path, done: list[str], stage: str) -> None:
    done.append(stage)
    tmp = out / f".{PROGRESS}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"done": done}))
    os.replace(tmp, out / PROGRESS)


PROGRESS = "progress.json"  # the stages before training that a run finished
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def blas_note() -> str | None:
    """On Linux, MLX's CPU wheel uses the reference BLAS; say so (and how to get ~8×)."""
    if sys.platform != "linux":
        return None
    if OPENBLAS in os.environ.get("LD_PRELOAD", ""):
        return "using the preloaded OpenBLAS"
    hint = (f"LD_PRELOAD={OPENBLAS} ouro-mlx demo-train ..." if os.path.exists(OPENBLAS)
            else "apt-get install libopenblas0-pthread, then run with LD_PRELOAD="
                 f"{OPENBLAS}")
    return ("MLX's Linux CPU wheel uses the reference BLAS: this recipe takes several "
            f"times longer than with OpenBLAS ({hint})")


# What the recipe writes in its --out directory (its manifest names these patterns).
RUN_FILES = ["recipe.json", "data/*", "tokenizer/*", "stage1/*", "stage2/*", "stage1.yaml",
             "stage2.yaml", "model/*", "threshold_sweep.json", "eval.json", PROGRESS]


def run(out: str | Path, *, force: bool = False, scale: float = 1.0, resume: bool = False,
        log=print) -> dict:
    """Run the whole recipe into ``out``; ``scale`` multiplies the training steps
    (for quick trials). ``resume`` continues an interrupted run in ``out``: finished
    stages are kept, a training stage resumes from its last checkpoint. Returns the
    evaluation figures."""
    import yaml

    from ..data import prepare
    from ..loading import load, load_tokenizer
    from ..outputs import output_dir, write_manifest
    from ..tokenizer import train_tokenizer
    from ..training import TrainConfig, train
    from . import task
    from .evaluate import evaluate

    R = RECIPE
    recipe = {"model": MODEL, **R, "scale": scale}
    if resume:  # only a demo-train run of its own, apart from the cwd
        out = output_dir(out, "--out", continues=RUN_FILES, verb="demo-train",
                         earlier=(Path(out).expanduser() / "recipe.json").is_file())
        done = resume_point(out, recipe)
    else:
        done = None
        out = output_dir(out, "--out", force=force)  # --force: only a directory it wrote
    if done is None and out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, "demo-train", RUN_FILES)
    if note := blas_note():
        log(f"note: {note}")
    tic = time.perf_counter()
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2))
    done = done or []

    data = out / "data"
    small = min(scale, 1.0)  # quick trials also use less data
    if "data" not in done:
        log("1/6 task data")
        data.mkdir(exist_ok=True)
        task.write_jsonl(data / "train.jsonl", max(2000, round(R["train_problems"] * small)),
                         seed=0)
        task.write_jsonl(data / "val.jsonl", max(200, round(R["val_problems"] * small)), seed=1)
        mark_done(out, done, "data")

    tok_dir = out / "tokenizer"
    if "tokenizer" not in done:
        log("2/6 tokenizer")
        train_tokenizer([data / "train.jsonl"], tok_dir, vocab_size=R["vocab_size"],
                        default_system=None, force=True)
        mark_done(out, done, "tokenizer")
    tok = load_tokenizer(tok_dir, {"eos_token_id": 0})

    if "shards" not in done:
        log("3/6 shards")
        for split in ("train", "val"):
            prepare([data / f"{split}.jsonl"], data / split, tok, R["seq_len"], pack=False,
                    force=True)
        mark_done(out, done, "shards")

    common = {"data": str(data / "train"), "val_data": str(data / "val"), "seed": 0}
    stages = {}
    for i, name in ((4, "stage1"), (5, "stage2")):
        log(f"{i}/6 {name}")
        cfg = {**common, **R[name], "out": str(out / name)}
        cfg["iters"] = max(1, round(cfg["iters"] * scale))
        cfg["save_every"] = min(cfg["save_every"], cfg["iters"])
        if name == "stage1":
            cfg["model"] = {**MODEL, "vocab_size": len(tok.get_vocab())}
        else:
            cfg["init_from"] = str(stages["stage1"])
        (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        train(TrainConfig.from_dict(cfg), tokenizer_dir=str(tok_dir), log=log)
        stages[name] = out / name / (out / name / "latest").read_text().strip()

    log("6/6 exit threshold, model and evaluation")
    model_dir = out / "model"
    if model_dir.exists():  # left by an interrupted run: rebuilt whole
        shutil.rmtree(model_dir)
    model_dir.mkdir()
    final = stages["stage2"]
    shutil.copy(final / "model.safetensors", model_dir / "model.safetensors")
    for f in tok_dir.iterdir():
        shutil.copy(f, model_dir / f.name)
    shutil.copy(final / "config.json", model_dir / "config.json")
    model, tokenizer = load(str(model_dir))
    q, sweep = choose_threshold(model, tokenizer, max(50, round(R["threshold_problems"] * small)))
    (out / "threshold_sweep.json").write_text(json.dumps(sweep, indent=2))
    log(f"exit threshold {q} (validation sweep in threshold_sweep.json)")
    config = json.loads((model_dir / "config.json").read_text())
    config["early_exit_threshold"] = q  # the demo's adaptive default
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    model.exit_threshold = q  # what loading the written config gives, without reloading
    figures = evaluate(model, tokenizer, max(50, round(R["eval_problems"] * small)))
    figures["recipe_seconds"] = round(time.perf_counter() - tic, 1)
    (out / "eval.json").write_text(json.dumps(figures, indent=2))
    log(json.dumps(figures))
    return figures
