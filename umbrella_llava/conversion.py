"""Turn a stock LLaVA checkpoint into an UmbrellaLlava checkpoint that reads 3-D volumes.

The language model, the projector, `lm_head` and the vision tower's encoder layers are copied bit-identically: the
stock checkpoint is loaded with transformers' own `LlavaForConditionalGeneration`, whose registered conversion
mapping renames the legacy key names of `llava-hf` folders (`language_model.model.*`, `vision_tower.*`, ...). A custom
class would skip that mapping and load with a warning and a randomly initialised language model.

Only the tower's 2-D `embeddings` is replaced by [`UmbrellaVolumeEmbeddings`]; the tower's `post_layernorm` and
SigLIP's attention-pooling `head` feed nothing LLaVA uses and are dropped. The 3-D embedder is initialised by
inflating the 2-D one (`inflate_volume_embeddings`, the default) or randomly (`random_volume_embeddings`).

Inflation, I3D-style, for a 2-D patch kernel `(hidden, C2d, p, p)` and a 3-D patch `(ph, pw, pd)` of `C` channels:

1. pixel normalisation: the base's image processor feeds its tower `(p * rescale_factor - mean_c) / std_c` for 8-bit
   pixels `p`, while the converted processor min-max scales each volume to [0, 1]. A [0, 1] voxel `v` stands for the
   8-bit pixel `255 v`, so the kernel's channel `c` is multiplied by `255 * rescale_factor / std_c` and
   `sum_c (mean_c / std_c) * sum(kernel_c)` is taken off the bias (`fold_pixel_normalization`). The tower then
   receives, from the converted processor's output, what it received from its own processor.
2. kernel: resize `(p, p)` to `(ph, pw)` with FlexiViT's pseudo-inverse resize (`timm.layers.resample_patch_embed`,
   a no-op when the sizes agree), sum over the C2d input channels, replicate over `pd` depth slices and the `C`
   volume channels, and divide by `pd * C`; the bias is kept (zero for CLIP, whose 2-D kernel has none).
3. position table: reshape the 2-D table to its `(p_h, p_w)` grid, resample it to the volume's `(gh, gw)` grid
   (`timm.layers.resample_abs_pos_embed`, bicubic; a no-op when the grids agree) and repeat it over the `gd` depth
   positions. The depth order is therefore not in the initial positions; the first training stage learns it.
4. class token (CLIP): the class embedding and its position are copied.

What holds exactly: a volume whose depth slices (and channels) all hold one grey image, read through the converted
checkpoint's processor, gets at every depth the tokens that the stock tower gives that image read through the base's
own image processor as R = G = B, up to what percentile clipping moves (about 1 % for an image that spans its 8-bit
range) and, when the patch size changes, up to the pseudo-inverse resize. Nothing else about a 3-D volume matches a
2-D image: the first training stage teaches the tower depth.
"""

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange, repeat
from timm.layers import resample_abs_pos_embed, resample_patch_embed, trunc_normal_
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
)

from .configuration_umbrella_llava import UmbrellaLlavaConfig, _as_triple
from .image_processing_umbrella_llava import UmbrellaVolumeProcessor
from .modeling_umbrella_llava import UmbrellaLlavaForConditionalGeneration
from .processing_umbrella_llava import DEFAULT_CHAT_TEMPLATE, UmbrellaLlavaProcessor

logger = logging.getLogger(__name__)


EMBEDDER_INITS = ("inflate", "random")
CHAT_TEMPLATE_CHOICES = ("auto", "chatml", "base")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

VISION_TOWER_PREFIX = "model.vision_tower."
EMBEDDINGS_PREFIX = VISION_TOWER_PREFIX + "embeddings."
# Stock vision-tower modules that UmbrellaLlava replaces (embeddings) or leaves out (post_layernorm, SigLIP's head).
REPLACED_TOWER_PREFIXES = tuple(VISION_TOWER_PREFIX + name for name in ("embeddings.", "post_layernorm.", "head."))
# Config keys that describe the stock checkpoint rather than the model; image_seq_length is derived from the volume.
_STOCK_ONLY_CONFIG_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")


