"""Run the CPU benchmarks and print one table of ratios: `python -m benchmarks.run [--quick] [--only NAME ...]`.

Benchmarks (see BENCHMARKS.md for what each compares and its goal):

    stock_overhead    UmbrellaLlava vs stock LLaVA, training step, same LM / encoder / visual tokens
    padding           half the volume slots padded vs tight
    handwritten_loop  native path vs the hand-written per-sample loop, 1 / 4 / 10 slots per sample
    data              preprocessing vs MONAI, cache vs no cache, DataLoader vs training step (needs nilearn, monai)
    memory            step peak memory at 1 / 2 / 4 / 8 volumes per sample, with and without checkpointing
    learning          steps until held-out accuracy reaches 0.9 on volume-only questions (median of 3 seeds), per
                      variant of the defaults, on real MNI152 brains (needs nilearn)
    learning_local    why the local lesion task is not learnt: one change each, seed 0
    token_budget      volume_merge_size 1 / 2³ / 4³: tokens per volume, learning (average vs concat + MLP merger),
                      step time and peak memory at 4 volumes per sample (needs nilearn)
    relevance         relevance maps of a model that learnt a lesion: pointing game, randomisation sanity check, time
                      and memory per map, per method (needs nilearn, captum)

The GPU run is separate: `python -m benchmarks.gpu`.
"""

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from .common import format_table

TABLE_COLUMNS = ["benchmark", "case", "metric", "value", "goal", "met", "ours_ms", "baseline_ms", "note"]


def _benchmarks() -> dict[str, Callable[..., list[dict]]]:
    from .data_pipeline import bench_data
    from .learning import bench_learning, bench_learning_local
    from .memory import bench_memory
    from .model_paths import bench_handwritten_loop, bench_padding, bench_stock_overhead
    from .relevance import bench_relevance
    from .token_budget import bench_token_budget

    return {
        "stock_overhead": bench_stock_overhead,
        "padding": bench_padding,
        "handwritten_loop": bench_handwritten_loop,
        "data": bench_data,
        "memory": bench_memory,
        "learning": bench_learning,
        "learning_local": bench_learning_local,
        "token_budget": bench_token_budget,
        "relevance": bench_relevance,
    }


def machine_description() -> dict:
    """What the figures were measured on."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def run(names: list[str], quick: bool) -> dict:
    """Run the named benchmarks; returns `{"machine", "quick", "results": {name: rows}, "seconds": {name: s}}`."""
    benchmarks = _benchmarks()
    results, seconds = {}, {}
    for name in names:
        start = time.perf_counter()
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        results[name] = benchmarks[name](quick=quick)
        seconds[name] = time.perf_counter() - start
    return {"machine": machine_description(), "quick": quick, "results": results, "seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: seconds, for smoke tests")
    parser.add_argument("--only", nargs="+", choices=list(_benchmarks()), help="run only these benchmarks")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: per core)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    report = run(args.only or list(_benchmarks()), args.quick)
    rows = [row for name_rows in report["results"].values() for row in name_rows]
    machine = report["machine"]
    print(
        f"\n{machine['processor']}, {machine['cpu_count']} CPUs, {machine['torch_threads']} torch thread(s), "
        f"torch {machine['torch']}, transformers {machine['transformers']}{' (quick)' if args.quick else ''}\n"
    )
    print(format_table(rows, TABLE_COLUMNS))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
