"""The training engines the README names, run through `umbrella-train` at the 0.5B shapes: `python -m benchmarks.engines`.

Writes a randomly initialised UmbrellaLlava checkpoint with the shapes of `benchmarks.gpu` (Qwen2-0.5B LM, SigLIP
so400m tower, 96³ volumes in 16³ patches), its processor (the package's locally built ChatML tokenizer), synthetic
96³ NIfTI volumes and UMBRELLA records (one and two volumes per record), then launches

    torchrun --standalone --nproc_per_node N scripts/train.py --model_name_or_path CKPT ... ENGINE FLAGS

once per engine, each in its own process group, for `--max-steps` optimiser steps with `--bf16`:

    zero2        --deepspeed ds_configs/zero2.json, --train_mode full
    zero3        --deepspeed ds_configs/zero3.json, --train_mode full
    fsdp         --fsdp "full_shard auto_wrap" (layers to wrap: the model's `_no_split_modules`), --train_mode full
    zero3_lora   --deepspeed ds_configs/zero3.json, --train_mode lora (the final folder must be complete and merged)
    ddp          plain data parallel, --train_mode full (with `--tiny --use-cpu`: the plumbing on a CPU machine)

For each: exit code, wall time, the Trainer's logged losses, `train_runtime`, the peak GPU memory the Trainer
measured (`--skip_memory_metrics False`: `train_mem_gpu_peaked_delta` + `train_mem_gpu_alloc_delta`), and whether
the final folder holds a config and weights that all deserialize (`umbrella_llava.checkpoints.damaged_weight_files`). Writes JSON
to `--out` (default `benchmarks/results/engines.json`); each run's log goes to `--workdir`.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from umbrella_llava import UmbrellaLlavaProcessor, UmbrellaVolumeProcessor
from umbrella_llava.checkpoints import damaged_weight_files
from umbrella_llava.tokenization import build_chatml_tokenizer

from .common import build_umbrella, write_report
from .gpu import TINY_SHAPES, GpuShapes

REPO_ROOT = Path(__file__).resolve().parents[1]
ENGINE_FLAGS = {
    "zero2": ["--deepspeed", str(REPO_ROOT / "ds_configs" / "zero2.json"), "--train_mode", "full"],
    "zero3": ["--deepspeed", str(REPO_ROOT / "ds_configs" / "zero3.json"), "--train_mode", "full"],
    "fsdp": ["--fsdp", "full_shard auto_wrap", "--train_mode", "full"],
    "zero3_lora": ["--deepspeed", str(REPO_ROOT / "ds_configs" / "zero3.json"), "--train_mode", "lora"],
    "ddp": ["--train_mode", "full"],
}
QUESTIONS = ["Is this a T1-weighted brain MRI?", "Which scan is brighter?"]


def write_checkpoint(shapes: GpuShapes, folder: Path) -> None:
    """A random UmbrellaLlava of `shapes` (bf16 on disk) with its processor, ready for `umbrella-train`."""
    tokenizer = build_chatml_tokenizer()
    with torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    ):  # random init of 0.9 B weights: seconds on a GPU
        model = build_umbrella(shapes)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if model.config.image_token_id != image_token_id:
        raise RuntimeError(f"The tokenizer's <image> is {image_token_id}, the model's {model.config.image_token_id}.")
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.to(torch.bfloat16).save_pretrained(folder)
    processor = UmbrellaLlavaProcessor(
        image_processor=UmbrellaVolumeProcessor(volume_size=(shapes.volume_size,) * 3),
        tokenizer=tokenizer,
        image_seq_length=model.config.image_seq_length,
    )
    processor.save_pretrained(folder)


def write_records(shapes: GpuShapes, folder: Path, count: int) -> Path:
    """`count` UMBRELLA records over synthetic volumes: bright or dark noisy boxes, one or two per record."""
    rng = np.random.default_rng(0)
    side = shapes.volume_size
    paths = []
    for index in range(4):
        data = rng.normal(0.0, 0.1, (side, side, side)).astype(np.float32)
        data[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] += 1.0 + index
        path = folder / f"volume_{index}.nii.gz"
        nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
        paths.append(path.name)
    records = []
    for index in range(count):
        volumes = [paths[index % 4]] if index % 2 == 0 else [paths[index % 4], paths[(index + 1) % 4]]
        records.append(
            {
                "task_id": f"engine-{index}",
                "images": [{"path": path} for path in volumes],
                "conversations": [
                    {"role": "user", "content": "<image>\n" * len(volumes) + QUESTIONS[len(volumes) - 1]},
                    {"role": "assistant", "content": "Yes." if index % 4 < 2 else "The first."},
                ],
            }
        )
    path = folder / "records.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def train_command(engine: str, checkpoint: Path, records: Path, output_dir: Path, args) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    command += [str(REPO_ROOT / "scripts" / "train.py"), "--model_name_or_path", str(checkpoint)]
    command += ["--train_data", str(records), "--output_dir", str(output_dir), "--max_steps", str(args.max_steps)]
    command += ["--per_device_train_batch_size", str(args.batch_size), "--learning_rate", "1e-5"]
    command += [
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--skip_memory_metrics",
        "False",
    ]
    command += ["--dataloader_num_workers", "2"] if not args.use_cpu else []
    command += ["--use_cpu"] if args.use_cpu else ["--bf16"]
    return command + ENGINE_FLAGS[engine]


def run_to_end(command: list[str], log, env: dict[str, str], timeout: float) -> int | str:
    """Run `command` (torchrun) in its own process group. At `timeout` torchrun is sent SIGTERM, which it passes on to
    its workers (each in a session of its own), then the group is killed, so that no worker keeps holding the GPU
    into the next engine's run."""
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        return f"stopped after {timeout:.0f} s"


