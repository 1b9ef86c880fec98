"""Load time and peak memory of a checkpoint (run once per model, in a fresh process).

    python examples/measure_load.py [MODEL ...]

MODEL defaults to the bundled demo model.
"""

import argparse
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="Checkpoint directories or repo ids (default: the bundled demo model).")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.one:
        return measure(args.models[0])
    if not args.models:
        from ouro_mlx.demo import model_path

        args.models = [str(model_path())]
    for path in args.models:
        subprocess.run([sys.executable, __file__, "--one", path], check=True)


if __name__ == "__main__":
    main()
