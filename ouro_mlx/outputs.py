"""Where outputs go: the one check every verb that writes makes before any work.

- A destination that is, contains or lies inside anything the verb reads (a model,
  data, adapters, a tokenizer, a corpus, a gate file) is refused: replacing it would
  delete the source, writing into it would change it.
- Never the working directory or one holding it; a directory is never a file.
- A non-empty directory is replaced (``--force``) or continued (train, lora) only
  when ouro-mlx wrote it: every writer leaves a small manifest, ``.ouro-mlx.json``,
  naming the verb and the files it wrote, and the directory may hold nothing else.
  Anything else is refused in one line that says what is there.

Imports nothing from ouro_mlx, so the rule cannot differ between verbs.
"""

from __future__ import annotations

import json
import os
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Callable, Iterable

MARKER = ".ouro-mlx.json"
# What a run killed while writing the manifest leaves (the next write replaces it).
LEFTOVERS = (f".{MARKER}.tmp-*",)

Source = tuple[str, "str | os.PathLike | None"]


class DestinationError(ValueError):
    """An output path that would overwrite, delete or mix with what is not ours."""


def real(path: str | os.PathLike) -> Path:
    """The path with ``~``, ``..`` and links resolved (it need not exist)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def source_path(value: str | os.PathLike) -> Path | None:
    """Where a source lies on disk: the path itself, or, for a Hugging Face repo id,
    its local snapshot when the cache holds one (never a download)."""
    p = Path(os.path.expanduser(os.fspath(value)))
    text = os.fspath(value)
    if os.path.lexists(p) or not looks_like_repo_id(text):
        return real(p)  # a path (compared even before it exists)
    try:
        from huggingface_hub import snapshot_download

        return real(snapshot_download(text, local_files_only=True))
    except Exception:  # not cached (or no hub library): nothing local to protect
        return None


def looks_like_repo_id(text: str) -> bool:
    """``org/name``: what is not a local path is taken for a Hugging Face repo id."""
    return not text.startswith((".", "/", "~")) and text.count("/") == 1


def regions(src: Path) -> list[Path]:
    """What reading ``src`` depends on: a snapshot of the HF cache links into its
    repository's ``blobs``, so the whole repository folder counts."""
    if src.parent.name == "snapshots" and src.parents[1].name.startswith(
            ("models--", "datasets--")):
        return [src, src.parents[1]]
    return [src]


def relation(dst: Path, src: Path) -> str | None:
    if dst == src:
        return "is"
    if dst in src.parents:
        return "contains"
    if src in dst.parents:
        return "lies inside"
    return None


def check_apart(dst: str | os.PathLike, flag: str, sources: Iterable[Source],
                shown: str | None = None) -> None:
    """Refuse ``dst`` when it is, contains or lies inside one of ``sources``
    (``(flag, path or repo id)`` pairs; None entries are skipped)."""
    d = real(dst)
    for sflag, value in sources:
        if value is None or os.fspath(value) == "":
            continue
        src = source_path(value)
        if src is None:
            continue
        for region in regions(src):
            if rel := relation(d, region):
                raise DestinationError(
                    f"{flag} {shown or dst} {rel} the source {sflag} {value}; write to a "
                    "path outside it (ouro-mlx never writes over what it reads).")


def check_not_cwd(dst: Path, flag: str, shown: str) -> None:
    cwd = Path.cwd().resolve()
    d = real(dst)
    if d == cwd or d in cwd.parents:
        raise DestinationError(f"{flag} {shown} is or contains the current directory; "
                               "name a new directory to write to.")


# ---------------------------------------------------------------- the manifest


def files_in(directory: Path) -> list[str]:
    """Every entry below ``directory`` that is not a directory (links not followed),
    as relative POSIX paths; empty directories count as entries too."""
    names = []
    for root, dirs, files in os.walk(directory):
        rel = Path(root).relative_to(directory)
        for d in list(dirs):
            if os.path.islink(os.path.join(root, d)):
                files.append(d)  # a link is an entry, never followed
                dirs.remove(d)
        if not dirs and not files and rel != Path("."):
            names.append(rel.as_posix() + "/")
        names += [(rel / f).as_posix() for f in files]
    return sorted(names)


def read_manifest(directory: Path) -> dict | None:
    """The manifest an ouro-mlx writer left, or None (absent, or not one of ours)."""
    file = directory / MARKER
    try:
        if file.is_symlink() or not file.is_file() or file.stat().st_size > 1 << 20:
            return None
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(data, dict) and isinstance(data.get("verb"), str)
            and isinstance(data.get("files"), list)
            and all(isinstance(f, str) for f in data["files"])):
        return None
    return data


def write_manifest(directory: Path, verb: str, files: list[str] | None = None,
                   atomic: bool = True) -> None:
    """Leave the manifest in ``directory``: the verb and the files it wrote (patterns
    where a verb keeps writing, as train's checkpoints); by default every file there.
    ``atomic=False``: written in place (a temporary directory renamed as a whole)."""
    names = files if files is not None else [f for f in files_in(directory) if f != MARKER]
    tmp = directory / (f".{MARKER}.tmp-{os.getpid()}" if atomic else MARKER)
    try:
        tmp.write_text(json.dumps({"written_by": "ouro-mlx", "verb": verb, "files": names},
                                  indent=1) + "\n", encoding="utf-8")
        if atomic:
            os.replace(tmp, directory / MARKER)
    finally:
        if atomic:
            tmp.unlink(missing_ok=True)


