"""Finding, reading, checking and saving Ouro checkpoints.

The one module that talks to the Hugging Face hub and to mlx-lm's loader
internals. Nothing here imports or executes code from a model directory.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import secrets
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .limits import check_fits
from .model import Model, ModelArgs, estimate_model_bytes
from .outputs import (describe, files_in, foreign_files, looks_like_repo_id, output_dir,
                      write_manifest)
from .untrusted import CheckpointError, lies_inside, read_json_object

# Files a checkpoint directory may hold that we read. No "*.py": we never run them.
CONFIG_FILES = ["config.json", "generation_config.json"]
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
]
WEIGHT_PATTERNS = ["model*.safetensors", "model.safetensors.index.json"]
TORCH_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth"]

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
CHAT_END = "<|im_end|>"
DEMO = "demo"  # the short name of the bundled demo model


def parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype | None:
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def resolve(
    path_or_repo: str | Path,
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """A local directory, the bundled demo model (``"demo"``; a local directory
    named ``demo`` wins), the latest checkpoint of a training run (its output
    directory, or the ``latest`` file in it), or a Hugging Face repo id fetched into
    (or found in, with ``HF_HUB_OFFLINE=1``) the local HF cache, with a progress bar."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return latest_checkpoint(path) or path
    if path.is_file() and path.name == "latest":
        if ckpt := latest_checkpoint(path.parent):
            return ckpt
    if names_demo(path_or_repo):
        from .demo import model_path

        return model_path()
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint directory.")
    repo = str(path_or_repo)
    if not looks_like_repo_id(repo):
        raise FileNotFoundError(f"No such directory: {path_or_repo}")
    from huggingface_hub import snapshot_download

    patterns = allow_patterns or CONFIG_FILES + TOKENIZER_FILES + WEIGHT_PATTERNS
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as e:  # the hub raises many types; all mean "not available"
        raise FileNotFoundError(
            f"{repo!r} is not a local directory and could not be fetched from the "
            f"Hugging Face hub ({hub_reason(e, revision)}). Offline, it must already be "
            "in the local HF cache (HF_HUB_OFFLINE=1 reads only from there)."
        ) from e


def hub_reason(e: Exception, revision: str | None = None) -> str:
    """Why the hub gave nothing, in a few words on one line (its own messages run to
    several lines of advice)."""
    from huggingface_hub import errors

    if isinstance(e, errors.RevisionNotFoundError):
        return f"it has no revision {revision!r}"
    if isinstance(e, errors.GatedRepoError):
        return "a gated repository: accept its terms on the hub, then log in"
    if isinstance(e, errors.RepositoryNotFoundError):
        return "no such repository, or it is private"
    if isinstance(e, errors.LocalEntryNotFoundError):
        return "not in the local cache, and the hub could not be reached"
    first = " ".join(str(e).split("\n")[0].split())
    return f"{type(e).__name__}: {first[:160]}"


def names_demo(path_or_repo: str | Path | None) -> bool:
    """Whether ``resolve`` takes this name for the bundled demo model."""
    return str(path_or_repo) == DEMO and not Path(DEMO).is_dir()


def latest_checkpoint(run: Path) -> Path | None:
    """The checkpoint a training run's ``latest`` file names (``ouro-mlx train``'s
    output directory), or None when ``run`` is not such a directory. A ``latest``
    naming anything but a ``ckpt-STEP`` directory beside it is refused."""
    latest = run / "latest"
    if (run / "config.json").exists() or not latest.is_file():
        return None
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    ckpt = run / name
    if not re.fullmatch(r"ckpt-\d+", name) or not ckpt.is_dir():
        raise CheckpointError(f"{latest} does not name a checkpoint directory of {run} "
                              f"(it holds {name[:40]!r}); give a ckpt-STEP directory.")
    return ckpt


