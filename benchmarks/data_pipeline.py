"""Data benchmarks on real `.nii.gz` brains: nilearn's MNI152 templates (T1, grey matter, white matter; 1 mm,
197×233×189 voxels), written to disk once per run.

- preprocessing throughput, volumes per second on one core: `UmbrellaVolumeProcessor.preprocess_volume` (clip to the
  0.5 / 99.5 percentiles, then min-max to [0, 1]) against MONAI's `LoadImage → EnsureChannelFirst → Orientation("RAS")
  → Resize(trilinear) → ScaleIntensityRangePercentiles(0.5, 99.5, 0, 1, clip=True)`, the same operations, on the same
  files, interleaved; and the largest and mean absolute difference between the two outputs;
- the preprocessed-volume cache (`VolumeCache.get`, warm) against preprocessing each time;
- whether `DataLoader` workers keep up with training: time per batch of loading (2 workers) against one training
  step of a model that reads the same 96³ volumes, the two timed one after the other (not interleaved: a loader
  and a step compete for the same two cores when run together).

Needs nilearn (the templates) and monai (the comparison); neither is a dependency of the package.
"""

import statistics
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .common import SMALL, build_umbrella, make_text, paired_ratio, training_step
from .common import interleaved_timings as timed

VOLUME_SIZE = 96
VOLUMES_PER_SAMPLE = 4
LOADER_BATCH_SIZE = 2
LOADER_WORKERS = 2


def write_templates(folder: Path, resolution: int = 1) -> list[Path]:
    """nilearn's MNI152 T1, grey-matter and white-matter templates as `.nii.gz` files in `folder`."""
    from nilearn import datasets

    loaders = {
        "mni152_t1": datasets.load_mni152_template,
        "mni152_gm": datasets.load_mni152_gm_template,
        "mni152_wm": datasets.load_mni152_wm_template,
    }
    paths = []
    for name, load in loaders.items():
        path = folder / f"{name}_{resolution}mm.nii.gz"
        load(resolution=resolution).to_filename(path)
        paths.append(path)
    return paths


def monai_pipeline(volume_size: int):
    """MONAI's transforms for what `UmbrellaVolumeProcessor(normalization="minmax")` does: a NIfTI path to RAS+, a
    trilinear resize of the whole field of view to `(1, S, S, S)`, a clip to the 0.5 / 99.5 percentiles and min-max
    to [0, 1]."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirst,
        LoadImage,
        Orientation,
        Resize,
        ScaleIntensityRangePercentiles,
    )

    with warnings.catch_warnings():  # MONAI warns that a default of Orientation's `labels` will change
        warnings.simplefilter("ignore", FutureWarning)
        orientation = Orientation(axcodes="RAS")
    return Compose(
        [
            LoadImage(image_only=True),
            EnsureChannelFirst(),
            orientation,
            Resize(spatial_size=(volume_size,) * 3, mode="trilinear", align_corners=False),
            ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
        ]
    )


def output_gap(ours, monai, paths: list[Path]) -> tuple[float, float]:
    """Largest and mean absolute difference between the two pipelines' outputs over `paths` (values in [0, 1])."""
    differences = [(ours.preprocess_volume(path) - torch.as_tensor(monai(str(path))).float()).abs() for path in paths]
    return max(float(d.max()) for d in differences), statistics.mean(float(d.mean()) for d in differences)


class VolumeSamples(Dataset):
    """Samples of `VOLUMES_PER_SAMPLE` volumes each, read from `paths` in turn, through a cache or not."""

    def __init__(self, paths: list[Path], num_samples: int, image_processor, cache=None):
        self.paths, self.num_samples = paths, num_samples
        self.image_processor, self.cache = image_processor, cache

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> torch.Tensor:
        paths = [self.paths[(index * VOLUMES_PER_SAMPLE + k) % len(self.paths)] for k in range(VOLUMES_PER_SAMPLE)]
        if self.cache is not None:
            return torch.stack([self.cache.get(path, self.image_processor) for path in paths])
        return torch.stack([self.image_processor.preprocess_volume(path) for path in paths])


