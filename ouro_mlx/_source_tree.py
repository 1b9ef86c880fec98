"""In a source checkout (``pip install -e .``) the converters live in the repository's
top-level ``convert/`` directory, which a wheel installs as ``ouro_mlx/convert``. This
finder serves ``ouro_mlx.convert`` from there when the package has no ``convert/`` of
its own. Standard library only: it runs at interpreter start-up (see ``_mlx_lm_hook``).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path


class _ConvertFinder(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, directory: Path):
        self.name, self.directory = name, directory

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.directory / "__init__.py",
            submodule_search_locations=[str(self.directory)],
        )


def find_convert_in_source_tree(package: str, package_path: list[str]) -> None:
    here = Path(package_path[0])
    source = here.parent / "convert"
    if (here / "convert").is_dir() or not (source / "__init__.py").is_file():
        return  # an installed wheel, or no source tree
    name = f"{package}.convert"
    if not any(isinstance(f, _ConvertFinder) and f.name == name for f in sys.meta_path):
        sys.meta_path.append(_ConvertFinder(name, source))
