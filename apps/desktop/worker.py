"""The desktop app's worker: a QObject on its own QThread that owns the model and the
:class:`ouro_mlx.session.ChatSession`. Loading and generation run only here (MLX is
not re-entrant across threads); the window talks to it by queued signals and reads
back only what the signals carry. ``cancel`` is the one call made from the GUI thread.
"""

from __future__ import annotations

import io
from pathlib import Path

from PySide6.QtCore import QObject, Signal, Slot

BUNDLED = "demo"  # what the model field shows (and accepts) for the bundled model


def is_bundled(name: str) -> bool:
    """An empty model field, or ``demo`` where no such directory is at hand."""
    name = name.strip()
    return not name or (name == BUNDLED and not Path(name).exists())


def hub_progress_bar(emit):
    """A tqdm class for ``snapshot_download`` that reports progress to
    ``emit(done, total, unit)`` instead of the terminal: MiB written when the hub
    reports bytes (huggingface_hub >= 1.0), else files."""
    from tqdm import tqdm

    class Bar(tqdm):
        byte_bars = 0

        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)  # huggingface_hub's own bars take a name
            kwargs["file"] = io.StringIO()
            self.in_bytes = kwargs.get("unit") == "B"
            # network bytes: the bar of bytes written says the same, once
            self.silent = self.in_bytes and str(kwargs.get("desc")).startswith(
                "Downloading bytes")
            if self.in_bytes and not self.silent:
                Bar.byte_bars += 1
            super().__init__(*args, **kwargs)

        def report(self) -> None:
            if self.silent or (not self.in_bytes and Bar.byte_bars):
                return
            if self.in_bytes:
                emit(int(self.n) >> 20, int(self.total or 0) >> 20, "MiB")
            else:
                emit(int(self.n), int(self.total or 0), "files")

        def update(self, n=1):
            out = super().update(n)
            self.report()
            return out

        def refresh(self, *args, **kwargs):
            out = super().refresh(*args, **kwargs)
            self.report()
            return out

    return Bar


def model_summary(model, tokenizer, name: str) -> dict:
    from ouro_mlx.demo import plays_the_shell_game

    args = model.args
    return {
        "name": BUNDLED if is_bundled(name) else name,
        "bundled": is_bundled(name),
        # the bundled model or one made from it (fuse, quantize): trained on single games
        "single_turn": plays_the_shell_game(tokenizer),
        "ut_steps": int(model.ut_steps),
        "exit_threshold": 1.0 if model.exit_threshold is None else float(model.exit_threshold),
        "hidden_size": int(args.hidden_size),
        "layers": int(args.num_hidden_layers),
    }


class Worker(QObject):
    """Runs ``load`` and ``send`` requests one at a time on its thread."""

    status = Signal(str)  # what the worker is doing, for the status bar
    progress = Signal(int, int, str)  # download (done, total, unit); (0, 0, "") = busy
    loaded = Signal(dict)  # model_summary of the model now in use
    token = Signal(str, int, bool)  # text, loop steps, thinking
    finished = Signal(dict)  # the answer: content, finish_reason, stats
    failed = Signal(str)  # one line

    def __init__(self, *, session_kwargs: dict | None = None):
        """``session_kwargs``: ChatSession options (kv, loop, sampling, stop) and
        ``dtype``, for every model this worker loads."""
        super().__init__()
        self.session_kwargs = dict(session_kwargs or {})
        self.session = None

    # -- loading --------------------------------------------------------------
    @Slot(dict)
    def load(self, spec: dict) -> None:
        """``spec``: model (directory or HF repo id; empty or ``demo``: the bundled model),
        adapter_path, exit_gate (optional)."""
        from ..demo import model_path
        from ..session import ChatSession

        name = (spec.get("model") or "").strip()
        bundled = is_bundled(name)
        try:
            self.progress.emit(0, 0, "")
            self.status.emit(f"loading {'the bundled demo model' if bundled else name} …")
            path = model_path() if bundled else self.fetch(name)
            session = ChatSession.load(
                str(path), adapter_path=spec.get("adapter_path") or None,
                exit_gate=spec.get("exit_gate") or None, **self.session_kwargs)
        except (ValueError, ImportError, OSError) as e:
            self.failed.emit(f"could not load {name or 'the bundled model'}: {e}")
            return
        except Exception as e:  # noqa: BLE001 (a GUI must not be left waiting)
            self.failed.emit(f"could not load {name or 'the bundled model'}: "
                             f"{type(e).__name__}: {e}")
            return
        self.session = session
        self.loaded.emit(model_summary(session.model, session.tokenizer, name))

    def fetch(self, name: str) -> Path:
        """A local directory as it is; an HF repo id downloaded with progress."""
        from ..loading import CONFIG_FILES, TOKENIZER_FILES, WEIGHT_PATTERNS, resolve

        path = Path(name).expanduser()
        if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
            return resolve(name)
        from huggingface_hub import snapshot_download

        self.status.emit(f"downloading {name} …")
        try:
            return Path(snapshot_download(
                name, allow_patterns=CONFIG_FILES + TOKENIZER_FILES + WEIGHT_PATTERNS,
                tqdm_class=hub_progress_bar(self.progress.emit)))
        except Exception:  # the hub raises many types: resolve says it in one line
            return resolve(name)

    # -- chatting ------------------------------------------------------------
    @Slot(list, str, dict)
    def send(self, history: list, text: str, options: dict) -> None:
        """Answer ``text`` after ``history`` (role/content dicts, without the system
        turn). ``options``: system_prompt, ut_steps, exit_threshold."""
        session = self.session
        if session is None:
            self.failed.emit("no model loaded yet")
            return
        reason = None
        try:
            system = options.get("system_prompt") or None
            if options.get("ut_steps"):
                session.set_loops(int(options["ut_steps"]))
            if options.get("exit_threshold") is not None:
                session.set_threshold(float(options["exit_threshold"]))
            session.system_prompt = system
            session.messages = ([{"role": "system", "content": system}] if system else [])
            session.messages += [{"role": m["role"], "content": m["content"]} for m in history]
            for event in session.send(text):
                if event.text:
                    self.token.emit(event.text, int(event.loops), bool(event.thinking))
                reason = event.finish_reason or reason
        except (ValueError, OSError) as e:
            self.failed.emit(str(e))
            return
        except Exception as e:  # noqa: BLE001 (a GUI must not be left waiting)
            self.failed.emit(f"{type(e).__name__}: {e}")
            return
        last = session.messages[-1] if session.messages else {}
        content = last.get("content", "") if last.get("role") == "assistant" else ""
        reason = reason or session.stats.finish_reason or "stop"
        self.finished.emit({"content": content, "finish_reason": reason,
                            "stats": stats_summary(session.stats)})

    def cancel(self) -> None:
        """Stop the running answer at its next token (any thread)."""
        if self.session is not None:
            self.session.cancel()


def stats_summary(stats) -> dict:
    loops = dict(stats.loops)
    total = sum(loops.values())
    return {
        "generation_tokens": int(stats.generation_tokens),
        "generation_tps": float(stats.generation_tps),
        "prompt_tokens": int(stats.prompt_tokens),
        "prompt_tps": float(stats.prompt_tps),
        "avg_loops": sum(k * v for k, v in loops.items()) / total if total else 0.0,
        "peak_memory": float(stats.peak_memory),
        "kv_bytes": int(stats.kv_bytes),
        "finish": str(stats.finish),
    }