def read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.exists():
        raise CheckpointError(f"{path} has no config.json; is it a model directory?")
    config = read_json_object(file)
    if config.get("model_type") != "ouro":
        raise CheckpointError(
            f"{file} has model_type {config.get('model_type')!r}; ouro-mlx loads only "
            "Ouro checkpoints (model_type 'ouro')."
        )
    check_eos(config.get("eos_token_id"), file)
    check_quantization(config.get("quantization"), file)
    gen = path / "generation_config.json"
    if gen.exists():
        eos = read_json_object(gen).get("eos_token_id")
        if eos is not None:
            config["eos_token_id"] = check_eos(eos, gen)
    return config


def check_eos(eos: Any, file: Path) -> Any:
    ids = eos if isinstance(eos, list) else [eos]
    if eos is not None and not (ids and all(is_token_id(i) for i in ids)):
        raise CheckpointError(
            f"{file}: eos_token_id must be a token id or a list of them, got {eos!r}."
        )
    return eos


def is_token_id(i: Any) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) and i >= 0


def check_quantization(quant: Any, file: Path) -> None:
    """mlx-lm's ``quantization``: bits, group_size and mode, plus per-layer entries
    (a bool, or an object with their own bits and group_size)."""
    if quant is None:
        return
    if not isinstance(quant, dict):
        raise CheckpointError(f"{file}: quantization must be an object with bits and "
                              f"group_size, got {quant!r}.")
    entries = [("quantization", quant)] + [
        (f"quantization.{k}", v) for k, v in quant.items() if isinstance(v, dict)
    ]
    for name, entry in entries:
        for key in ("bits", "group_size"):
            value = entry.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(
                    f"{file}: {name}.{key} must be a positive integer, got {value!r}."
                )
        if not isinstance(entry.get("mode", ""), str):
            raise CheckpointError(f"{file}: {name}.mode must be a string.")
    if bad := [k for k, v in quant.items()
               if k not in ("bits", "group_size", "mode") and not isinstance(v, (bool, dict))]:
        raise CheckpointError(f"{file}: quantization.{bad[0]} must be true, false or an "
                              "object with bits and group_size.")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint; with an index, exactly those it names."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = files_inside(path, index_names(index), named_by=index)
        if missing := [f.name for f in files if not f.exists()]:
            raise CheckpointError(f"{index} names missing files: {', '.join(missing)}")
        return files
    files = sorted(Path(f) for f in glob.glob(str(path / "model*.safetensors")))
    if not files:
        torch_files = [f for p in TORCH_PATTERNS for f in glob.glob(str(path / p))]
        hint = (
            " It holds PyTorch weights; convert them first: "
            f"ouro-mlx convert --hf-path {path} --mlx-path OUT"
            if torch_files
            else ""
        )
        raise CheckpointError(f"No model*.safetensors in {path}.{hint}")
    return files_inside(path, [f.name for f in files])


def index_names(index: Path) -> list[str]:
    """The file names a shard index's ``weight_map`` points to."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(n, str) for n in weight_map.values()
    ):
        raise CheckpointError(f"{index} has no weight_map object of tensor → file name.")
    return sorted(set(weight_map.values()))


def files_inside(path: Path, names: list[str], named_by: Path | None = None) -> list[Path]:
    """``path / name`` for each name, refusing any that resolves outside ``path``."""
    if outside := [n for n in names if not lies_inside(path, n)]:
        where = f"{named_by}: " if named_by else ""
        raise CheckpointError(f"{where}{path / outside[0]} lies outside {path}; weight files "
                              "must lie inside the model directory.")
    return [path / n for n in names]


def read_safetensors(files: list[Path]) -> dict[str, mx.array]:
    """Lazily read tensors (nothing is materialised until evaluated)."""
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise CheckpointError(f"Cannot read {f} (truncated or corrupt?): {e}") from e
    return weights


def check_weights(model: nn.Module, weights: dict[str, mx.array]) -> None:
    """One error listing every missing, unexpected and misshapen tensor."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(weights[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    # Floats where the model holds floats; quantized weights are packed integers.
    dtypes = [
        f"{k}: checkpoint {weights[k].dtype}, model {v.dtype}"
        for k, v in expected.items()
        if k in weights and is_float(weights[k]) != is_float(v)
    ]
    problems = [
        (f"missing tensors ({len(missing)})", missing),
        (f"unexpected tensors ({len(extra)})", extra),
        (f"wrong shapes ({len(shapes)})", shapes),
        (f"wrong dtypes ({len(dtypes)})", dtypes),
    ]
    if any(items for _, items in problems):
        lines = [f"  {title}:\n" + "\n".join(f"    {i}" for i in items)
                 for title, items in problems if items]
        raise CheckpointError("The checkpoint does not match its config:\n" + "\n".join(lines))


