"""ouro-mlx: ByteDance's Ouro looped language models on MLX.

Public API: ``load``, ``load_model``, ``stream_generate``, ``generate``,
``batch_generate``, ``Model``, ``ModelArgs``, ``LoopOutputs``, ``GenerationResponse``,
``ExitRule``, ``CheckpointError``, ``apply_adapters``/``load_adapters``/``save_adapters``,
``load_exit_gate``, ``ChatSession``/``TokenEvent`` (an embeddable chat session) and
the ``exit`` module. Attributes are imported lazily: this
package is imported at interpreter start-up by the mlx-lm hook (see
``_mlx_lm_hook``), which must not pull in mlx.
"""

from __future__ import annotations

import importlib

from . import _mlx_lm_hook  # noqa: F401  (makes mlx-lm resolve model_type "ouro")
from ._source_tree import find_subpackages_in_source_tree

find_subpackages_in_source_tree(__name__, __path__)

__version__ = "0.1.0"

_EXPORTS = {
    "load": "loading",
    "load_model": "loading",
    "CheckpointError": "untrusted",
    "Model": "model",
    "ModelArgs": "model",
    "LoopOutputs": "model",
    "stream_generate": "generation",
    "generate": "generation",
    "batch_generate": "generation",
    "GenerationResponse": "generation",
    "ExitRule": "exit",
    "apply_adapters": "adapters",
    "load_adapters": "adapters",
    "save_adapters": "adapters",
    "load_exit_gate": "calibrate",
    "ChatSession": "session",
    "TokenEvent": "session",
}
__all__ = [*_EXPORTS, "exit", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name == "exit":
        return importlib.import_module(".exit", __name__)
    raise AttributeError(f"module 'ouro_mlx' has no attribute {name!r}")
