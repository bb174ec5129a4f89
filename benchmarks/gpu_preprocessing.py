"""Volume preprocessing on a GPU against the CPU, and how many CPU cores feed one GPU: `python -m
benchmarks.gpu_preprocessing`.

nilearn's MNI152 templates (T1, grey matter, white matter; 1 mm, 197×233×189 voxels, `.nii.gz`) → 96³, RAS+,
trilinear, clip 0.5 / 99.5 + min-max (`UmbrellaVolumeProcessor`), per volume, interleaved, medians:

    cpu            preprocess_volume(path): decoding and arithmetic on one core (torch and numpy on one thread)
    decode         load_raw_volume(path): the part that stays on the CPU when the GPU preprocesses
    gpu            preprocess_volume(path, device="cuda"): decoding on the CPU, the arithmetic on the GPU
    cache          VolumeCache.get(path) of a warm cache: reading a preprocessed tensor

and the largest difference between the GPU's and the CPU's volumes. Then throughput in one process with N threads
(what `UmbrellaCollator(decode_threads=N)` does), CPU and GPU preprocessing, volumes per second.

Cores per GPU: a training step that consumes V volumes/s needs V × (seconds per volume on one core) cores, for the
CPU path (`cpu`), the GPU path (`decode`) and a warm cache (`cache`); V is read from `--step-volumes-per-s` (the
GPU benchmark's figure, `benchmarks/gpu.py`).
"""

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .common import format_table, write_report
from .common import interleaved_timings as timed
from .data_pipeline import write_templates


def threaded_volumes_per_s(function, paths: list[Path], threads: int, rounds: int, device: torch.device) -> float:
    """Volumes per second when `threads` threads run `function` over `paths` `rounds` times."""
    work = [path for _ in range(rounds) for path in paths]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(function, paths))  # warm up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        list(pool.map(function, work))
        if device.type == "cuda":
            torch.cuda.synchronize()
    return len(work) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=8, help="passes over the 3 files per throughput point")
    parser.add_argument("--step-volumes-per-s", type=float, default=None, help="what one training step consumes")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_preprocessing.json"))
    args = parser.parse_args(argv)

    from umbrella_llava.image_processing_umbrella_llava import UmbrellaVolumeProcessor, load_raw_volume
    from umbrella_llava.volume_cache import VolumeCache

    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    processor = UmbrellaVolumeProcessor(volume_size=(96, 96, 96), normalization="minmax")
    with tempfile.TemporaryDirectory(prefix="umbrella_gpu_pre_") as folder:
        paths = write_templates(Path(folder), resolution=1)
        cache = VolumeCache(Path(folder) / "cache")
        gaps = []
        for path in paths:
            cache.get(path, processor)
            on_device = processor.preprocess_volume(path, device=device).cpu()
            gaps.append(float((on_device - processor.preprocess_volume(path)).abs().max()))

        cases = {
            "cpu": lambda: [processor.preprocess_volume(path) for path in paths],
            "decode": lambda: [load_raw_volume(path) for path in paths],
            "gpu": lambda: [processor.preprocess_volume(path, device=device) for path in paths],
            "cache": lambda: [cache.get(path, processor) for path in paths],
        }
        times = timed(cases, repeats=args.repeats, warmup=1, device=device)
        per_volume_ms = {name: 1000 * statistics.median(values) / len(paths) for name, values in times.items()}

        throughput = []
        for threads in args.threads:
            row = {"threads": threads}
            row["cpu_volumes_per_s"] = threaded_volumes_per_s(
                processor.preprocess_volume, paths, threads, args.rounds, device
            )
            row["gpu_volumes_per_s"] = threaded_volumes_per_s(
                lambda path: processor.preprocess_volume(path, device=device), paths, threads, args.rounds, device
            )
            throughput.append(row)

    rows = [
        {"case": name, "ms_per_volume": ms, "volumes_per_s_per_core": 1000 / ms} for name, ms in per_volume_ms.items()
    ]
    cores = None
    if args.step_volumes_per_s:
        cores = {
            "uncached, CPU preprocessing": args.step_volumes_per_s * per_volume_ms["cpu"] / 1000,
            "uncached, GPU preprocessing": args.step_volumes_per_s * per_volume_ms["decode"] / 1000,
            "warm cache": args.step_volumes_per_s * per_volume_ms["cache"] / 1000,
        }
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "per_volume": rows,
        "largest_gpu_cpu_difference": max(gaps),
        "throughput": throughput,
        "step_volumes_per_s": args.step_volumes_per_s,
        "cores_per_gpu": cores,
    }
    print(f"\n{report['device']}: MNI152 1 mm .nii.gz → 96³; GPU vs CPU volumes differ by at most {max(gaps):.2g}\n")
    print(format_table(rows, ["case", "ms_per_volume", "volumes_per_s_per_core"]))
    print("\n" + format_table(throughput, ["threads", "cpu_volumes_per_s", "gpu_volumes_per_s"]))
    if cores:
        print("\ncores per GPU at", args.step_volumes_per_s, "volumes/s:", {k: round(v, 1) for k, v in cores.items()})
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
