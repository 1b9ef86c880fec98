"""The package as installed and launched: editable source trees, the CLI's last line of
defence (broken pipes, OS errors)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

from ouro_mlx import cli


def test_source_tree_serves_convert_and_desktop(tmp_path):
    # An editable install imports the package from the source tree, where the
    # converters are the top-level convert/ and the desktop app apps/desktop/.
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text(textwrap.dedent("""
        from ouro_mlx._source_tree import find_subpackages_in_source_tree
        find_subpackages_in_source_tree(__name__, __path__)
    """))
    (tmp_path / "convert").mkdir()
    (tmp_path / "convert" / "__init__.py").write_text("from .inner import VALUE\n")
    (tmp_path / "convert" / "inner.py").write_text("VALUE = 42\n")
    (tmp_path / "apps" / "desktop").mkdir(parents=True)
    (tmp_path / "apps" / "desktop" / "__init__.py").write_text("NAME = 'app'\n")
    code = ("import pkg.convert, pkg.convert.inner, pkg.desktop; "
            "print(pkg.convert.VALUE, pkg.convert.__name__, pkg.desktop.NAME)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["42", "pkg.convert", "app"]


def test_installed_package_has_converters():
    import ouro_mlx.convert

    assert callable(ouro_mlx.convert.hf_to_mlx)


def run_into_closed_pipe(args: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI with stdout a pipe whose reader has gone (`... | head` after head exits)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-m", "ouro_mlx", *args], stdout=w,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(w)


def test_help_into_a_closed_pipe_is_quiet():
    for args in (["--help"], ["generate", "--help"]):
        proc = run_into_closed_pipe(args)
        assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_os_errors_are_one_line(capsys):
    full = OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors")
    assert cli.os_message(full) == (
        "no space left on the device writing /out/model.safetensors.")
    denied = PermissionError(errno.EACCES, "Permission denied", "/root/x")
    assert cli.os_message(denied) == "/root/x: Permission denied"
    assert cli.error("convert", cli.os_message(full)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ouro-mlx convert: error: no space left")
