"""Load time and peak memory of a checkpoint (run once per model, in a fresh process).

    python examples/measure_load.py MODEL [MODEL ...]
"""

import resource
import subprocess
import sys
import time


def measure(path: str) -> None:
    import mlx.core as mx

    import ouro_mlx

    start = time.perf_counter()
    model = ouro_mlx.load_model(path)
    seconds = time.perf_counter() - start
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    if sys.platform == "darwin":
        rss_gb /= 1024  # bytes on macOS
    dtype = model.layers[0].input_layernorm.weight.dtype
    print(f"{path}: load {seconds:.1f} s, MLX peak {mx.get_peak_memory() / 1e9:.2f} GB, "
          f"max RSS {rss_gb:.2f} GiB, dtype {dtype}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        measure(sys.argv[2])
    else:
        for p in sys.argv[1:]:
            subprocess.run([sys.executable, __file__, "--one", p], check=True)
