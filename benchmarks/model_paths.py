"""Training-step benchmarks of the model's volume path (forward + backward, no optimiser step):

- `stock_overhead`: UmbrellaLlava against stock `LlavaForConditionalGeneration` with the same LM, the same vision
  encoder layers and the same visual tokens per sample (stock gets 2-D images with as many patches, and as many
  values per patch, as our volumes).
- `padding`: the same valid volumes sent as a tight `(B, n, ...)` tensor and as `(B, 2n, ...)` slots whose
  `image_mask` pads half of them.
- `handwritten_loop`: the native path against the per-sample loop of `handwritten_loop.py` at 1, 4 and 10 volume
  slots per sample.
"""

import math

import torch

from umbrella_llava.modeling_umbrella_llava import flatten_volumes

from .common import (
    SMALL,
    TINY,
    ModelSize,
    build_stock,
    build_umbrella,
    make_stock_batch,
    make_volume_batch,
    median_ms,
    paired_ratio,
    training_step,
)
from .common import interleaved_timings as timed
from .handwritten_loop import handwritten_training_step

BATCH_VOLUMES = [4, 4]  # 2 samples of 4 volumes: 8 volumes, 512 image tokens per sample at the SMALL size


def _sizes(quick: bool) -> tuple[ModelSize, int]:
    return (TINY, 3) if quick else (SMALL, 7)


def _embedding_step(model: torch.nn.Module, pixel_values: torch.Tensor) -> None:
    """Forward + backward of the vision tower's patch embedding alone: the one layer ours and stock do not share."""
    model.model.vision_tower.embeddings(pixel_values).sum().backward()
    model.zero_grad(set_to_none=True)


def bench_stock_overhead(quick: bool = False) -> list[dict]:
    """Step time of UmbrellaLlava / stock LLaVA at equal LM, encoder layers and visual tokens. Goal ≤ 1.05.

    With it: an A/A ratio (stock against itself, the noise floor of this run), and the difference between the two
    patch embeddings (3-D rearrange + linear against 2-D convolution), timed alone, as a fraction of the step.
    """
    size, repeats = _sizes(quick)
    ours, stock = build_umbrella(size), build_stock(size)
    ours_batch = make_volume_batch(size, BATCH_VOLUMES)
    stock_batch = make_stock_batch(size, BATCH_VOLUMES)
    times = timed(
        {
            "ours": lambda: training_step(ours, ours_batch),
            "stock": lambda: training_step(stock, stock_batch),
            "stock_again": lambda: training_step(stock, stock_batch),
        },
        repeats=2 * repeats,
    )
    ratio = paired_ratio(times, "ours", "stock")
    noise_floor = paired_ratio(times, "stock_again", "stock")
    volumes = ours_batch["pixel_values"].flatten(0, 1)
    embedding = timed(
        {
            "ours": lambda: _embedding_step(ours, volumes),
            "stock": lambda: _embedding_step(stock, stock_batch["pixel_values"]),
        },
        repeats=30,
    )
    step_ms = median_ms(times["stock"])
    embedding_extra = (median_ms(embedding["ours"]) - median_ms(embedding["stock"])) / step_ms
    return [
        {
            "benchmark": "stock_overhead",
            "case": f"{len(BATCH_VOLUMES)}×{BATCH_VOLUMES[0]} volumes, {size.tokens_per_volume} tokens each",
            "metric": "step time, UmbrellaLlava / stock LLaVA",
            "value": ratio,
            "goal": "≤ 1.05",
            "met": ratio <= 1.05,
            "ours_ms": median_ms(times["ours"]),
            "baseline_ms": step_ms,
            "noise_floor_ratio": noise_floor,
            "embedding_extra_fraction_of_step": embedding_extra,
            "note": f"A/A (stock vs stock) {noise_floor:.3f}; 3-D vs 2-D patch embedding {embedding_extra:+.2%} of a step",
        }
    ]


