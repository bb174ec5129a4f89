"""Token budget: what merging neighbouring patch tokens (`volume_merge_size`) buys and costs.

One row per merge (1, 2×2×2, 4×4×4 on a 4³ patch grid): tokens per volume; the learning benchmark's held-out
result (`benchmarks.learning`: steps until every volume-only question kind reaches 0.9, median of its seeds, and the
accuracy at the end); the training-step time of the `SMALL` model at `BATCH_SIZE` samples of 4 volumes, as a ratio to
merge 1 timed interleaved in the same run; and that step's peak memory (`benchmarks.memory`, a fresh process per
point).

The merge candidates are compared on the learning benchmark too: the package's average of each block
(`UmbrellaVolumeMerger`) against Qwen2-VL's merger in 3-D (`ConcatMlpMerger`: each block's tokens normalised and
concatenated, then an MLP), which this file swaps in.
"""

import tempfile
from pathlib import Path

import torch
from einops.layers.torch import Rearrange
from torch import nn

from umbrella_llava.modeling_umbrella_llava import UmbrellaVolumeMerger

from .common import (
    SMALL,
    TINY,
    build_umbrella,
    interleaved_timings,
    make_volume_batch,
    median_ms,
    paired_ratio,
    training_step,
)
from .learning import SEEDS, TASKS, Variant, measure_variant
from .memory import BATCH_SIZE, run_point_in_subprocess

MERGES = (1, 2, 4)
VOLUMES_PER_SAMPLE = 4


class ConcatMlpMerger(nn.Module):
    """Qwen2-VL's `PatchMerger` in 3-D, ahead of LLaVA's projector: each `m³` block of tokens, normalised one by
    one, is concatenated and mapped back to the tower's width by an MLP of width `m³ · C` (Qwen2-VL's). The MLP is
    added to the block's average and its last layer starts at zero, so the merger starts as an average, the start
    a converted checkpoint's projector needs."""

    def __init__(self, average: UmbrellaVolumeMerger, width: int, merge: int, grid: int):
        super().__init__()
        self.average = average
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.block_layout = Rearrange(
            "m (h mh w mw d md) c -> m (h w d) (mh mw md c)", mh=merge, mw=merge, md=merge, w=grid // merge,
            d=grid // merge,
        )  # fmt: skip
        hidden = merge**3 * width
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, width))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        prefix = features.shape[1] - self.average.num_patches
        learnt = self.mlp(self.block_layout(self.norm(features[:, prefix:])))
        return self.average(features) + nn.functional.pad(learnt, (0, 0, prefix, 0))


def use_concat_mlp_merger(model) -> None:
    """Swap the model's average merger for [`ConcatMlpMerger`] (trained with the rest)."""
    projector, config = model.model.multi_modal_projector, model.config
    projector.volume_merger = ConcatMlpMerger(
        projector.volume_merger, projector.linear_1.in_features, config.volume_merge_size[0], config.volume_grid[0]
    )


def learning_variants(quick: bool) -> list[tuple[int, str, Variant]]:
    """(merge per axis, merger, variant) of each learning row."""
    rows = [(1, "none", Variant("merge 1", "64 tokens per volume"))]
    for merge in MERGES[1:]:
        tokens = 64 // merge**3
        merge_kwargs = {"volume_merge_size": merge}
        rows.append(
            (merge, "average", Variant(f"merge {merge}³ average", f"{tokens} tokens", config_kwargs=merge_kwargs))
        )
        if quick and merge != 2:
            continue
        rows.append(
            (
                merge,
                "concat + MLP",
                Variant(
                    f"merge {merge}³ concat+MLP",
                    f"{tokens} tokens",
                    config_kwargs=merge_kwargs,
                    adjust_model=use_concat_mlp_merger,
                ),
            )
        )
    return rows


def step_times(quick: bool) -> dict[int, dict]:
    """Training-step time per merge at `BATCH_SIZE` × `VOLUMES_PER_SAMPLE` volumes, timed interleaved."""
    size = TINY if quick else SMALL
    models = {merge: build_umbrella(size, volume_merge_size=merge) for merge in MERGES}
    batches = {
        merge: make_volume_batch(
            size, [VOLUMES_PER_SAMPLE] * BATCH_SIZE, tokens_per_volume=model.config.image_seq_length
        )
        for merge, model in models.items()
    }
    steps = {merge: (lambda m=merge: training_step(models[m], batches[m])) for merge in MERGES}
    times = interleaved_timings(steps, repeats=2 if quick else 7)
    return {merge: {"ms": median_ms(times[merge]), "ratio": paired_ratio(times, merge, MERGES[0])} for merge in MERGES}


def bench_token_budget(quick: bool = False) -> list[dict]:
    """One row per merge and merger: tokens per volume, learning result, step time ratio and peak memory."""
    seeds = SEEDS[:1] if quick else SEEDS
    timings = step_times(quick)
    memory = {merge: run_point_in_subprocess(VOLUMES_PER_SAMPLE, False, quick, "cpu", merge) for merge in MERGES}
    workdir = tempfile.TemporaryDirectory()  # the data and volume cache, shared by the variants
    rows = []
    for merge, merger, variant in learning_variants(quick):
        variant, result, accuracy = measure_variant(variant, seeds, Path(workdir.name), quick)
        kinds, steps = TASKS[variant.task], result["median_steps"]
        timing = timings[merge] if merger != "concat + MLP" else None
        peak = memory[merge]["step_peak_mib"] if merger != "concat + MLP" else None
        rows.append(
            {
                "benchmark": "token_budget",
                "case": variant.name,
                "metric": "step time vs merge 1" if timing else "steps to 0.9 (median)",
                "value": timing["ratio"] if timing else (steps or float(variant.max_steps + 1)),
                "goal": "report",
                "met": None,
                "ours_ms": timing["ms"] if timing else None,
                "baseline_ms": timings[MERGES[0]]["ms"] if timing else None,
                "merge": merge,
                "merger": merger,
                "tokens_per_volume": 64 // merge**3,
                "steps_to_target": steps,
                "accuracy": accuracy,
                "step_peak_mib": peak,
                "note": (
                    f"{64 // merge**3} tokens/volume; steps to 0.9 "
                    f"{steps if steps is not None else f'>{variant.max_steps}'} (per seed "
                    f"{[run['steps_to_target'] for run in result['runs']]}); "
                    + ", ".join(f"{kind} {accuracy[kind]:.2f}" for kind in kinds)
                    + (f"; step peak {peak:.0f} MiB" if peak is not None else "")
                ),
            }
        )
    workdir.cleanup()
    return rows
