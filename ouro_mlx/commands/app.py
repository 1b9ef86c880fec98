"""ouro-mlx app: a desktop chat window.

Streams answers with every token coloured by the loop steps it ran, with a stop button,
loop and exit-threshold controls, a system prompt, collapsible thinking sections and a
status bar (tok/s, average loops, memory). Conversations are kept across restarts in
SQLite, in the per-user data directory (OURO_MLX_APP_DIR overrides it). With no
--model it opens the bundled demo model; the window's model picker loads others.
Ctrl-C in the terminal quits it. Needs PySide6: pip install ".[desktop]" in a checkout
of ouro-mlx, or pip install "PySide6-Essentials>=6.6" ("PySide6-Essentials>=6.6,<6.12"
on Python 3.11 and older).
"""

from __future__ import annotations

import argparse

from .options import (
    HelpFormatter,
    add_loop_args,
    add_model_args,
    add_sampling_args,
    apply_compile_flag,
    check_loop_args,
    cli_text,
    sampling_kwargs,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ouro-mlx app", description=__doc__,
                                formatter_class=HelpFormatter)
    add_model_args(p, demo=True)
    p.add_argument("--system-prompt", default=None, type=cli_text,
                   help="A system message for the conversations (editable in the window).")
    p.add_argument("--stop", action="append", default=[], type=cli_text,
                   help="End the answer where this text appears (repeatable).")
    p.add_argument("--data-dir", default=None,
                   help="Where conversations are kept (default: OURO_MLX_APP_DIR, else the "
                        "per-user data directory).")
    add_loop_args(p)
    add_sampling_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sampling = sampling_kwargs(args)
    check_loop_args(args)
    try:
        from ..desktop.app import run
    except ImportError as e:
        import sys

        # PySide6 6.12 crashes on Python < 3.12 (see pyproject's desktop extra)
        spec = ">=6.6" if sys.version_info >= (3, 12) else ">=6.6,<6.12"
        raise ImportError(f"the desktop app needs PySide6 ({e}): pip install "
                          f'"PySide6-Essentials{spec}" (or pip install ".[desktop]" in a '
                          "checkout of ouro-mlx)") from None
    from pathlib import Path

    from ..desktop.store import DB_NAME

    apply_compile_flag(args)
    loop = {k: getattr(args, k) for k in ("exit_at_step", "min_loops", "max_loops",
                                          "hidden_eps")}
    session_kwargs = dict(kv_mode=args.kv_mode, kv_bits=args.kv_bits,
                          kv_group_size=args.kv_group_size, loop=loop, sampling=sampling,
                          stop=args.stop, dtype=args.dtype)
    store = Path(args.data_dir).expanduser() / DB_NAME if args.data_dir else None
    try:
        return run(store, model=args.model, adapter_path=args.adapter_path,
                   exit_gate=args.exit_gate, ut_steps=args.ut_steps,
                   exit_threshold=args.exit_threshold, system_prompt=args.system_prompt,
                   session_kwargs=session_kwargs)
    except KeyboardInterrupt:  # Ctrl-C before the window was up: nothing to save
        return 130
