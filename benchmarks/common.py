"""Shared pieces of the benchmarks: model sizes, batches, one training step, and side-by-side timing.

Every comparison is timed *interleaved*: each round runs every variant once, in a rotating order, and the reported
ratio is the median over rounds of (variant time / baseline time in the same round). On a shared, noisy machine an
absolute time says little; a ratio of neighbours in time says a lot.
"""

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from umbrella_llava import UmbrellaLlavaForConditionalGeneration, model_sizes
from umbrella_llava.data import IGNORE_INDEX
from umbrella_llava.model_sizes import DEFAULT_IMAGE_TOKEN_ID as IMAGE_TOKEN_ID
from umbrella_llava.model_sizes import ModelSize, llava_config_kwargs, text_config, umbrella_config

TEXT_TOKENS_PER_SAMPLE = 32
# ModelSize and text_config are the package's (model_sizes.py), re-exported for the benchmark modules.
__all__ = ["ModelSize", "text_config", "vision_config", "build_umbrella", "build_stock", "IMAGE_TOKEN_ID"]


# Small but not toy: every matmul is big enough that framework overhead does not dominate on a CPU.
SMALL = ModelSize("small", 256, 1024, 4, 4, 384, 1024, 4, 6, 2, 8192, 32, 8)
# For the smoke test and `--quick`: seconds, not minutes.
TINY = ModelSize("tiny", 32, 64, 2, 4, 64, 128, 2, 4, 2, 512, 16, 4)


def vision_config(size: ModelSize, image_size: int, patch_size: int, num_channels: int) -> dict:
    """The package's tower sub-config (`umbrella_llava.model_sizes`) with SigLIP's head off, as every recorded
    benchmark figure was measured."""
    return model_sizes.vision_config(
        size, image_size=image_size, patch_size=patch_size, num_channels=num_channels, use_head=False
    )


def build_umbrella(
    size: ModelSize, attn_implementation: str = "sdpa", volume_merge_size: int = 1
) -> UmbrellaLlavaForConditionalGeneration:
    """A randomly initialised UmbrellaLlava of `size`, in training mode; `volume_merge_size` merges that many patch
    tokens per axis into one (`size.tokens_per_volume / volume_merge_size**3` image tokens per volume)."""
    geometry = {"image_size": size.volume_size, "patch_size": size.volume_patch, "num_channels": 1}
    config = umbrella_config(size, vision_options={**geometry, "use_head": False}, volume_merge_size=volume_merge_size)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return UmbrellaLlavaForConditionalGeneration(config).train()


def stock_image_geometry(size: ModelSize) -> tuple[int, int, int]:
    """(image side, patch side, channels) of the 2-D images that give stock LLaVA the same work per image as one of
    our volumes: as many patches (grid side = √patches) and as many values per patch (channels = patch depth)."""
    grid = round(size.tokens_per_volume**0.5)
    if grid * grid != size.tokens_per_volume:
        raise ValueError(f"{size.tokens_per_volume} patches per volume is not a square number of 2-D patches.")
    return grid * size.volume_patch, size.volume_patch, size.volume_patch


def build_stock(size: ModelSize, attn_implementation: str = "sdpa") -> LlavaForConditionalGeneration:
    """Stock LLaVA with the same encoder layers and LM as `build_umbrella(size)`, on 2-D images with the same
    number of patches per image and the same number of values per patch."""
    image_side, patch_side, channels = stock_image_geometry(size)
    geometry = {"image_size": image_side, "patch_size": patch_side, "num_channels": channels, "use_head": False}
    config = LlavaConfig(
        **llava_config_kwargs(size, **geometry),
        projector_hidden_act="gelu",
        image_seq_length=size.tokens_per_volume,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).train()


def make_text(
    volumes_per_sample: list[int], tokens_per_volume: int, vocab_size: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (B, L): a short prompt, one image-token block per
    volume, then `TEXT_TOKENS_PER_SAMPLE` answer tokens that carry the loss. Samples with fewer volumes are shorter."""
    generator = torch.Generator().manual_seed(seed)
    rows, label_rows = [], []
    for count in volumes_per_sample:
        prompt = torch.randint(10, vocab_size, (4,), generator=generator).tolist()
        answer = torch.randint(10, vocab_size, (TEXT_TOKENS_PER_SAMPLE,), generator=generator).tolist()
        image_block = [IMAGE_TOKEN_ID] * (tokens_per_volume * count)
        rows.append(prompt + image_block + answer)
        label_rows.append([IGNORE_INDEX] * (len(prompt) + len(image_block)) + answer)
    length = max(len(row) for row in rows)
    pad = [len(row) for row in rows]
    return {
        "input_ids": torch.tensor([row + [0] * (length - len(row)) for row in rows]),
        "attention_mask": torch.tensor([[1] * n + [0] * (length - n) for n in pad]),
        "labels": torch.tensor([row + [IGNORE_INDEX] * (length - len(row)) for row in label_rows]),
    }


def make_volume_batch(
    size: ModelSize,
    volumes_per_sample: list[int],
    slots: int | None = None,
    seed: int = 0,
    tokens_per_volume: int | None = None,
) -> dict[str, torch.Tensor]:
    """A batch for UmbrellaLlava: text from `make_text`, `pixel_values (B, slots, 1, S, S, S)` with zeros in the
    padded slots, and `image_mask (B, slots)`. `tokens_per_volume` is the model's `image_seq_length` (default: one
    token per patch)."""
    slots = max(volumes_per_sample) if slots is None else slots
    tokens_per_volume = size.tokens_per_volume if tokens_per_volume is None else tokens_per_volume
    batch = make_text(volumes_per_sample, tokens_per_volume, size.vocab_size, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    pixel_values = torch.randn(len(volumes_per_sample), slots, 1, *(size.volume_size,) * 3, generator=generator)
    image_mask = torch.arange(slots)[None, :] < torch.tensor(volumes_per_sample)[:, None]
    pixel_values[~image_mask] = 0.0
    return {**batch, "pixel_values": pixel_values, "image_mask": image_mask}


def make_stock_batch(size: ModelSize, volumes_per_sample: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """The same text for stock LLaVA, with 2-D images `(M, C, side, side)` in place of the M valid volumes."""
    batch = make_text(volumes_per_sample, size.tokens_per_volume, size.vocab_size, seed)
    image_side, _, channels = stock_image_geometry(size)
    generator = torch.Generator().manual_seed(seed + 1)
    pixel_values = torch.randn(sum(volumes_per_sample), channels, image_side, image_side, generator=generator)
    return {**batch, "pixel_values": pixel_values}


def training_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Forward + backward of `model(**batch).loss`; gradients are dropped afterwards. Returns the loss."""
    loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return float(loss.detach())


def set_activation_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing on (non-reentrant) or off, by its transformers 5.2x name where it exists."""
    if enabled and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_timings(
    variants: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Run every variant `warmup` times, then `repeats` rounds of each variant once, in a rotating order.

    Returns:
        seconds per call, `repeats` values per variant, in round order (round i of every variant ran together).
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            variants[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of `times[name] / times[baseline]` in the same round."""
    return statistics.median(t / b for t, b in zip(times[name], times[baseline]))


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `rows` (dicts) with the given columns; floats get three significant decimals."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report(report: dict, path: Path) -> None:
    """Write a GPU script's report as JSON to `path` (its folder made if needed) and say where, and in how long."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    took = f" in {report['seconds']:.0f} s" if "seconds" in report else ""
    print(f"\nwrote {path}{took}")
