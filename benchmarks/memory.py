"""Peak memory of one training step as volumes per sample grow, with and without activation checkpointing.

Each point runs in a fresh Python process, so that no allocator cache or earlier peak of another point leaks into
it. On the CPU the peak is the process's resident-set high-water mark (`VmHWM`, reset through
`/proc/self/clear_refs` once the model and batch are built, so it covers the step only); on CUDA it is
`torch.cuda.max_memory_allocated`. The figure reported is the step's peak above the memory held before the step
(model, batch): activations, gradients and temporaries.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .common import SMALL, TINY, build_umbrella, make_volume_batch, set_activation_checkpointing, training_step

VOLUMES_PER_SAMPLE = (1, 2, 4, 8)
BATCH_SIZE = 2
MIB = 2**20
REPO_ROOT = Path(__file__).resolve().parents[1]


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark of this process; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_point(volumes: int, checkpointing: bool, quick: bool, device: str = "cpu", merge: int = 1) -> dict:
    """Peak memory (MiB) of one training step of `BATCH_SIZE` samples with `volumes` volumes each, in this process;
    `merge` is the model's `volume_merge_size` per axis."""
    torch.set_num_threads(1)
    size = TINY if quick else SMALL
    model = build_umbrella(size, volume_merge_size=merge).to(device)
    if checkpointing:
        set_activation_checkpointing(model, True)
    batch = make_volume_batch(size, [volumes] * BATCH_SIZE, tokens_per_volume=model.config.image_seq_length)
    batch = {k: v.to(device) for k, v in batch.items()}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        training_step(model, batch)
        torch.cuda.synchronize()
        peak, method = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        before = (_proc_status_kib("VmRSS") or 0) * 1024
        if _reset_peak_rss():
            method = "VmHWM after clear_refs"
        else:
            method = "VmHWM (not reset: includes the model build)"
        training_step(model, batch)
        peak = (_proc_status_kib("VmHWM") or 0) * 1024
    return {
        "volumes_per_sample": volumes,
        "checkpointing": checkpointing,
        "before_mib": before / MIB,
        "peak_mib": peak / MIB,
        "step_peak_mib": (peak - before) / MIB,
        "method": method,
    }


def run_point_in_subprocess(volumes: int, checkpointing: bool, quick: bool, device: str, merge: int = 1) -> dict:
    """[`measure_point`] in a fresh Python process."""
    command = [sys.executable, "-m", "benchmarks.memory", "--point", str(volumes), "--device", device]
    command += ["--merge", str(merge)]
    command += ["--checkpointing"] * checkpointing + ["--quick"] * quick
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"memory point {volumes} volumes, checkpointing={checkpointing} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_memory(quick: bool = False, device: str = "cpu") -> list[dict]:
    """Step peak memory at 1, 2, 4, 8 volumes per sample, without and with activation checkpointing."""
    counts = VOLUMES_PER_SAMPLE[:1] if quick else VOLUMES_PER_SAMPLE
    rows = []
    for volumes in counts:
        plain = run_point_in_subprocess(volumes, False, quick, device)
        checkpointed = run_point_in_subprocess(volumes, True, quick, device)
        rows.append(
            {
                "benchmark": "memory",
                "case": f"{BATCH_SIZE}×{volumes} volumes",
                "metric": "step peak MiB, checkpointing / plain",
                "value": checkpointed["step_peak_mib"] / max(plain["step_peak_mib"], 1e-9),
                "goal": "report",
                "met": None,
                "ours_ms": None,
                "baseline_ms": None,
                "plain_step_peak_mib": plain["step_peak_mib"],
                "checkpointed_step_peak_mib": checkpointed["step_peak_mib"],
                "plain_peak_mib": plain["peak_mib"],
                "checkpointed_peak_mib": checkpointed["peak_mib"],
                "method": plain["method"],
                "note": f"plain {plain['step_peak_mib']:.0f} MiB, checkpointed {checkpointed['step_peak_mib']:.0f} MiB",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="One memory point (used by bench_memory); prints one JSON line.")
    parser.add_argument("--point", type=int, required=True, help="volumes per sample")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--merge", type=int, default=1, help="volume_merge_size per axis")
    args = parser.parse_args()
    print(json.dumps(measure_point(args.point, args.checkpointing, args.quick, args.device, args.merge)))


if __name__ == "__main__":
    main()
