"""Distributed runs: refuse a launch whose processes would not form one group, and prove the group after setup.

On a machine without an accelerator, `torchrun` / `accelerate launch` processes form one gloo group only with
`--use_cpu`; without it each process would silently train alone on the whole dataset, so
[`check_distributed_launch`] refuses such a launch with an error rather than guessing, and [`check_process_group`]
proves the group once the Trainer has set it up.

Nothing here compares the ranks' weights after training: DistributedDataParallel (which accelerate wraps the model in)
keeps the replicas equal by construction, and FSDP / ZeRO hold one sharded copy; see `training.run_training`.
"""

import os

import torch
import torch.distributed as dist
from transformers import TrainingArguments


def _accelerator_available() -> bool:
    if torch.cuda.is_available():
        return True
    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator is not None and accelerator.is_available())


def check_distributed_launch(training_args: TrainingArguments, environ: dict[str, str] | None = None) -> None:
    """Refuse a multi-process launch whose processes would not form one process group.

    Under `torchrun` / `accelerate launch` on a machine without an accelerator, the Trainer joins the processes into
    one gloo group only with `use_cpu=True`; otherwise each process trains alone on the whole dataset and nothing
    says so. We raise instead of setting `use_cpu` ourselves: on a GPU machine, a missing accelerator usually means
    a broken driver or `CUDA_VISIBLE_DEVICES`, which should not silently become a CPU run.

    FSDP on CPUs is refused too: accelerate shards only on accelerators (its `AcceleratorState` turns on FSDP for
    multi-GPU/XPU/NPU/... runs, not for multi-CPU ones), so with `--use_cpu` the Trainer silently trains with DDP,
    every process holding the whole model.

    Raises:
        ValueError: if `WORLD_SIZE > 1`, no accelerator is visible and `use_cpu` is False; or if `--fsdp` is asked
            for a run on CPUs.
    """
    environ = os.environ if environ is None else environ
    world_size = int(environ.get("WORLD_SIZE", "1"))
    if training_args.fsdp and (training_args.use_cpu or not _accelerator_available()):
        raise ValueError(
            "--fsdp on CPUs: accelerate shards a model only on GPUs (or other accelerators), so this run would train "
            "with DDP, every process holding the whole model. Drop --fsdp (DDP is what runs), or run on GPUs."
        )
    if world_size > 1 and not training_args.use_cpu and not _accelerator_available():
        raise ValueError(
            f"Launched with WORLD_SIZE={world_size} but no GPU or other accelerator is visible and --use_cpu is not "
            "set: each process would train alone on the whole dataset instead of forming one group. Pass --use_cpu "
            "to train on CPUs (gloo), or make the GPUs visible (check the driver and CUDA_VISIBLE_DEVICES)."
        )


def check_process_group(training_args: TrainingArguments, environ: dict[str, str] | None = None) -> int:
    """After the Trainer is set up, prove that all launched processes are in one process group.

    Returns:
        The world size.

    Raises:
        RuntimeError: if the Trainer's world size, the process group's size and `WORLD_SIZE` disagree, or an
            all-reduce across the group does not see every rank.
    """
    environ = os.environ if environ is None else environ
    launched = int(environ.get("WORLD_SIZE", "1"))
    if launched == 1:
        return 1
    group_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    if training_args.world_size != launched or group_size != launched:
        raise RuntimeError(
            f"WORLD_SIZE={launched} processes were launched, but the Trainer sees world_size="
            f"{training_args.world_size} and the process group has {group_size} members; the processes did not "
            "form one group."
        )
    ranks = torch.zeros(launched, dtype=torch.float64, device=training_args.device)
    ranks[dist.get_rank()] = 1
    dist.all_reduce(ranks)
    if not bool((ranks == 1).all()):
        raise RuntimeError(f"An all-reduce over the process group saw ranks {ranks.tolist()}; expected one of each.")
    return launched


__all__ = ["check_distributed_launch", "check_process_group"]