# ---------------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------------


def read_llava_config(base: str | os.PathLike) -> LlavaConfig:
    """Read the config of `base` (a Hub id or a local folder) and check that it is a stock LLaVA checkpoint.

    Only `config.json` is read, so a wrong `--base` fails before any weight is downloaded.

    Raises:
        ValueError: if the config cannot be read, or if its `model_type` is not `"llava"`.
    """
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(os.fspath(base))
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot read a config.json from --base {os.fspath(base)!r}: {error}") from error
    model_type = config_dict.get("model_type")
    if model_type == UmbrellaLlavaConfig.model_type:
        raise ValueError(
            f"--base {os.fspath(base)!r} is already an UmbrellaLlava checkpoint; fine-tune it directly with "
            "scripts/train.py --model_name_or_path instead of converting it again."
        )
    if model_type != "llava":
        raise ValueError(
            f"--base {os.fspath(base)!r} is a {model_type!r} checkpoint, not a LLaVA one: its config.json must have "
            "model_type 'llava' (as llava-hf/llava-interleave-qwen-0.5b-hf does). LLaVA-NeXT, LLaVA-OneVision and "
            "other image-text models use other towers and layouts and cannot be converted."
        )
    return LlavaConfig.from_dict(config_dict)


def umbrella_config_from_llava(
    llava_config: LlavaConfig,
    volume_size: int | Sequence[int],
    volume_patch_size: int | Sequence[int],
    volume_channels: int = 1,
    vision_feature_select_strategy: str | None = None,
    drop_unread_vision_layers: bool = True,
    volume_merge_size: int | Sequence[int] = 1,
) -> UmbrellaLlavaConfig:
    """The UmbrellaLlava config of a stock LLaVA config: the same tower, projector and LM, plus volume geometry.

    LLaVA reads the tower's hidden states at `vision_feature_layer` (llava-1.5: -2, the next-to-last layer's output),
    so the encoder layers after the last one it reads never change the output and never get a gradient, which
    stalls DDP. With `drop_unread_vision_layers`, the tower keeps only the layers it reads
    (`vision_config.num_hidden_layers`), `vision_feature_layer` is renumbered to read the same hidden states, and
    `dropped_vision_layers` records how many went; the model's output is the same.

    Args:
        llava_config: the stock config; its vision tower must be SigLIP or CLIP.
        volume_size: (H, W, D) of a preprocessed volume in voxels, or one int for a cube.
        volume_patch_size: (H, W, D) of a 3-D patch in voxels, or one int; must divide `volume_size`.
        volume_channels: channels per volume.
        vision_feature_select_strategy: overrides the stock's `"default"` / `"full"` when given.
        drop_unread_vision_layers: leave out the encoder layers past the last one `vision_feature_layer` reads.
        volume_merge_size: (H, W, D) patch tokens merged into one image token, or one int; must divide the patch
            grid. The merge averages each block, so the stock projector reads merged tokens on the scale it was
            trained on (a block of identical tokens becomes that token).

    Raises:
        ValueError: from [`UmbrellaLlavaConfig`] (patch does not divide the volume, merge does not divide the patch
            grid, unsupported tower, a strategy that would drop a patch), with the flag to change.
    """
    values = {key: value for key, value in llava_config.to_dict().items() if key not in _STOCK_ONLY_CONFIG_KEYS}
    values.pop("image_seq_length", None)
    num_layers = values["vision_config"]["num_hidden_layers"]
    feature_layers = values["vision_feature_layer"]
    feature_layers = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
    # hidden_states[k] is the output of the first k encoder layers (k = 0: the embeddings), num_layers + 1 in all.
    read = [layer % (num_layers + 1) for layer in feature_layers]
    kept = max(read) if drop_unread_vision_layers else num_layers
    renumbered = [r - (kept + 1) if layer < 0 else r for layer, r in zip(feature_layers, read)]
    values["vision_feature_layer"] = renumbered[0] if isinstance(values["vision_feature_layer"], int) else renumbered
    values["vision_config"] = {**values["vision_config"], "num_hidden_layers": kept}
    values["dropped_vision_layers"] = num_layers - kept
    if vision_feature_select_strategy is not None:
        values["vision_feature_select_strategy"] = vision_feature_select_strategy
    try:
        return UmbrellaLlavaConfig(
            **values,
            volume_size=list(_as_triple(volume_size, "volume_size")),
            volume_patch_size=list(_as_triple(volume_patch_size, "volume_patch_size")),
            volume_channels=volume_channels,
            volume_merge_size=list(_as_triple(volume_merge_size, "volume_merge_size")),
        )
    except ValueError as error:
        if "would drop a patch" in str(error):
            raise ValueError(f"{error} Pass --vision_feature_select_strategy full.") from error
        if "does not divide the patch grid" in str(error):
            raise ValueError(f"{error} (--merge_size / --volume_size / --patch_size)") from error
        if "does not divide" in str(error):
            raise ValueError(f"{error} (--volume_size / --patch_size)") from error
        raise


