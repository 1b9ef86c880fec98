"""ouro-mlx: ByteDance's Ouro looped language models on MLX."""

from . import _mlx_lm_hook  # noqa: F401  (makes mlx-lm resolve model_type "ouro")
from . import exit
from .loading import CheckpointError, load, load_model
from .model import LoopOutputs, Model, ModelArgs

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "LoopOutputs",
    "Model",
    "ModelArgs",
    "exit",
    "load",
    "load_model",
]