def foreign_files(directory: Path, own: Iterable[str] = ()) -> list[str] | None:
    """The files in ``directory`` that ouro-mlx did not write: those its manifest
    (or ``own``, patterns a verb recognises as its own) does not name. None when
    the directory has no manifest and ``own`` is empty."""
    manifest = read_manifest(directory)
    patterns = list(own) + (manifest["files"] if manifest else [])
    if manifest is None and not own:
        return None
    return [n for n in files_in(directory) if n != MARKER
            and not any(fnmatchcase(n, p) or fnmatchcase(n, p.rstrip("/") + "/*")
                        for p in patterns + list(LEFTOVERS))]


def describe(names: list[str]) -> str:
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} file{'s' if len(names) != 1 else ''} ({shown})"


# ---------------------------------------------------------------- the checks


def output_dir(path: str | os.PathLike, flag: str, *, force: bool = False,
               sources: Iterable[Source] = (), continues: Iterable[str] | None = None,
               earlier: bool = False, verb: str = "") -> Path:
    """The absolute path of a directory to write, checked before any work.

    Replacing writers (``continues`` None): a new or empty directory, or with
    ``force`` one that ouro-mlx wrote (its manifest names everything there).
    Continuing writers (train, lora): ``continues`` lists the patterns of the files
    ``verb`` writes; a non-empty directory must hold only those and that verb's
    manifest (without one, only when ``earlier``: the caller recognises a run of an
    earlier version, e.g. by its trainer state)."""
    shown = os.fspath(path)
    dst = Path(os.path.abspath(os.path.expanduser(shown)))
    check_not_cwd(dst, flag, shown)
    check_apart(dst, flag, sources, shown)
    if os.path.islink(dst):
        raise DestinationError(f"{flag} {shown} is a link; name a directory to write to.")
    if os.path.lexists(dst) and not dst.is_dir():
        raise DestinationError(f"{flag} {shown} is a file, not a directory; "
                               "name a directory to write to.")
    if not dst.is_dir() or not any(dst.iterdir()):
        return dst
    if continues is not None:
        manifest = read_manifest(dst)
        if manifest and manifest["verb"] != verb:
            raise DestinationError(
                f"{flag} {shown} holds the output of ouro-mlx {manifest['verb']}, not a "
                f"{verb} run; name a new directory (or an empty one).")
        foreign = foreign_files(dst, list(continues)) if manifest or earlier else None
        foreign = files_in(dst) if foreign is None else foreign
        if foreign:
            raise DestinationError(
                f"{flag} {shown} holds {describe(foreign)} that ouro-mlx did not write; "
                "name a new directory (or an empty one).")
        return dst
    foreign = foreign_files(dst)
    if foreign is None:
        raise DestinationError(
            f"{flag} {shown} holds {describe(files_in(dst))} and no {MARKER}: "
            "ouro-mlx did not write it (or an earlier version did), and --force replaces "
            "only directories ouro-mlx wrote; name a new directory.")
    if foreign:
        raise DestinationError(
            f"{flag} {shown} holds {describe(foreign)} that ouro-mlx did not write; "
            "--force replaces only what ouro-mlx wrote, so name a new directory.")
    if not force:
        raise DestinationError(f"{flag} {shown} exists and is not empty; "
                               "pass --force to replace it.")
    return dst


def output_file(path: str | os.PathLike, flag: str, *, force: bool | None = False,
                sources: Iterable[Source] = (), ours: Callable[[Path], bool] | None = None,
                kind: str = "file") -> Path:
    """The absolute path of a single file to write (temp then rename), checked before
    any work: never a source, a directory, a link or a special file; an existing file
    is replaced only with ``force`` (None: no such flag, replace without asking) and
    only when ``ours`` says this tool wrote it."""
    shown = os.fspath(path)
    dst = Path(os.path.abspath(os.path.expanduser(shown)))
    check_apart(dst, flag, sources, shown)
    if dst.is_dir():
        raise DestinationError(f"{flag} {shown} is a directory; name a file.")
    if not dst.parent.is_dir():
        raise DestinationError(f"{flag} {shown}: no directory {dst.parent}.")
    if os.path.lexists(dst):
        if dst.is_symlink() or not dst.is_file():
            raise DestinationError(f"{flag} {shown} is not a regular file; "
                                   "name another path.")
        if ours is not None and not ours(dst):
            raise DestinationError(f"{flag} {shown} exists and is not a {kind} ouro-mlx "
                                   "wrote; name another path.")
        if force is False:
            raise DestinationError(f"{flag} {shown} exists; pass --force to replace it.")
    return dst


def replace_file(dst: Path, write: Callable[[Path], None]) -> Path:
    """Write ``dst`` through a temporary file beside it, renamed over it at the end:
    an interrupted or failed write leaves the old file whole and no temporary file."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}{dst.suffix}")
    try:
        write(tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