# ---------------------------------------------------------------------------------------------------------------------
# The 3-D embedder
# ---------------------------------------------------------------------------------------------------------------------


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    # Inflation arithmetic runs in float32 (float64 stays float64); the result is cast to the model's dtype once.
    return tensor.detach().to(torch.promote_types(tensor.dtype, torch.float32))


@dataclass(frozen=True)
class PixelNormalization:
    """What the base's image processor does to an 8-bit pixel `p` of channel `c`: `(p * scale - mean[c]) / std[c]`.

    `scale` is `rescale_factor` when the processor rescales (1/255 for every LLaVA base) and 1 otherwise; `mean` and
    `std` are 0 and 1 per channel when it does not normalise.
    """

    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_image_processor(cls, image_processor, num_channels: int) -> "PixelNormalization":
        scale = float(image_processor.rescale_factor) if getattr(image_processor, "do_rescale", False) else 1.0
        if getattr(image_processor, "do_normalize", False):
            mean, std = image_processor.image_mean, image_processor.image_std
            mean = [mean] * num_channels if isinstance(mean, (int, float)) else list(mean)
            std = [std] * num_channels if isinstance(std, (int, float)) else list(std)
        else:
            mean, std = [0.0] * num_channels, [1.0] * num_channels
        if len(mean) != num_channels or len(std) != num_channels or not all(s > 0 for s in std):
            raise ValueError(
                f"The base's image processor has image_mean {mean} and image_std {std}, which do not describe its "
                f"{num_channels}-channel tower (one mean and one positive std per channel)."
            )
        return cls(scale, tuple(float(m) for m in mean), tuple(float(s) for s in std))


def read_pixel_normalization(base: str | os.PathLike, num_channels: int) -> PixelNormalization:
    """The pixel normalisation of `base`'s image processor (`preprocessor_config.json`, class defaults filled in).

    Raises:
        ValueError: if `base` has no image processor, so what its tower was trained on is unknown.
    """
    try:
        image_processor = AutoImageProcessor.from_pretrained(os.fspath(base))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--base {os.fspath(base)!r} has no readable image processor (preprocessor_config.json), so the pixel "
            f"normalisation its vision tower was trained on is unknown: {error}"
        ) from error
    return PixelNormalization.from_image_processor(image_processor, num_channels)