def is_float(x: mx.array) -> bool:
    return mx.issubdtype(x.dtype, mx.floating)


def apply_quantization(model: nn.Module, config: dict, weights: dict) -> None:
    """Turn the layers an mlx-lm checkpoint stores quantized into quantized layers
    (per-layer settings from the config, else inferred from the stored shapes)."""
    from mlx_lm.utils import infer_quant_config

    quant = config.get("quantization")
    if quant is None:
        return

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if path in quant and isinstance(quant[path], (bool, dict)):
            return quant[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(
        model,
        group_size=quant.get("group_size", 64),
        bits=quant.get("bits", 4),
        mode=quant.get("mode", "affine"),
        class_predicate=predicate,
    )


def cast_floats(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
        for k, v in weights.items()
    }


@contextmanager
def write_errors(dest: Path, nbytes: int) -> Iterator[None]:
    """Writes into a temporary directory for ``dest``: a full disk is reported as an
    OSError naming ``dest``, not the temporary file. MLX reports failed writes as a
    RuntimeError without an errno; they mean a full disk when ``nbytes`` do not fit."""
    try:
        yield
    except RuntimeError as e:
        full = shutil.disk_usage(Path(dest).parent).free < nbytes
        raise OSError(errno.ENOSPC if full else errno.EIO, str(e), str(dest)) from e
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise OSError(errno.ENOSPC, e.strerror, str(dest)) from e


def destination(path: str | Path, flag: str, force: bool,
                sources: Iterable[tuple[str, Any]] = ()) -> Path:
    """The absolute path of a model directory to write, checked before any work
    (:func:`ouro_mlx.outputs.output_dir`): never a source, the working directory or
    a file; a non-empty directory only with ``force`` and only one ouro-mlx wrote."""
    return output_dir(path, flag, force=force, sources=sources)


def build_model(
    path: Path,
    config: dict,
    *,
    dtype: str | mx.Dtype | None = None,
    lazy: bool = False,
) -> Model:
    dtype = parse_dtype(dtype)
    model = Model(model_args(path, config, dtype))
    weights = model.sanitize(read_safetensors(weight_files(path)))
    apply_quantization(model, config, weights)
    check_weights(model, weights)
    if dtype is not None:
        weights = cast_floats(weights, dtype)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model


def model_args(path: Path, config: dict, dtype: mx.Dtype | None = None) -> ModelArgs:
    """The checked ``ModelArgs`` of ``path``'s config, refused before anything is
    allocated when the model would not fit in memory (stored at ``dtype``)."""
    try:
        args = ModelArgs.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    if quant := config.get("quantization"):
        per_param = quant.get("bits", 4) / 8
    else:
        stored = config.get("torch_dtype") or config.get("dtype")
        per_param = (dtype or DTYPES.get(stored if isinstance(stored, str) else "",
                                         mx.bfloat16)).size
    try:
        check_fits(estimate_model_bytes(args, per_param),
                   f"The model that {path / 'config.json'} describes")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return args


def load_model(
    path_or_repo: str | Path,
    *,
    dtype: str | mx.Dtype | None = None,
    lazy: bool = False,
    ut_steps: int | None = None,
    exit_threshold: float | None = None,
    revision: str | None = None,
    adapter_path: str | Path | None = None,
    fuse: bool = False,
) -> Model:
    """Load an Ouro model (HF safetensors or an mlx-lm/ouro-mlx MLX directory).

    Args:
        path_or_repo: a local directory or a Hugging Face repo id.
        dtype: cast floating weights ("float32", "bfloat16", "float16").
        lazy: leave weights unevaluated (read on first use).
        ut_steps: default loop steps, overriding the config's ``total_ut_steps``.
        exit_threshold: default Q-exit threshold, overriding ``early_exit_threshold``.
        revision: hub revision (branch, tag or commit).
        adapter_path: a directory of adapters (``ouro-mlx lora``'s or mlx-lm's:
            adapter_config.json + adapters.safetensors) to apply, unfused.
        fuse: for inference only: q/k/v and gate/up as one projection each
            (``Model.fuse_projections``; skipped with adapters). Same outputs, fewer
            kernels; such a model cannot be saved, adapted or trained.
    """
    path = resolve(path_or_repo, revision)
    model = build_model(path, read_config(path), dtype=dtype, lazy=lazy)
    apply_adapter_dir(model, adapter_path)
    set_runtime_defaults(model, ut_steps, exit_threshold)
    if fuse:
        model.fuse_projections()
    return model


def apply_adapter_dir(model: Model, adapter_path: str | Path | None) -> None:
    if adapter_path is None:
        return
    from .adapters import load_adapters

    load_adapters(model, adapter_path)
    model.eval()


def set_runtime_defaults(
    model: Model, ut_steps: int | None, exit_threshold: float | None
) -> None:
    from .exit import check_threshold
    from .model import check_ut_steps

    if ut_steps is not None:
        model.ut_steps = check_ut_steps(ut_steps)
    if exit_threshold is not None:
        model.exit_threshold = check_threshold(exit_threshold)


def has_tokenizer(path: Path) -> bool:
    """Whether ``path`` holds a tokenizer (``tokenizer.json`` or sentencepiece's
    ``tokenizer.model``)."""
    return (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()


def load_tokenizer(path: Path, config: dict | None = None):
    """mlx-lm's tokenizer wrapper; stops on the config's eos and on ``<|im_end|>``
    (the released configs say eos = 0, but chat turns end with ``<|im_end|>``)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer_wrapper

    if not has_tokenizer(path):
        raise CheckpointError(f"{path} has no tokenizer (tokenizer.json).")
    eos = (config or {}).get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    register_hf_config()
    with quiet_transformers():
        try:
            # Never run, nor offer to run, a tokenizer's or config's code from ``path``.
            tokenizer = load_tokenizer_wrapper(
                path, {"trust_remote_code": False}, eos_token_ids=eos
            )
        except ValueError as e:
            if "trust_remote_code" not in str(e):
                raise
            raise CheckpointError(
                f"{path / 'tokenizer_config.json'} needs the directory's own Python code "
                "(auto_map) to load its tokenizer; ouro-mlx never runs code from a model "
                "directory. Set tokenizer_class (e.g. PreTrainedTokenizerFast) instead."
            ) from None
    if CHAT_END in tokenizer.get_vocab():
        tokenizer.add_eos_token(CHAT_END)
    return tokenizer


def register_hf_config() -> None:
    """Teach transformers' ``AutoConfig`` the model type "ouro" (a plain config, no
    code). ``AutoTokenizer`` reads config.json first: without this it offers to run
    the directory's ``configuration_ouro.py`` (``auto_map``) or, refused, warns about
    an unknown model type and a deprecated ``rope_scaling``."""
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "ouro" in CONFIG_MAPPING:
        return

    class OuroConfig(PretrainedConfig):
        model_type = "ouro"

        def __init__(self, rope_scaling=None, **kwargs):  # always None for Ouro
            super().__init__(**kwargs)

    AutoConfig.register("ouro", OuroConfig)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' log warnings and FutureWarnings while it reads a
    tokenizer: they speak to the checkpoint's author, not to our user."""
    import warnings

    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logging.set_verbosity(level)


def load(
    path_or_repo: str | Path,
    *,
    dtype: str | mx.Dtype | None = None,
    lazy: bool = False,
    ut_steps: int | None = None,
    exit_threshold: float | None = None,
    revision: str | None = None,
    adapter_path: str | Path | None = None,
    fuse: bool = False,
):
    """Load ``(model, tokenizer)``; options as in :func:`load_model`."""
    path = resolve(path_or_repo, revision)
    config = read_config(path)
    model = build_model(path, config, dtype=dtype, lazy=lazy)
    apply_adapter_dir(model, adapter_path)
    set_runtime_defaults(model, ut_steps, exit_threshold)
    if fuse:
        model.fuse_projections()
    return model, load_tokenizer(path, config)


@contextmanager
def atomic_directory(dest: Path, force: bool = False, verb: str = "ouro-mlx",
                     own: list[str] | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; on success it replaces ``dest``.
    On any error the temporary directory is removed and ``dest`` is untouched.

    A non-empty ``dest`` is replaced only with ``force`` and only when ouro-mlx
    wrote it (its manifest, or ``own``: patterns of the files a continuing writer
    such as lora rewrites, names everything there). The new directory gets the
    manifest: ``verb`` and its files (``own`` when given).

    A run killed between moving the old ``dest`` aside and moving the new one in
    leaves no ``dest``: the next run puts the old copy back (and says so). Hidden
    leftovers of killed runs (``.NAME.tmp-PID-*``, ``.NAME.old-PID``) are removed.
    New directories get the umask's permissions, like ``mkdir``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(dest)
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        # --force replaces an output directory, never a file, device or link (/dev/null).
        raise FileExistsError(f"{dest} exists and is not a directory; choose another path.")
    if dest.exists() and any(dest.iterdir()):
        if not force:
            raise FileExistsError(f"{dest} exists and is not empty; pass --force to replace it.")
        foreign = foreign_files(dest, own or ())
        if foreign is None or foreign:
            raise FileExistsError(
                f"{dest} holds {describe(foreign or files_in(dest))} that ouro-mlx did not "
                "write; --force replaces only what ouro-mlx wrote, so name a new directory.")
    tmp = make_sibling_dir(dest)
    try:
        yield tmp
        write_manifest(tmp, verb, own, atomic=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        remove(old)


def make_sibling_dir(dest: Path) -> Path:
    """``.NAME.tmp-PID-RANDOM`` beside ``dest``: the PID tells later runs whether
    its writer is still alive."""
    while True:
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def recover_interrupted(dest: Path) -> None:
    """Undo what killed runs of ``atomic_directory(dest)`` left behind; the
    leftovers of runs still alive are theirs and stay."""
    pattern = re.compile(re.escape(f".{dest.name}.") + r"(tmp|old)-(\d+)(-[0-9a-f]+)?")
    leftovers = []
    for p in dest.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and not pid_alive(int(m[2])):
            leftovers.append((m[1], p))
    for kind, p in sorted(leftovers):  # "old" first: restore before cleaning up
        if kind == "old" and not os.path.lexists(dest):
            os.replace(p, dest)
            print(f"ouro-mlx: restored {dest} from {p.name}, left by an interrupted run.",
                  file=sys.stderr)
        else:
            remove(p)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process we can ask about: leave its files alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def copy_support_files(src: Path, dst: Path) -> None:
    """Tokenizer files and generation config (never code) from ``src`` to ``dst``
    (after its config.json), the end-of-turn token declared as an eos."""
    for name in TOKENIZER_FILES + ["generation_config.json"]:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    declare_chat_end(dst)


def declare_chat_end(dst: Path) -> None:
    """List ``<|im_end|>`` among the eos ids of ``dst/generation_config.json``, where
    stock mlx-lm reads them (our loader adds it anyway): the released configs say
    eos = 0 only, so ``mlx_lm.generate`` would print the end of turn and go on."""
    file = dst / "tokenizer.json"
    if not file.is_file():
        return
    added = json.loads(file.read_text(encoding="utf-8")).get("added_tokens")
    chat_end = next((t.get("id") for t in added or [] if isinstance(t, dict)
                     and t.get("content") == CHAT_END), None)
    if not isinstance(chat_end, int):
        return
    gen_file = dst / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    config = json.loads((dst / "config.json").read_text()) if (
        dst / "config.json").is_file() else {}
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if chat_end in eos and gen_file.is_file():
        return
    gen["eos_token_id"] = eos + [chat_end] * (chat_end not in eos)
    if isinstance(bos := config.get("bos_token_id"), int):
        gen.setdefault("bos_token_id", bos)
    gen_file.write_text(json.dumps(gen, indent=2) + "\n")
