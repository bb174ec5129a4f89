"""Shared pieces of the benchmarks: model sizes, batches, one training step, and side-by-side timing.

Every comparison is timed *interleaved*: each round runs every variant once, in a rotating order, and the reported
ratio is the median over rounds of (variant time / baseline time in the same round). On a shared, noisy machine an
absolute time says little; a ratio of neighbours in time says a lot.
"""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from umbrella_llava import UmbrellaLlavaConfig, UmbrellaLlavaForConditionalGeneration
from umbrella_llava.data import IGNORE_INDEX

IMAGE_TOKEN_ID = 3
TEXT_TOKENS_PER_SAMPLE = 32


@dataclass(frozen=True)
class ModelSize:
    """The sizes of one benchmark model. The same vision encoder and language model back ours and stock LLaVA."""

    name: str
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    vocab_size: int
    volume_size: int  # voxels per axis of a cubic volume
    volume_patch: int  # voxels per axis of a cubic patch
    tie_word_embeddings: bool = False

    @property
    def tokens_per_volume(self) -> int:
        return (self.volume_size // self.volume_patch) ** 3

    def describe(self) -> str:
        return (
            f"vision {self.vision_layers}×{self.vision_hidden} (SigLIP), LM {self.text_layers}×{self.text_hidden} "
            f"(Qwen2, vocab {self.vocab_size}), {self.volume_size}³ volumes / {self.volume_patch}³ patches = "
            f"{self.tokens_per_volume} tokens"
        )


# Small but not toy: every matmul is big enough that framework overhead does not dominate on a CPU.
SMALL = ModelSize("small", 256, 1024, 4, 4, 384, 1024, 4, 6, 2, 8192, 32, 8)
# For the smoke test and `--quick`: seconds, not minutes.
TINY = ModelSize("tiny", 32, 64, 2, 4, 64, 128, 2, 4, 2, 512, 16, 4)


def vision_config(size: ModelSize, image_size: int, patch_size: int, num_channels: int) -> dict:
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": size.vision_hidden,
        "intermediate_size": size.vision_intermediate,
        "num_hidden_layers": size.vision_layers,
        "num_attention_heads": size.vision_heads,
        "image_size": image_size,
        "patch_size": patch_size,
        "num_channels": num_channels,
        "vision_use_head": False,
    }


def text_config(size: ModelSize) -> dict:
    return {
        "model_type": "qwen2",
        "hidden_size": size.text_hidden,
        "intermediate_size": size.text_intermediate,
        "num_hidden_layers": size.text_layers,
        "num_attention_heads": size.text_heads,
        "num_key_value_heads": size.text_kv_heads,
        "vocab_size": size.vocab_size,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": size.tie_word_embeddings,
    }


def build_umbrella(
    size: ModelSize, attn_implementation: str = "sdpa", volume_merge_size: int = 1
) -> UmbrellaLlavaForConditionalGeneration:
    """A randomly initialised UmbrellaLlava of `size`, in training mode; `volume_merge_size` merges that many patch
    tokens per axis into one (`size.tokens_per_volume / volume_merge_size**3` image tokens per volume)."""
    config = UmbrellaLlavaConfig(
        vision_config=vision_config(size, image_size=size.volume_size, patch_size=size.volume_patch, num_channels=1),
        text_config=text_config(size),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        volume_size=(size.volume_size,) * 3,
        volume_patch_size=(size.volume_patch,) * 3,
        volume_channels=1,
        volume_merge_size=volume_merge_size,
        tie_word_embeddings=size.tie_word_embeddings,
    )
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
    config = LlavaConfig(
        vision_config=vision_config(size, image_size=image_side, patch_size=patch_side, num_channels=channels),
        text_config=text_config(size),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
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