def fold_pixel_normalization(
    kernel_2d: torch.Tensor, bias_2d: torch.Tensor | None, normalization: PixelNormalization
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the base's pixel normalisation into its 2-D patch kernel and bias, for inputs in [0, 1].

    Args:
        kernel_2d: `(hidden, C2d, p_h, p_w)` Conv2d weight.
        bias_2d: `(hidden,)` Conv2d bias, or `None` (CLIP).
        normalization: the base's, see [`PixelNormalization`]; a [0, 1] input `v` stands for the 8-bit pixel `255 v`.

    Returns:
        `(kernel, bias)` with `<kernel, v> + bias == <kernel_2d, (255 v * scale - mean) / std> + bias_2d` for every
        `v`, float32 (float64 for a float64 kernel).
    """
    kernel = _at_least_float32(kernel_2d)
    std = kernel.new_tensor(normalization.std)[None, :, None, None]
    mean = kernel.new_tensor(normalization.mean)[None, :, None, None]
    folded = kernel * (255 * normalization.scale / std)
    bias = _at_least_float32(bias_2d) if bias_2d is not None else kernel.new_zeros(kernel.shape[0])
    return folded, bias - (kernel * mean / std).sum(dim=(1, 2, 3))


def inflate_patch_kernel(
    kernel_2d: torch.Tensor, volume_patch_size: Sequence[int], volume_channels: int
) -> torch.Tensor:
    """Inflate a 2-D patch kernel into the weight of [`UmbrellaVolumeEmbeddings.patch_embedding`].

    Args:
        kernel_2d: `(hidden, C2d, p_h, p_w)` Conv2d weight of the tower's 2-D patch embedding.
        volume_patch_size: `(ph, pw, pd)` 3-D patch in voxels.
        volume_channels: channels `C` per volume.

    Returns:
        `(hidden, ph * pw * pd * C)` weight (float32, or float64 for a float64 kernel), flattened in the embedder's `(ph pw pd c)` order. For a patch
        whose channels all hold grey slice `s` on every depth, it gives `<kernel_2d, s fed as R = G = B>`.
    """
    patch_h, patch_w, patch_d = volume_patch_size
    kernel = _at_least_float32(kernel_2d)
    if tuple(kernel.shape[-2:]) != (patch_h, patch_w):
        # FlexiViT's pseudo-inverse resize keeps the token of a patch that is resized along with the kernel.
        kernel = resample_patch_embed(kernel, [patch_h, patch_w])
    grey = kernel.sum(dim=1)
    kernel_3d = repeat(grey, "o ph pw -> o ph pw pd c", pd=patch_d, c=volume_channels) / (patch_d * volume_channels)
    return rearrange(kernel_3d, "o ph pw pd c -> o (ph pw pd c)")


def interpolate_position_table(
    table_2d: torch.Tensor, grid_2d: Sequence[int], volume_grid: Sequence[int], num_prefix_tokens: int
) -> torch.Tensor:
    """Resample a 2-D position table to the volume's patch grid and repeat it over depth.

    Args:
        table_2d: `(num_prefix_tokens + gh2 * gw2, hidden)` position table in `(h w)` order.
        grid_2d: `(gh2, gw2)` patches of the tower's 2-D image.
        volume_grid: `(gh, gw, gd)` patches of a volume.
        num_prefix_tokens: leading rows that belong to no patch (1 for CLIP's class token, 0 for SigLIP).

    Returns:
        `(num_prefix_tokens + gh * gw * gd, hidden)` table (float32, or float64 for a float64 table) in the embedder's `(h w d)` order; the prefix
        rows are copied.
    """
    grid_h, grid_w, grid_d = volume_grid
    resampled = resample_abs_pos_embed(
        _at_least_float32(table_2d)[None], [grid_h, grid_w], list(grid_2d), num_prefix_tokens=num_prefix_tokens
    )[0]
    prefix, grid = resampled[:num_prefix_tokens], resampled[num_prefix_tokens:]
    grid = repeat(grid, "(h w) c -> (h w d) c", h=grid_h, w=grid_w, d=grid_d)
    return torch.cat([prefix, grid])


def inflate_volume_embeddings(
    embeddings_2d: dict[str, torch.Tensor],
    config: UmbrellaLlavaConfig,
    pixel_normalization: PixelNormalization | None = None,
) -> dict[str, torch.Tensor]:
    """The state of [`UmbrellaVolumeEmbeddings`] inflated from the tower's 2-D embeddings (recipe in the module doc).

    Args:
        embeddings_2d: state dict of the stock tower's `embeddings` (`patch_embedding.weight` `(hidden, C2d, p, p)`,
            optional `patch_embedding.bias`, `position_embedding.weight`, and CLIP's `class_embedding` `(hidden,)`).
        config: the UmbrellaLlava config that sets the volume geometry.
        pixel_normalization: the base's image processor's, folded into the kernel and bias so that [0, 1] volumes
            reach the tower on the scale it was trained on; `None` folds nothing (the 3-D embedder then gives the
            2-D tower's tokens for raw grey values).

    Returns:
        tensors keyed like `UmbrellaVolumeEmbeddings.state_dict()`, float32 (float64 for float64 inputs).

    Raises:
        ValueError: if the 2-D position table does not hold one row per patch of the tower's image (plus the class
            token), so the grid it belongs to is unknown.
    """
    vision = config.vision_config
    kernel = embeddings_2d["patch_embedding.weight"]
    grid_2d = (vision.image_size // vision.patch_size, vision.image_size // vision.patch_size)
    num_prefix_tokens = int(config.volume_class_token)
    table = embeddings_2d["position_embedding.weight"]
    if table.shape[0] != num_prefix_tokens + grid_2d[0] * grid_2d[1]:
        raise ValueError(
            f"The 2-D position table has {table.shape[0]} rows, but a {vision.image_size}px image in "
            f"{vision.patch_size}px patches has {grid_2d[0]}x{grid_2d[1]} patches (+{num_prefix_tokens} class token); "
            "use --embedder_init random for this tower."
        )
    bias = embeddings_2d.get("patch_embedding.bias")
    if pixel_normalization is not None:
        kernel, bias = fold_pixel_normalization(kernel, bias, pixel_normalization)
    state = {
        "patch_embedding.weight": inflate_patch_kernel(kernel, config.volume_patch_size, config.volume_channels),
        "patch_embedding.bias": _at_least_float32(bias) if bias is not None else kernel.new_zeros(kernel.shape[0]),
        "position_embedding.weight": interpolate_position_table(table, grid_2d, config.volume_grid, num_prefix_tokens),
    }
    if config.volume_class_token:
        state["class_embedding.weight"] = _at_least_float32(embeddings_2d["class_embedding"]).reshape(1, -1)
    return state


def random_volume_embeddings(config: UmbrellaLlavaConfig, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """A fresh state of [`UmbrellaVolumeEmbeddings`]: truncated-normal weights (timm's ViT init), zero bias.

    Returns:
        float32 tensors keyed like `UmbrellaVolumeEmbeddings.state_dict()`.
    """
    hidden = config.vision_config.hidden_size
    patch_voxels = config.volume_channels * config.volume_patch_size[0] * config.volume_patch_size[1]
    patch_voxels *= config.volume_patch_size[2]
    shapes = {
        "patch_embedding.weight": (hidden, patch_voxels),
        "position_embedding.weight": (config.volume_num_patches + int(config.volume_class_token), hidden),
    }
    if config.volume_class_token:
        shapes["class_embedding.weight"] = (1, hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = {name: trunc_normal_(torch.empty(shape), std=std) for name, shape in shapes.items()}
    state["patch_embedding.bias"] = torch.zeros(hidden)
    return state


# ---------------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------------


def load_stock_llava(base: str | os.PathLike, dtype: str | torch.dtype = "auto") -> LlavaForConditionalGeneration:
    """Load `base` with transformers' own LLaVA class, so that legacy key names are renamed on the way in.

    Raises:
        ValueError: if a weight of the stock model is missing from, or has another shape in, the checkpoint.
    """
    stock, info = LlavaForConditionalGeneration.from_pretrained(
        os.fspath(base), dtype=DTYPES.get(dtype, dtype), output_loading_info=True
    )
    problems = {key: info.get(key) for key in ("missing_keys", "mismatched_keys") if info.get(key)}
    if problems:
        raise ValueError(
            f"--base {os.fspath(base)!r} does not hold every weight of its LLaVA config ({problems}); converting it "
            "would leave these randomly initialised. Check that the folder is complete."
        )
    if info.get("unexpected_keys"):
        logger.warning(
            "Ignoring weights of %s that its config does not use: %s", base, sorted(info["unexpected_keys"])
        )
    return stock.eval()


def convert_llava_model(
    stock: LlavaForConditionalGeneration,
    config: UmbrellaLlavaConfig,
    embedder_init: str = "inflate",
    seed: int = 0,
    pixel_normalization: PixelNormalization | None = None,
) -> UmbrellaLlavaForConditionalGeneration:
    """Build the UmbrellaLlava model of `config` from a loaded stock LLaVA model.

    `pixel_normalization` (the base image processor's, see [`read_pixel_normalization`]) is folded into the
    inflated kernel; `None` inflates the raw kernel.

    Every stock tensor except the tower's 2-D embeddings, `post_layernorm`, SigLIP head and the encoder layers that
    `config` dropped (see [`umbrella_config_from_llava`]) is copied bit-identically (same dtype) with a strict
    `load_state_dict`; the 3-D embedder comes from `embedder_init`.

    Raises:
        ValueError: for an unknown `embedder_init`.
        RuntimeError: if the stock and UmbrellaLlava layouts disagree beyond the embedder (names both sides).
    """
    if embedder_init not in EMBEDDER_INITS:
        raise ValueError(f"embedder_init must be one of {EMBEDDER_INITS}, got {embedder_init!r}.")
    dtype = next(stock.parameters()).dtype
    model = UmbrellaLlavaForConditionalGeneration._from_config(config, dtype=dtype)

    stock_state = stock.state_dict()
    # Encoder layers past the last one `vision_feature_layer` reads, when `config` dropped them.
    unread_layers = tuple(
        f"{VISION_TOWER_PREFIX}encoder.layers.{index}."
        for index in range(config.vision_config.num_hidden_layers, stock.config.vision_config.num_hidden_layers)
    )
    left_out = REPLACED_TOWER_PREFIXES + unread_layers
    kept = {name: tensor for name, tensor in stock_state.items() if not name.startswith(left_out)}
    target = model.state_dict()
    embedder_names = {name for name in target if name.startswith(EMBEDDINGS_PREFIX)}
    missing = sorted(set(target) - set(kept) - embedder_names)
    unexpected = sorted(set(kept) - set(target))
    if missing or unexpected:
        raise RuntimeError(
            "The stock LLaVA model and UmbrellaLlava disagree beyond the 3-D embedder: "
            f"missing in the stock model {missing}, not in UmbrellaLlava {unexpected}."
        )

    if embedder_init == "inflate":
        embeddings_2d = {
            name.removeprefix(EMBEDDINGS_PREFIX): tensor
            for name, tensor in stock_state.items()
            if name.startswith(EMBEDDINGS_PREFIX)
        }
        embedder_state = inflate_volume_embeddings(embeddings_2d, config, pixel_normalization)
    else:
        embedder_state = random_volume_embeddings(config, seed=seed)
    embedder_state = {EMBEDDINGS_PREFIX + name: tensor.to(dtype) for name, tensor in embedder_state.items()}
    if set(embedder_state) != embedder_names:
        raise RuntimeError(
            f"3-D embedder keys {sorted(embedder_state)} differ from the model's {sorted(embedder_names)}."
        )

    model.load_state_dict({**kept, **embedder_state}, strict=True)
    model.generation_config = stock.generation_config
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------------------------------------


def check_image_token(tokenizer, config: UmbrellaLlavaConfig, base: str | os.PathLike) -> str:
    """Return the tokenizer's image placeholder after checking that it is one token with `config.image_token_id`.

    Raises:
        ValueError: if the placeholder is split or has another id than the config's.
    """
    image_token = getattr(tokenizer, "image_token", None) or "<image>"
    token_ids = tokenizer.encode(image_token, add_special_tokens=False)
    if token_ids != [config.image_token_id]:
        raise ValueError(
            f"The tokenizer of --base {os.fspath(base)!r} encodes the image placeholder {image_token!r} as "
            f"{token_ids}, but config.image_token_id is {config.image_token_id}. A LLaVA checkpoint's tokenizer holds "
            "it as that one token; check that the folder holds the checkpoint's own tokenizer files."
        )
    return image_token


def _has_single_tokens(tokenizer, tokens: Sequence[str]) -> bool:
    return all(len(tokenizer.encode(token, add_special_tokens=False)) == 1 for token in tokens)


def resolve_chat_template(choice: str, base: str | os.PathLike, tokenizer) -> str:
    """The chat template the converted checkpoint's processor carries.

    Args:
        choice: `"chatml"` for UmbrellaLlava's ChatML template (with the `{% generation %}` block that
            `umbrella_llava.data` needs for turn-masked labels), `"base"` for the base's own template, `"auto"` for
            ChatML when the tokenizer holds `<|im_start|>` and `<|im_end|>` as single tokens (Qwen-based LLaVA) and
            the base's otherwise, or the path of a `.jinja` file.

    Raises:
        ValueError: if the base has no chat template where one is asked for, or `choice` is none of the above.
    """
    if choice not in CHAT_TEMPLATE_CHOICES:
        path = Path(choice)
        if not path.is_file():
            raise ValueError(
                f"--chat_template must be one of {CHAT_TEMPLATE_CHOICES} or a .jinja file, got {choice!r}."
            )
        return path.read_text()
    if choice == "auto":
        choice = "chatml" if _has_single_tokens(tokenizer, ["<|im_start|>", "<|im_end|>"]) else "base"
    if choice == "chatml":
        return DEFAULT_CHAT_TEMPLATE.replace("<image>", getattr(tokenizer, "image_token", None) or "<image>")

    template = None
    try:
        template = getattr(AutoProcessor.from_pretrained(os.fspath(base)), "chat_template", None)
    except (OSError, ValueError, TypeError, ImportError) as error:
        logger.info("No processor in %s (%s); reading the tokenizer's chat template.", base, error)
    template = template or getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        raise ValueError(
            f"--base {os.fspath(base)!r} has no (single) chat template; pass --chat_template chatml or a .jinja file."
        )
    if "generation" not in template:
        logger.warning(
            "The base's chat template has no {%% generation %%} block, so umbrella_llava.data cannot build "
            "turn-masked labels with it; pass --chat_template chatml to train with scripts/train.py."
        )
    return template


def build_volume_processor(
    config: UmbrellaLlavaConfig, tokenizer, chat_template: str | None
) -> UmbrellaLlavaProcessor:
    """An UmbrellaLlavaProcessor that matches `config` (volume size, channels, tokens per volume).

    Its volumes are min-max scaled to [0, 1], the range into which the inflated embedder folds the base's pixel
    normalisation (see the module doc), whatever the package's default normalisation is.

    Importing umbrella_llava registers both processor classes for their Auto classes, so `save_pretrained` writes
    their code and `auto_map` and the folder loads with `AutoProcessor.from_pretrained(..., trust_remote_code=True)`.
    """
    image_processor = UmbrellaVolumeProcessor(
        volume_size=config.volume_size, volume_channels=config.volume_channels, normalization="minmax"
    )
    return UmbrellaLlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=config.image_seq_length,
        chat_template=chat_template,
    )


# ---------------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------------


def convert_llava_checkpoint(
    base: str | os.PathLike,
    output_dir: str | os.PathLike,
    volume_size: int | Sequence[int],
    patch_size: int | Sequence[int],
    volume_channels: int = 1,
    embedder_init: str = "inflate",
    dtype: str | torch.dtype = "auto",
    vision_feature_select_strategy: str | None = None,
    chat_template: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
    merge_size: int | Sequence[int] = 1,
) -> Path:
    """Convert the stock LLaVA checkpoint `base` into a complete trust_remote_code UmbrellaLlava folder.

    Everything that can be wrong with the arguments (not a LLaVA, geometry, tokenizer, output folder) is checked
    from the config and tokenizer before the weights are loaded.

    Args:
        base: Hub id or local folder of a `model_type="llava"` checkpoint with its tokenizer.
        output_dir: folder to write; must be empty or absent unless `overwrite`.
        volume_size, patch_size: (H, W, D) in voxels, or one int for a cube; the patch must divide the volume.
        volume_channels: channels per volume.
        embedder_init: `"inflate"` (from the 2-D embedding, see the module doc) or `"random"`.
        dtype: `"auto"` keeps the checkpoint's dtype; `"float32"`, `"bfloat16"`, `"float16"` or a torch dtype.
        vision_feature_select_strategy: overrides the stock's; SigLIP towers need `"full"`.
        chat_template: see [`resolve_chat_template`].
        seed: seed of `embedder_init="random"`.
        overwrite: allow writing into a non-empty `output_dir`.
        merge_size: `volume_merge_size`, (H, W, D) patch tokens averaged into one image token, or one int.

    Returns:
        `output_dir`, holding the model (weights, config with `auto_map` and `converted_from`, code), the processor
        and volume processor configs with their code, the tokenizer and the chat template.

    Raises:
        ValueError: naming the flag to change.
    """
    if embedder_init not in EMBEDDER_INITS:
        raise ValueError(f"--embedder_init must be one of {EMBEDDER_INITS}, got {embedder_init!r}.")
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {tuple(DTYPES)}, got {dtype!r}.")
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or (any(output_dir.iterdir()) and not overwrite)):
        raise ValueError(f"--output_dir {output_dir} exists and is not an empty folder; choose another or overwrite.")

    llava_config = read_llava_config(base)
    config = umbrella_config_from_llava(
        llava_config,
        volume_size,
        patch_size,
        volume_channels,
        vision_feature_select_strategy,
        volume_merge_size=merge_size,
    )
    if config.dropped_vision_layers:
        logger.info(
            "Leaving out the last %d vision encoder layer(s), whose output vision_feature_layer=%s never reads.",
            config.dropped_vision_layers,
            llava_config.vision_feature_layer,
        )
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(base))
    check_image_token(tokenizer, config, base)
    processor = build_volume_processor(config, tokenizer, resolve_chat_template(chat_template, base, tokenizer))

    pixel_normalization = None
    if embedder_init == "inflate":
        pixel_normalization = read_pixel_normalization(base, config.vision_config.num_channels)

    stock = load_stock_llava(base, dtype)
    model = convert_llava_model(
        stock, config, embedder_init=embedder_init, seed=seed, pixel_normalization=pixel_normalization
    )
    del stock
    # Recorded so that push_to_hub can name the base model on the model card.
    model.config.converted_from = os.fspath(base)
    model.config.volume_embedder_init = embedder_init

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


__all__ = [
    "CHAT_TEMPLATE_CHOICES",
    "DTYPES",
    "EMBEDDER_INITS",
    "PixelNormalization",
    "build_volume_processor",
    "check_image_token",
    "convert_llava_checkpoint",
    "convert_llava_model",
    "fold_pixel_normalization",
    "inflate_patch_kernel",
    "inflate_volume_embeddings",
    "interpolate_position_table",
    "load_stock_llava",
    "random_volume_embeddings",
    "read_llava_config",
    "read_pixel_normalization",
    "resolve_chat_template",
    "umbrella_config_from_llava",
]
