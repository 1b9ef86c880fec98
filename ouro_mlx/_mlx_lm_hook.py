"""Lets mlx-lm resolve ``model_type: ouro`` to ``ouro_mlx.model``.

mlx-lm imports ``mlx_lm.models.<model_type>``. This meta-path finder answers that
one name with the already-importable ``ouro_mlx.model`` module (one module, one set
of classes), so stock mlx-lm tools load Ouro without executing any file from the
model directory. Installed as a ``.pth`` line, so it must stay cheap: it imports
nothing heavy until mlx-lm actually asks for the module.
"""

import importlib
import sys
from importlib.machinery import ModuleSpec

NAME = "mlx_lm.models.ouro"


class _Loader:
    def create_module(self, spec):
        module = importlib.import_module("ouro_mlx.model")
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._own_spec  # importlib set it to the alias's spec
        # mlx-lm loads the tokenizer next, through AutoTokenizer, which reads
        # config.json: name "ouro" to transformers so it neither prompts nor warns.
        importlib.import_module("ouro_mlx.loading").register_hf_config()


class _Finder:
    def find_spec(self, fullname, path=None, target=None):
        return ModuleSpec(fullname, _Loader()) if fullname == NAME else None


def register() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())


register()