def bench_padding(quick: bool = False) -> list[dict]:
    """Step time with half the slots padded / the same volumes tight. Goal ≤ 1.02.

    Two padding-independent references come with it: an A/A ratio (the tight batch against itself, the noise floor
    of this run) and the time of the only code that differs between the two batches, `flatten_volumes`, as a
    fraction of the step (what padding can cost at most).
    """
    size, repeats = _sizes(quick)
    model = build_umbrella(size)
    tight = make_volume_batch(size, BATCH_VOLUMES)
    padded = make_volume_batch(size, BATCH_VOLUMES, slots=2 * max(BATCH_VOLUMES))
    padded["pixel_values"][padded["image_mask"]] = tight["pixel_values"].flatten(0, 1)
    times = timed(
        {
            "tight": lambda: training_step(model, tight),
            "padded": lambda: training_step(model, padded),
            "tight_again": lambda: training_step(model, tight),
        },
        repeats=2 * repeats,
    )
    ratio = paired_ratio(times, "padded", "tight")
    flatten = timed(
        {
            "tight": lambda: flatten_volumes(tight["pixel_values"], tight["image_mask"]),
            "padded": lambda: flatten_volumes(padded["pixel_values"], padded["image_mask"]),
        },
        repeats=50,
    )
    step_ms = median_ms(times["tight"])
    noise_floor = paired_ratio(times, "tight_again", "tight")
    flatten_extra = (median_ms(flatten["padded"]) - median_ms(flatten["tight"])) / step_ms
    return [
        {
            "benchmark": "padding",
            "case": f"{sum(BATCH_VOLUMES)} volumes in {len(BATCH_VOLUMES)}×{2 * max(BATCH_VOLUMES)} slots",
            "metric": "step time, half the slots padded / tight",
            "value": ratio,
            "goal": "≤ 1.02",
            "met": ratio <= 1.02,
            "ours_ms": median_ms(times["padded"]),
            "baseline_ms": step_ms,
            "noise_floor_ratio": noise_floor,
            "flatten_extra_fraction_of_step": flatten_extra,
            "note": f"A/A (tight vs tight) {noise_floor:.3f}; masked selection costs {flatten_extra:.2%} of a step",
        }
    ]


def handwritten_counts(slots: int) -> list[int]:
    """Volumes per sample of a 2-sample batch with `slots` slots: one full sample, one half full."""
    return [slots, max(1, math.ceil(slots / 2))]


def bench_handwritten_loop(quick: bool = False) -> list[dict]:
    """Speed-up of the native path over the hand-written per-sample loop at 1, 4 and 10 slots per sample."""
    size, repeats = _sizes(quick)
    model = build_umbrella(size)
    rows = []
    for slots in (1, 4, 10):
        counts = handwritten_counts(slots)
        batch = make_volume_batch(size, counts, slots=slots)
        times = timed(
            {
                "native": lambda batch=batch: training_step(model, batch),
                "loop": lambda batch=batch: handwritten_training_step(model, batch),
            },
            repeats=repeats,
        )
        speedup = paired_ratio(times, "loop", "native")
        rows.append(
            {
                "benchmark": "handwritten_loop",
                "case": f"{slots} slots/sample, volumes {counts}",
                "metric": "speed-up, hand-written loop / native",
                "value": speedup,
                "goal": "report",
                "met": None,
                "ours_ms": median_ms(times["native"]),
                "baseline_ms": median_ms(times["loop"]),
            }
        )
    return rows


def check_same_loss(size: ModelSize = TINY) -> tuple[float, float]:
    """The native path and the hand-written loop compute the same loss on a padded batch (a sanity check)."""
    from .handwritten_loop import handwritten_loss

    model = build_umbrella(size).eval()
    batch = make_volume_batch(size, handwritten_counts(4), slots=4)
    with torch.no_grad():
        return float(model(**batch).loss), float(handwritten_loss(model, **batch))