def read_run(output_dir: Path) -> dict:
    """Losses, runtime and memory the Trainer logged, and whether the final folder is complete."""
    state_path = output_dir / "trainer_state.json"
    result: dict = {}
    if state_path.is_file():
        history = json.loads(state_path.read_text())["log_history"]
        result["losses"] = [entry["loss"] for entry in history if "loss" in entry]
        final = next((entry for entry in history if "train_runtime" in entry), {})
        result["train_runtime_s"] = final.get("train_runtime")
        peaked, alloc = final.get("train_mem_gpu_peaked_delta"), final.get("train_mem_gpu_alloc_delta")
        if peaked is not None and alloc is not None:
            result["gpu_peak_above_start_gib"] = (peaked + alloc) / 2**30
    if not (output_dir / "config.json").is_file():
        result["saved_folder_problems"] = [f"no config.json in {output_dir}"]
    else:
        damaged = damaged_weight_files(output_dir, read_tensors=True)
        result["saved_folder_problems"] = [f"{name} {reason}" for name, reason in damaged.items()]
        result["saved_weight_files"] = sorted(path.name for path in output_dir.glob("*.safetensors"))
    result["adapter_only"] = (output_dir / "adapter_config.json").is_file() and not (
        output_dir / "config.json"
    ).is_file()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=["zero2", "zero3", "fsdp", "zero3_lora"], choices=ENGINE_FLAGS)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (with --use-cpu: the plumbing on a CPU)")
    parser.add_argument("--use-cpu", action="store_true")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=240, help="seconds per engine")
    parser.add_argument("--deadline", type=float, default=None, help="seconds for the whole run; later engines skip")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/umbrella_engines"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engines.json"))
    args = parser.parse_args(argv)

    shapes = TINY_SHAPES if args.tiny else GpuShapes()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    checkpoint = args.workdir / "checkpoint"
    write_checkpoint(shapes, checkpoint)
    records = write_records(shapes, args.workdir, count=4 * args.batch_size * args.nproc * args.max_steps)
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "shapes": shapes.name,
        "nproc": args.nproc,
        "max_steps": args.max_steps,
        "per_device_batch": args.batch_size,
        "setup_s": time.perf_counter() - started,
        "runs": {},
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    for engine in args.engines:
        output_dir = args.workdir / engine
        shutil.rmtree(output_dir, ignore_errors=True)
        command = train_command(engine, checkpoint, records, output_dir, args)
        start = time.perf_counter()
        remaining = args.deadline - (start - started) if args.deadline else float("inf")
        if remaining < 20:
            report["runs"][engine] = {"returncode": "not run: --deadline reached"}
            continue
        with open(args.workdir / f"{engine}.log", "w") as log:
            returncode = run_to_end(command, log, env, timeout=min(args.timeout, remaining))
        run = {"returncode": returncode, "wall_s": time.perf_counter() - start, **read_run(output_dir)}
        if returncode != 0:
            run["log_tail"] = (args.workdir / f"{engine}.log").read_text()[-3000:]
        report["runs"][engine] = run
        print(engine, json.dumps({k: v for k, v in run.items() if k != "log_tail"}), flush=True)
        if returncode != 0:
            print(run["log_tail"], flush=True)
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
