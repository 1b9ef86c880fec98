"""Format converters, installed as ``ouro_mlx.convert``.

- :func:`hf_to_mlx`: HF PyTorch-format checkpoint (safetensors, ``.bin`` or ``.pt``;
  a directory or a hub repo id) → MLX directory, optionally quantized.
- :func:`mlx_to_hf`: MLX directory → HF PyTorch-format directory (dequantized).
"""

from .convert import (
    Q_MODES,
    Q_SUPPORTED,
    Verification,
    hf_config_from,
    hf_to_mlx,
    max_logit_diff,
    mlx_to_hf,
)

__all__ = ["Q_MODES", "Q_SUPPORTED", "Verification", "hf_config_from", "hf_to_mlx",
           "max_logit_diff", "mlx_to_hf"]