def _collate(samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    from umbrella_llava.image_processing_umbrella_llava import stack_volumes

    return stack_volumes(samples)


def seconds_per_batch(dataset: Dataset, batches: int) -> float:
    """Steady-state seconds per batch of a `LOADER_WORKERS`-worker DataLoader (the first batch, which pays for
    starting the workers, is not counted)."""
    loader = DataLoader(
        dataset, batch_size=LOADER_BATCH_SIZE, num_workers=LOADER_WORKERS, collate_fn=_collate, prefetch_factor=2
    )
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return (time.perf_counter() - start) / batches


def bench_data(quick: bool = False) -> list[dict]:
    """Preprocessing vs MONAI (goal ≥ 2×), cache vs none (goal ≥ 20×), DataLoader vs a training step."""
    from umbrella_llava.image_processing_umbrella_llava import UmbrellaVolumeProcessor
    from umbrella_llava.volume_cache import VolumeCache

    resolution, volume_size, repeats = (2, 16, 2) if quick else (1, VOLUME_SIZE, 5)
    rows = []
    with tempfile.TemporaryDirectory(prefix="umbrella_bench_") as folder:
        paths = write_templates(Path(folder), resolution)
        ours = UmbrellaVolumeProcessor(volume_size=(volume_size,) * 3, normalization="minmax")
        monai = monai_pipeline(volume_size)
        shapes = {tuple(ours.preprocess_volume(paths[0]).shape), tuple(monai(str(paths[0])).shape)}
        if len(shapes) != 1:
            raise RuntimeError(f"UmbrellaVolumeProcessor and MONAI disagree on the output shape: {shapes}")
        largest_gap, mean_gap = output_gap(ours, monai, paths)

        # One round preprocesses every file once with each pipeline; the order rotates between rounds.
        times = timed(
            {
                "monai": lambda: [monai(str(path)) for path in paths],
                "ours": lambda: [ours.preprocess_volume(path) for path in paths],
            },
            repeats=repeats,
        )
        per_volume = {name: statistics.median(values) / len(paths) for name, values in times.items()}
        shape = "×".join(map(str, _nifti_shape(paths[0])))
        speedup = paired_ratio(times, "monai", "ours")
        rows.append(
            {
                "benchmark": "data",
                "case": f"preprocess {shape} .nii.gz → {volume_size}³: RAS+, trilinear resize, clip 0.5/99.5 + min-max",
                "metric": "speed-up vs MONAI, same operations (volumes/s per core)",
                "value": speedup,
                "goal": "≥ 2",
                "met": speedup >= 2,
                "ours_ms": 1000 * per_volume["ours"],
                "baseline_ms": 1000 * per_volume["monai"],
                "ours_volumes_per_s": 1 / per_volume["ours"],
                "monai_volumes_per_s": 1 / per_volume["monai"],
                "largest_abs_difference": largest_gap,
                "mean_abs_difference": mean_gap,
                "note": f"ours {1 / per_volume['ours']:.2f} vol/s, MONAI {1 / per_volume['monai']:.2f} vol/s; outputs "
                f"differ by at most {largest_gap:.2g}, {mean_gap:.2g} on average (values in [0, 1])",
            }
        )

        cache = VolumeCache(Path(folder) / "cache")
        for path in paths:
            cache.get(path, ours)  # fill the cache
        times = timed(
            {
                "uncached": lambda: [ours.preprocess_volume(path) for path in paths],
                "cached": lambda: [cache.get(path, ours) for path in paths],
            },
            repeats=repeats,
        )
        speedup = paired_ratio(times, "uncached", "cached")
        rows.append(
            {
                "benchmark": "data",
                "case": f"VolumeCache.get (warm) vs preprocess_volume, {volume_size}³",
                "metric": "speed-up, cache / no cache",
                "value": speedup,
                "goal": "≥ 20",
                "met": speedup >= 20,
                "ours_ms": 1000 * statistics.median(times["cached"]) / len(paths),
                "baseline_ms": 1000 * statistics.median(times["uncached"]) / len(paths),
            }
        )
        rows += _loader_vs_step(paths, ours, cache, volume_size, quick)
    return rows


def _nifti_shape(path: Path) -> tuple[int, ...]:
    import nibabel

    return tuple(nibabel.load(path).shape)


def _loader_vs_step(paths, image_processor, cache, volume_size: int, quick: bool) -> list[dict]:
    """Loading time per batch (uncached and cached) / one training step on the same batch shape."""
    batches = 2 if quick else 6
    grid = 4 if quick else 6  # patches per axis: 6³ = 216 tokens per volume, as in the real model
    size = replace(SMALL, volume_size=volume_size, volume_patch=volume_size // grid)
    if quick:
        size = replace(size, vision_hidden=32, vision_intermediate=64, text_hidden=64, text_intermediate=128)
    model = build_umbrella(size)
    counts = [VOLUMES_PER_SAMPLE] * LOADER_BATCH_SIZE
    batch = make_text(counts, size.tokens_per_volume, size.vocab_size)
    batch["pixel_values"] = torch.randn(LOADER_BATCH_SIZE, VOLUMES_PER_SAMPLE, 1, *(volume_size,) * 3)
    step_times = timed({"step": lambda: training_step(model, batch)}, repeats=2 if quick else 3)["step"]
    step = statistics.median(step_times)

    num_samples = LOADER_BATCH_SIZE * (batches + 1)
    uncached = seconds_per_batch(VolumeSamples(paths, num_samples, image_processor), batches)
    cached = seconds_per_batch(VolumeSamples(paths, num_samples, image_processor, cache), batches)
    rows = []
    for label, seconds in (("no cache", uncached), ("warm cache", cached)):
        rows.append(
            {
                "benchmark": "data",
                "case": (
                    f"DataLoader {LOADER_WORKERS} workers, {label}, batch {LOADER_BATCH_SIZE}×{VOLUMES_PER_SAMPLE} "
                    f"× {volume_size}³ vs CPU step of {size.tokens_per_volume} tokens/volume model"
                ),
                "metric": "loading time per batch / training step, timed one after the other (< 1 keeps up)",
                "value": seconds / step,
                "goal": "< 1",
                "met": seconds < step,
                "ours_ms": 1000 * seconds,
                "baseline_ms": 1000 * step,
                "volumes_per_s": LOADER_BATCH_SIZE * VOLUMES_PER_SAMPLE / seconds,
                "note": f"{LOADER_BATCH_SIZE * VOLUMES_PER_SAMPLE / seconds:.1f} volumes/s from the loader",
            }
        )
    return rows
