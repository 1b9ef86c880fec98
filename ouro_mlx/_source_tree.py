"""In a source checkout (``pip install -e .``) two subpackages live outside the
package directory, where the repository's shape puts them: the converters in the
top-level ``convert/`` and the desktop app in ``apps/desktop/``. A wheel installs them
as ``ouro_mlx/convert`` and ``ouro_mlx/desktop``; in a source tree this finder serves
them from where they are. Standard library only: it runs at interpreter start-up (see
``_mlx_lm_hook``).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

# subpackage name → its directory, relative to the repository root
SOURCE_DIRS = {"convert": "convert", "desktop": "apps/desktop"}


class _SubpackageFinder(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, directory: Path):
        self.name, self.directory = name, directory

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.directory / "__init__.py",
            submodule_search_locations=[str(self.directory)],
        )


def find_subpackages_in_source_tree(package: str, package_path: list[str],
                                    source_dirs: dict[str, str] = SOURCE_DIRS) -> None:
    here = Path(package_path[0])
    for sub, rel in source_dirs.items():
        source = here.parent / rel
        if (here / sub).is_dir() or not (source / "__init__.py").is_file():
            continue  # an installed wheel, or no source tree
        name = f"{package}.{sub}"
        if not any(isinstance(f, _SubpackageFinder) and f.name == name for f in sys.meta_path):
            sys.meta_path.append(_SubpackageFinder(name, source))
