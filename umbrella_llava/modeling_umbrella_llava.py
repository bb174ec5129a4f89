"""PyTorch UmbrellaLlava: LLaVA whose vision tower reads 3-D volumes.

The model is LLaVA with one change in the vision tower: its 2-D patch embedding is replaced by a 3-D one
([`UmbrellaVolumeEmbeddings`]). The tower's encoder layers, the projector and the language model are LLaVA's own,
so the weights of a stock checkpoint keep their meaning. The forward pass takes a batch of volumes per sample,

    pixel_values (B, N, C, H, W, D) + image_mask (B, N) and/or num_images_per_sample (B,)

keeps the valid volumes only, encodes them, and writes each sample's volume features into that sample's image-token
blocks, in slot order. It does so through LLaVA's own hooks, as qwen2_vl threads `image_grid_thw` through them:
`get_image_features` takes the volumes with their mask or counts, `get_placeholder_mask` checks every sample's
image-token blocks against its volumes.

This file travels to the Hub as remote code: it imports only torch, transformers and einops, and siblings with
single-dot relative imports.
"""

import os
import warnings
from dataclasses import dataclass

import torch
from einops.layers.torch import Rearrange, Reduce
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration, LlavaModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector, LlavaPreTrainedModel
from transformers.utils import can_return_tuple

try:
    from transformers.utils.output_capturing import maybe_install_capturing_hooks
except ImportError:  # a transformers without it installs its recording hooks another way
    maybe_install_capturing_hooks = None

from .configuration_umbrella_llava import UmbrellaLlavaConfig


@dataclass
class UmbrellaVolumeFeaturesOutput(BaseModelOutputWithPooling):
    r"""
    The vision tower's output for a batch of volumes, with each sample's volume count beside the features.

    pooler_output (`torch.FloatTensor` of shape `(M, image_seq_length, text_hidden)`):
        The valid volumes' image-token features, in (sample, slot) order.
    num_images_per_sample (`torch.LongTensor` of shape `(B,)`):
        Volumes per sample, so that pre-encoded features (`mm_encoder_outputs`) are checked against each sample's
        image tokens as raw volumes are; `None` for flattened volumes given without counts.
    """

    num_images_per_sample: torch.LongTensor | None = None


_AUTO_MAP = {
    "AutoConfig": "configuration_umbrella_llava.UmbrellaLlavaConfig",
    "AutoModel": "modeling_umbrella_llava.UmbrellaLlavaModel",
    "AutoModelForImageTextToText": "modeling_umbrella_llava.UmbrellaLlavaForConditionalGeneration",
}


class UmbrellaVolumeEmbeddings(nn.Module):
    """3-D patch embedding that takes the place of the vision tower's 2-D `embeddings`.

    Cuts each volume into non-overlapping `volume_patch_size` patches, flattens every patch in `(ph pw pd c)` order,
    projects it to the tower's width and adds a learned position embedding per patch (and a class token first, for
    towers that have one, such as CLIP).

    Only `nn.Linear` and `nn.Embedding` hold weights, so whichever tower hosts this module initialises it with its
    own rules, and nothing is kept in non-persistent buffers (which `from_pretrained` would leave uninitialised).
    """

    def __init__(self, config: UmbrellaLlavaConfig):
        super().__init__()
        hidden_size = config.vision_config.hidden_size
        patch_h, patch_w, patch_d = config.volume_patch_size
        self.volume_shape = (config.volume_channels, *config.volume_size)
        self.patch_layout = Rearrange(
            "m c (h ph) (w pw) (d pd) -> m (h w d) (ph pw pd c)", ph=patch_h, pw=patch_w, pd=patch_d
        )
        self.patch_embedding = nn.Linear(config.volume_channels * patch_h * patch_w * patch_d, hidden_size)
        self.class_embedding = nn.Embedding(1, hidden_size) if config.volume_class_token else None
        num_positions = config.volume_num_patches + int(config.volume_class_token)
        self.position_embedding = nn.Embedding(num_positions, hidden_size)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs) -> torch.Tensor:
        """
        Args:
            pixel_values: volumes `(M, C, H, W, D)`, any float dtype (cast to the weights' dtype here).

        Returns:
            `(M, num_positions, hidden_size)` patch embeddings with positions added.
        """
        if interpolate_pos_encoding:
            raise ValueError("Volumes have a fixed size: resize them to `config.volume_size` instead.")
        if tuple(pixel_values.shape[1:]) != self.volume_shape:
            raise ValueError(
                f"Expected volumes of shape (M, C, H, W, D) = (M, {', '.join(map(str, self.volume_shape))}), got "
                f"{tuple(pixel_values.shape)}."
            )
        patches = self.patch_layout(pixel_values.to(self.patch_embedding.weight.dtype))
        embeddings = self.patch_embedding(patches)
        # The embeddings are called as modules, never read as `.weight`: an offloaded module's weights are loaded
        # by its own forward hook (accelerate), and a ZeRO-3 shard gathered by its own.
        positions = torch.arange(self.position_embedding.num_embeddings, device=embeddings.device)
        if self.class_embedding is not None:
            class_tokens = self.class_embedding(positions[:1]).expand(embeddings.shape[0], 1, -1)
            embeddings = torch.cat([class_tokens.to(embeddings.device), embeddings], dim=1)
        return embeddings + self.position_embedding(positions).to(embeddings.device)


class UmbrellaVolumeMerger(nn.Module):
    """Merges each `volume_merge_size` block of neighbouring patch tokens into one token, their average.

    The tower's patch tokens come in the embedder's `(h w d)` order over the patch grid; each `mh × mw × md` block of
    neighbours becomes one token, in `(h w d)` order over the coarser grid. A class token ahead of the patches (CLIP
    with `vision_feature_select_strategy="full"`) is not a patch of the grid: it passes through unmerged and stays
    first.

    An average has no parameters and keeps the tower's scale (a block of identical tokens becomes that token), so the
    projector of a converted checkpoint reads merged tokens on the scale it was trained on. At 2×2×2 it learnt the
    learning benchmark as fast as Qwen2-VL's merger in 3-D (concatenation + MLP), without that MLP's
    (mh·mw·md·C)² parameters (BENCHMARKS.md, "Token budget").
    """

    def __init__(self, config: UmbrellaLlavaConfig):
        super().__init__()
        _, grid_w, grid_d = config.volume_grid
        merge_h, merge_w, merge_d = config.volume_merge_size
        self.num_patches = config.volume_num_patches
        self.block_average = Reduce(
            "m (h mh w mw d md) c -> m (h w d) c",
            "mean",
            mh=merge_h, mw=merge_w, md=merge_d, w=grid_w // merge_w, d=grid_d // merge_d,
        )  # fmt: skip

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            features: `(M, prefix + num_patches, C)` selected tower features, `prefix` 1 for a kept class token, else 0.

        Returns:
            `(M, prefix + num_patches / (mh * mw * md), C)`.
        """
        prefix = features.shape[1] - self.num_patches
        if prefix not in (0, 1):
            raise ValueError(
                f"Expected {self.num_patches} patch tokens per volume (+1 class token), got {features.shape[1]}."
            )
        return torch.cat([features[:, :prefix], self.block_average(features[:, prefix:])], dim=1)


class UmbrellaMultiModalProjector(LlavaMultiModalProjector):
    """LLaVA's projector, after [`UmbrellaVolumeMerger`] when `config.volume_merge_size` merges patches.

    Its weights keep LLaVA's names (`linear_1`, `linear_2`); with `volume_merge_size=(1, 1, 1)` it is LLaVA's.
    """

    def __init__(self, config: UmbrellaLlavaConfig):
        super().__init__(config)
        self.volume_merger = UmbrellaVolumeMerger(config) if config.volume_patches_per_token > 1 else None

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """`(M, tokens, C)` selected tower features → `(M, image_seq_length, text_hidden)`."""
        if self.volume_merger is not None:
            image_features = self.volume_merger(image_features)
        return super().forward(image_features)


def flatten_volumes(
    pixel_values: torch.Tensor,
    image_mask: torch.Tensor | None = None,
    num_images_per_sample: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keep the valid volumes of a batch, in (sample, slot) order.

    Args:
        pixel_values: `(B, N, C, H, W, D)` slots per sample, or `(M, C, H, W, D)` valid volumes already flattened.
        image_mask: `(B, N)` bool, True where a slot holds a volume.
        num_images_per_sample: `(B,)` volumes per sample. With 6-D `pixel_values` and no `image_mask`, sample `b`
            uses its first `num_images_per_sample[b]` slots.

    Returns:
        `(volumes (M, C, H, W, D), num_images_per_sample (B,))`. The counts are `None` only for flattened volumes
        given with neither `image_mask` nor `num_images_per_sample`; the caller then derives them from the text.

    Raises:
        TypeError: if `pixel_values` is not one tensor.
        ValueError: if `image_mask` and `num_images_per_sample` disagree, either disagrees with `pixel_values`,
            `image_mask` is not `(B, N)`, or a count is not a whole number (each naming the sample).
    """
    if not isinstance(pixel_values, torch.Tensor):
        items = f" of {len(pixel_values)} items" if isinstance(pixel_values, (list, tuple)) else ""
        raise TypeError(
            f"pixel_values must be one tensor (B, N, C, H, W, D) or (M, C, H, W, D), got a "
            f"{type(pixel_values).__name__}{items}: batch the volumes with the processor or UmbrellaCollator, or with "
            "image_processing_umbrella_llava.stack_volumes."
        )
    counts = None
    if num_images_per_sample is not None:
        counts = torch.as_tensor(num_images_per_sample)
        if counts.is_floating_point():
            fractional = (counts != counts.round()).nonzero().flatten().tolist()
            if fractional:
                raise ValueError(
                    "num_images_per_sample must hold whole numbers of volumes; "
                    + ", ".join(f"sample {i} has {counts[i].item()}" for i in fractional)
                    + ". Pass integer counts (the collator and the processor give int64)."
                )
        counts = counts.to(torch.long)
    if image_mask is not None:
        if image_mask.dim() != 2:
            raise ValueError(
                f"image_mask must be (B, N), one row of slots per sample, got shape {tuple(image_mask.shape)}; for a "
                "single sample use image_mask[None]."
            )
        image_mask = image_mask.to(device=pixel_values.device, dtype=torch.bool)
        mask_counts = image_mask.sum(dim=1).cpu()
        if counts is not None and not torch.equal(counts.cpu(), mask_counts):
            raise ValueError(
                f"image_mask and num_images_per_sample disagree: the mask holds {mask_counts.tolist()} volumes per "
                f"sample, num_images_per_sample says {counts.tolist()}."
            )
        counts = mask_counts

    if pixel_values.dim() == 6:
        batch_size, slots = pixel_values.shape[:2]
        if image_mask is None:
            if counts is None:
                counts = torch.full((batch_size,), slots, dtype=torch.long)
            if counts.shape != (batch_size,) or (counts.cpu() > slots).any() or (counts < 0).any():
                raise ValueError(
                    f"num_images_per_sample {counts.tolist()} does not fit pixel_values with {batch_size} samples "
                    f"of {slots} slots."
                )
            image_mask = torch.arange(slots, device=pixel_values.device) < counts.to(pixel_values.device)[:, None]
        elif image_mask.shape != (batch_size, slots):
            raise ValueError(
                f"image_mask has shape {tuple(image_mask.shape)}, pixel_values has {batch_size} samples of {slots} "
                "slots."
            )
        if slots > 0 and bool(image_mask.all()):
            return pixel_values.flatten(0, 1), counts.cpu()
        return pixel_values[image_mask], counts.cpu()

    if pixel_values.dim() != 5:
        raise ValueError(
            f"pixel_values must be (B, N, C, H, W, D) or (M, C, H, W, D) volumes, got shape {tuple(pixel_values.shape)}."
        )
    if counts is not None and int(counts.sum()) != pixel_values.shape[0]:
        raise ValueError(
            f"pixel_values holds {pixel_values.shape[0]} volumes, but the batch declares {counts.tolist()} volumes "
            f"per sample ({int(counts.sum())} in total)."
        )
    return pixel_values, None if counts is None else counts.cpu()


def check_image_tokens_per_sample(
    special_image_mask: torch.Tensor, num_images_per_sample: torch.Tensor, image_seq_length: int
) -> None:
    """Check that each sample holds `image_seq_length` image tokens per volume, in whole blocks.

    The model's forward checks this on every eager step ([`UmbrellaLlavaModel.get_placeholder_mask`]);
    [`UmbrellaCollator`] checks it on the host for every batch it builds, so that a compiled step, whose checks are
    device asserts, still gets the sample named.

    Args:
        special_image_mask: `(B, L)` bool, True at image tokens.
        num_images_per_sample: `(B,)` volumes per sample.

    Raises:
        ValueError: naming every sample whose image-token count is not its volumes × `image_seq_length`, even when
            the batch totals agree, and every sample whose blocks are split by text.
    """
    tokens_per_sample = special_image_mask.sum(dim=1).cpu()
    expected = torch.as_tensor(num_images_per_sample).cpu() * image_seq_length
    mismatched = (tokens_per_sample != expected).nonzero().flatten().tolist()
    if mismatched:
        details = "; ".join(
            f"sample {i}: {int(tokens_per_sample[i])} image tokens, {int(expected[i]) // image_seq_length} volumes "
            f"× {image_seq_length} = {int(expected[i])} expected"
            for i in mismatched
        )
        raise ValueError(f"Image tokens and volumes do not match per sample ({details}).")
    check_image_token_blocks(special_image_mask, image_seq_length)


def split_image_token_blocks(special_image_mask: torch.Tensor, image_seq_length: int) -> torch.Tensor:
    """`(B, L)` bool, True at each image token that does not open its block yet follows text (see
    [`check_image_token_blocks`]). Tensor ops only, so a compiled forward can assert on it."""
    rank_in_sample = special_image_mask.cumsum(dim=1) - 1
    after_image_token = nn.functional.pad(special_image_mask[:, :-1], (1, 0), value=False)
    return special_image_mask & ~after_image_token & (rank_in_sample % image_seq_length != 0)


def check_image_token_blocks(special_image_mask: torch.Tensor, image_seq_length: int) -> None:
    """Check that every volume's image-token block is contiguous.

    The `k`-th image token of a sample belongs to block `k // image_seq_length`; unless it opens its block, the token
    just before it must be an image token too. So each run of image tokens is a whole number of blocks (the blocks of
    adjacent placeholders touch), and no block is split by text. Counts are checked before this.

    Args:
        special_image_mask: `(B, L)` bool, True at image tokens.

    Raises:
        ValueError: naming each sample with a split block, and where the split is.
    """
    split = split_image_token_blocks(special_image_mask, image_seq_length)
    if not bool(split.any()):
        return
    rank_in_sample = special_image_mask.cumsum(dim=1) - 1
    details = "; ".join(
        f"sample {b}: token {int(rank_in_sample[b, p]) % image_seq_length} of volume "
        f"{int(rank_in_sample[b, p]) // image_seq_length}'s block follows text (position {p})"
        for b, p in (split.nonzero()[:, :2].tolist())
    )
    raise ValueError(
        f"Image-token blocks are split by text ({details}). Each volume's {image_seq_length} image tokens must be "
        "contiguous: put one image placeholder per volume in the text and let the processor expand it."
    )


def check_volume_dtype(pixel_values: torch.Tensor) -> None:
    """Refuse integer or boolean `pixel_values`: raw voxel values (uint8 0..255, int16 scanner units) that were never
    normalised would otherwise be cast to float and trained on silently, on a scale the embedder never saw.

    Raises:
        TypeError: giving the dtype and the value range, and how to preprocess.
    """
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.is_floating_point():
        return  # a list is refused by `flatten_volumes`, with how to batch it
    low, high = (int(pixel_values.min()), int(pixel_values.max())) if pixel_values.numel() else (0, 0)
    raise TypeError(
        f"pixel_values has dtype {pixel_values.dtype} (values {low}..{high}): raw voxels, not preprocessed volumes. "
        "The model reads float volumes normalised as its processor does: pass the scans through "
        "UmbrellaVolumeProcessor (processor(images=...) or UmbrellaCollator), or normalise them yourself and pass a "
        "float tensor."
    )


def _volume_places(
    bad: torch.Tensor, total: int, num_images_per_sample: torch.Tensor | None, image_mask: torch.Tensor | None
) -> str:
    """Name the volumes at ranks `bad` of the flattened valid volumes by sample and slot (see `check_volume_values`)."""
    if image_mask is None and num_images_per_sample is None:
        return ", ".join(f"volume {m} of {total}" for m in bad.tolist())
    if image_mask is not None:
        where = image_mask.nonzero().cpu()[bad].tolist()
    else:
        counts = torch.as_tensor(num_images_per_sample).cpu()
        sample = torch.repeat_interleave(torch.arange(len(counts)), counts)[bad]
        slot = bad - (torch.cumsum(counts, 0) - counts)[sample]
        where = torch.stack([sample, slot], dim=1).tolist()
    return ", ".join(f"sample {b} slot {n}" for b, n in where)


def check_volume_values(
    volumes: torch.Tensor, num_images_per_sample: torch.Tensor | None, image_mask: torch.Tensor | None = None
) -> None:
    """Refuse NaN or Inf voxels in the valid volumes, which would make the loss NaN without naming a sample; warn
    about valid volumes that hold only zeros.

    An all-zero volume in a slot that `image_mask` (or the counts) marks as valid is a padding slot marked valid, or
    a volume that was never filled; the model would train on it without a word. It is a warning, not an error,
    because `UmbrellaVolumeProcessor(allow_blank_volumes=True)` turns blank scans into zeros on purpose.

    Args:
        volumes: `(M, C, H, W, D)` valid volumes in (sample, slot) order, as [`flatten_volumes`] returns them.
        num_images_per_sample: `(B,)` volumes per sample; `None` for flattened volumes whose owners are not known
            yet, which are then named by their rank in `volumes`.
        image_mask: `(B, N)` slots of 6-D `pixel_values`, to name the slot; without it, the slot is the volume's rank
            among its sample's volumes.

    Raises:
        ValueError: naming the sample and slot of every volume that holds a NaN or Inf.

    Warns:
        UserWarning: naming the sample and slot of every valid volume that is all zeros.
    """
    flat = volumes.flatten(1)
    finite = torch.isfinite(flat).all(dim=1)
    if not bool(finite.all()):
        listed = _volume_places((~finite).nonzero().flatten().cpu(), len(volumes), num_images_per_sample, image_mask)
        raise ValueError(
            f"pixel_values holds NaN or Inf voxels in {listed}. Check those volumes' files (the volume processor "
            "refuses non-finite and blank volumes unless allowed) or the transform that produced them."
        )
    empty = ~flat.any(dim=1)
    if bool(empty.any()):
        listed = _volume_places(empty.nonzero().flatten().cpu(), len(volumes), num_images_per_sample, image_mask)
        warnings.warn(
            f"pixel_values holds only zeros in {listed}, which image_mask (or num_images_per_sample) marks as "
            "volumes: a padding slot marked valid, or a volume never filled, trains on nothing. Expected only for "
            "blank scans kept with UmbrellaVolumeProcessor(allow_blank_volumes=True).",
            stacklevel=3,
        )


_COMPILED_HINT = (
    " (compiled forward: run the batch once without torch.compile, or `umbrella-check-data` on its records, to have "
    "the sample named)"
)


def compiled_slot_mask(
    pixel_values: torch.Tensor, image_mask: torch.Tensor | None, num_images_per_sample: torch.Tensor | None
) -> torch.Tensor:
    """`(B, N)` bool, True where a slot of 6-D `pixel_values` holds a volume: what [`flatten_volumes`] reads, for the
    compiled forward. Shapes are checked at trace time; what depends on values (counts within the slots, the mask
    agreeing with the counts) is asserted on the device, with no host sync and no graph break."""
    batch_size, slots = pixel_values.shape[:2]
    device = pixel_values.device
    from_counts = None
    if num_images_per_sample is not None:
        counts = torch.as_tensor(num_images_per_sample, device=device)
        if counts.shape != (batch_size,):
            raise ValueError(f"num_images_per_sample has shape {tuple(counts.shape)} for {batch_size} samples.")
        if counts.is_floating_point():
            torch._assert_async((counts == counts.round()).all(), "num_images_per_sample holds a fractional count")
        torch._assert_async(
            ((counts >= 0) & (counts <= slots)).all(),
            f"num_images_per_sample does not fit {slots} slots" + _COMPILED_HINT,
        )
        from_counts = torch.arange(slots, device=device) < counts[:, None]
    if image_mask is None:
        return torch.ones(batch_size, slots, dtype=torch.bool, device=device) if from_counts is None else from_counts
    if image_mask.shape != (batch_size, slots):
        raise ValueError(
            f"image_mask has shape {tuple(image_mask.shape)}, pixel_values has {batch_size} samples of {slots} slots."
        )
    image_mask = image_mask.to(device=device, dtype=torch.bool)
    if from_counts is not None:
        torch._assert_async(
            (image_mask.sum(dim=1) == from_counts.sum(dim=1)).all(),
            "image_mask and num_images_per_sample disagree" + _COMPILED_HINT,
        )
    return image_mask


def assert_image_tokens_match(
    special_image_mask: torch.Tensor, image_seq_length: int, counts: torch.Tensor | None, num_volumes: int
) -> None:
    """The compiled forward's form of [`UmbrellaLlavaModel.get_placeholder_mask`]'s checks: every sample's image
    tokens are its volumes × `image_seq_length` (or, for flattened volumes without counts, the batch's are), and no
    block is split by text. Asserted on the device: a mismatched batch stops the run instead of training."""
    tokens_per_sample = special_image_mask.sum(dim=1)
    if counts is None:
        matched = tokens_per_sample.sum() == num_volumes * image_seq_length
    else:
        matched = (tokens_per_sample == counts.to(tokens_per_sample.device) * image_seq_length).all()
    torch._assert_async(matched, "Image tokens and volumes do not match per sample" + _COMPILED_HINT)
    split = split_image_token_blocks(special_image_mask, image_seq_length)
    torch._assert_async(~split.any(), "Image-token blocks are split by text" + _COMPILED_HINT)


def splice_slot_features(
    inputs_embeds: torch.Tensor, special_image_mask: torch.Tensor, features: torch.Tensor, slot_mask: torch.Tensor
) -> torch.Tensor:
    """Write each sample's volume features into its image tokens with static shapes (the compiled forward's
    `masked_scatter` over valid volumes): the `k`-th image token of sample `b` takes token `k` of the features of
    `b`'s valid slots, in slot order, laid end to end.

    Args:
        inputs_embeds: `(B, L, hidden)`.
        special_image_mask: `(B, L)` bool, True at image tokens.
        features: `(B, N, image_seq_length, hidden)`, every slot's features (padded slots' are never read).
        slot_mask: `(B, N)` bool, True at valid slots.
    """
    batch_size, slots, seq_length, hidden = features.shape
    # A stable sort brings each sample's valid slots first, in slot order.
    valid_first = torch.sort((~slot_mask).to(torch.uint8), dim=1, stable=True).indices
    features = features.gather(1, valid_first[:, :, None, None].expand(-1, -1, seq_length, hidden)).flatten(1, 2)
    rank = (special_image_mask.cumsum(dim=1) - 1).clamp(0, slots * seq_length - 1)
    gathered = features.gather(1, rank[:, :, None].expand(-1, -1, hidden))
    return torch.where(special_image_mask[:, :, None], gathered.to(inputs_embeds.dtype), inputs_embeds)


def _cached_prompt_length(input_ids: torch.LongTensor, generate_kwargs: dict) -> int:
    """How many leading positions of `input_ids (B, L)` a cache given to `generate()` already holds: 0 without one,
    or when `input_ids` holds only the new tokens (shorter than the attention mask), as generate() itself reads it.
    The cache is `cache` from transformers 5.2x on, `past_key_values` before."""
    cache = generate_kwargs.get("cache", generate_kwargs.get("past_key_values"))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    attention_mask = generate_kwargs.get("attention_mask")
    if attention_mask is not None and attention_mask.shape[-1] != input_ids.shape[1]:
        return 0
    return min(int(cache.get_seq_length()), input_ids.shape[1])


def _eager_only(hook):
    """A forward hook that does nothing while torch.compile traces (see `enable_input_require_grads`)."""

    def eager_hook(module, args, output):
        if not torch.compiler.is_compiling():
            return hook(module, args, output)

    return eager_hook


def init_volume_embeddings(module: UmbrellaVolumeEmbeddings, vision_config) -> None:
    """Initialise the 3-D embedder by the rules its host tower applies to its own 2-D embedding.

    SigLIP: LeCun-normal patch kernel, zero bias, positions N(0, 1/width). CLIP: patch kernel and positions
    N(0, initializer_range * initializer_factor), class token N(0, width^-0.5 * initializer_factor). Parameters that
    were loaded from a checkpoint are left alone (`transformers.initialization` skips them).
    """
    width = vision_config.hidden_size
    if vision_config.model_type == "clip_vision_model":
        factor = vision_config.initializer_factor
        init.normal_(module.patch_embedding.weight, std=vision_config.initializer_range * factor)
        init.normal_(module.position_embedding.weight, std=vision_config.initializer_range * factor)
        init.normal_(module.class_embedding.weight, std=width**-0.5 * factor)
    else:
        init.lecun_normal_(module.patch_embedding.weight)
        init.normal_(module.position_embedding.weight, std=width**-0.5)
    init.zeros_(module.patch_embedding.bias)


def damaged_weight_files(folder: str | os.PathLike, read_tensors: bool = False) -> dict[str, str]:
    """The `*.safetensors` files of `folder` that do not deserialize, each with what is wrong.

    Opening a file reads its header and checks that the tensors it lists cover the file exactly, which catches a
    truncated or padded file at no cost. With `read_tensors`, every tensor is also read (as a push does before upload).
    The one definition: `checkpoints.py` (resume, training, push) uses it too.

    Returns:
        `{file name: reason}`; empty when every weights file is whole.
    """
    from transformers.modeling_utils import safe_open  # safetensors, through transformers (remote-code rule)

    damaged = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        try:
            with safe_open(os.path.join(folder, name), framework="pt") as weights:
                if read_tensors:
                    for key in weights.keys():
                        weights.get_tensor(key)
        except Exception as error:  # whatever stops deserialisation is what we report
            damaged[name] = f"does not deserialize (truncated or damaged?): {error}"
    return damaged


class UmbrellaLlavaPreTrainedModel(LlavaPreTrainedModel):
    config_class = UmbrellaLlavaConfig
    config: UmbrellaLlavaConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:
            # safetensors reports a truncated or damaged file without its name; say which file it is.
            if type(error).__name__ != "SafetensorError" or not os.path.isdir(pretrained_model_name_or_path):
                raise
            damaged = damaged_weight_files(pretrained_model_name_or_path)
            named = "; ".join(f"{os.path.join(pretrained_model_name_or_path, n)} {r}" for n, r in damaged.items())
            raise OSError(
                f"Cannot load {pretrained_model_name_or_path}: {named or 'a weights file does not deserialize'} "
                f"({error}). Save or download the checkpoint again."
            ) from error

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers treats a model defined outside its package as custom code and then skips, while initialising
        # missing weights, every module whose own (direct) parameters are all loaded; CLIP and SigLIP set their
        # attention and MLP weights from those parent modules, so a missing tower layer would come back N(0, 0.02).
        # That safety net is for `_init_weights` that write in place; ours and the towers' only use
        # `transformers.initialization`, which leaves loaded parameters alone, so the library's own path is safe.
        return False

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LlavaMultiModalProjector):
            # Unit gain (LeCun normal) instead of LLaVA's N(0, 0.02): two such layers shrink the volume features, and
            # the gradient that flows back into the vision path, about 50-fold, so a vision path trained from scratch
            # barely moves for its first hundreds of steps (BENCHMARKS.md, "Learning speed"). A converted or trained
            # checkpoint loads its projector, which this leaves alone.
            for linear in (module.linear_1, module.linear_2):
                init.normal_(linear.weight, std=linear.in_features**-0.5)
                init.zeros_(linear.bias)

    @torch.no_grad()
    def initialize_weights(self):
        super().initialize_weights()
        # The tower's subtree is initialised by the tower's own `_init_weights`, which knows its 2-D embedding but
        # not the 3-D one that replaced it.
        for module in self.modules():
            if isinstance(module, UmbrellaVolumeEmbeddings):
                init_volume_embeddings(module, self.config.vision_config)

    def post_init(self):
        super().post_init()
        # The tower lists its 2-D embedding among the modules not to split; FSDP auto-wrap fails on names that are
        # absent from the model, so keep only the classes that are really here.
        present = {type(module).__name__ for module in self.modules()}
        self._no_split_modules = {name for name in self._no_split_modules if name in present}

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Name every entry point in `auto_map`, not only this class's, so that a shared checkpoint loads through
        # AutoConfig, AutoModel and AutoModelForImageTextToText alike; and the volume pipeline in `custom_pipelines`,
        # for pipeline("image-text-to-text", model=folder, trust_remote_code=True). This import also saves its file.
        from .pipeline_umbrella_llava import CUSTOM_PIPELINES

        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **_AUTO_MAP}
        self.config.custom_pipelines = {**(getattr(self.config, "custom_pipelines", None) or {}), **CUSTOM_PIPELINES}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def enable_input_require_grads(self):
        """[`PreTrainedModel.enable_input_require_grads`] (what the Trainer calls under activation checkpointing, and
        PEFT on a frozen model), with a hook that a compiled forward skips: dynamo cannot set `requires_grad` on an
        intermediate tensor (a graph break per call), and what it compiles, non-reentrant checkpointing, carries
        gradients to frozen embeddings' consumers without it. Eagerly the hook is transformers' own."""
        super().enable_input_require_grads()
        for handle in getattr(self, "_require_grads_hooks", None) or [self._require_grads_hook]:
            hooks = handle.hooks_dict_ref()
            if hooks is not None and handle.id in hooks:
                hooks[handle.id] = _eager_only(hooks[handle.id])


class UmbrellaLlavaModel(UmbrellaLlavaPreTrainedModel, LlavaModel):
    """[`LlavaModel`] whose vision tower embeds 3-D volumes; without a language-modelling head.

    The volumes travel through LLaVA's own hooks, with their slot mask or counts beside them (as qwen2_vl threads
    `image_grid_thw`): [`get_image_features`] keeps and encodes the valid volumes, [`get_placeholder_mask`] checks
    each sample's image-token blocks against its volumes.
    """

    _auto_class = "AutoModel"

    def __init__(self, config: UmbrellaLlavaConfig):
        # LlavaModel.__init__ is skipped on purpose: it would build (and then waste) a 2-D embedding.
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.vision_tower.embeddings = UmbrellaVolumeEmbeddings(config)
        # LLaVA reads the encoder's hidden states; the tower's final norm feeds only its (unused) pooled output, and
        # a parameter without a gradient stalls DDP and ZeRO-3.
        self.vision_tower.post_layernorm = nn.Identity()
        self.multi_modal_projector = UmbrellaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()
        if maybe_install_capturing_hooks is not None:
            # LLaVA reads the tower's hidden states, which transformers records with hooks it installs at the first
            # call, under a thread lock torch.compile cannot trace: the first compiled step would break its graph
            # there. Installed now, the training forward compiles in one graph from the first step.
            maybe_install_capturing_hooks(self.vision_tower)

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None,
        image_mask: torch.Tensor | None = None,
        num_images_per_sample: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> UmbrellaVolumeFeaturesOutput | None:
        """Encode the valid volumes of a batch and project them to the language model's width.

        This is the hook `generate()` calls to pre-encode the volumes once, before the prefill (transformers 5.2x
        passes the result to the forward as `mm_encoder_outputs`, which `prefill_chunk_size` needs).

        Args:
            pixel_values: `(B, N, C, H, W, D)` slots with `image_mask` and/or `num_images_per_sample` (all slots when
                neither is given), or `(M, C, H, W, D)` valid volumes already flattened.
            image_mask, num_images_per_sample: as in [`flatten_volumes`]; padded slots are never encoded.
            vision_feature_layer, vision_feature_select_strategy: as in [`LlavaModel.get_image_features`]; the
                config's when `None`.

        Returns:
            [`UmbrellaVolumeFeaturesOutput`]: the vision tower's output, whose `pooler_output` holds the valid volumes'
            image-token features `(M, image_seq_length, text_hidden)` in (sample, slot) order, with the volumes per
            sample beside them; its `to_tuple()` with `return_dict=False`; `None` when `pixel_values` is `None`.

        Raises:
            ValueError: as [`flatten_volumes`], or naming each volume that holds NaN or Inf voxels.
        """
        if pixel_values is None:
            # generate() pre-encodes whenever the call names pixel_values, also as None for a text-only prompt.
            return None
        check_volume_dtype(pixel_values)
        volumes, counts = flatten_volumes(pixel_values, image_mask, num_images_per_sample)
        check_volume_values(volumes, counts, image_mask if pixel_values.dim() == 6 else None)
        return_dict = kwargs.pop("return_dict", None)  # generate() asks for a dict; False gives a tuple, as LLaVA's
        image_outputs = self._encode_volumes(volumes, vision_feature_layer, vision_feature_select_strategy, **kwargs)
        output = UmbrellaVolumeFeaturesOutput(**image_outputs, num_images_per_sample=counts)
        return output.to_tuple() if return_dict is False else output

    def _encode_volumes(
        self,
        volumes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """`(M, C, H, W, D)` valid volumes through the tower and projector, unchecked (the callers check)."""
        image_outputs = super().get_image_features(
            pixel_values=volumes,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            return_dict=True,
            **kwargs,
        )
        # LLaVA lists one (tokens, hidden) tensor per image, as its images may differ in size; volumes never do.
        image_outputs.pooler_output = torch.stack(list(image_outputs.pooler_output))
        return image_outputs

    def _image_token_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """`(B, L)` bool, True at image tokens, read from the ids or, without them, from the embeddings."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(-1)

    def get_placeholder_mask(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        image_features: torch.Tensor | None,
        num_images_per_sample: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Find the image-token positions and check them sample by sample.

        Args:
            input_ids: `(B, L)`; when `None`, image tokens are found in `inputs_embeds` `(B, L, text_hidden)`.
            image_features: `(M, image_seq_length, text_hidden)` features of the valid volumes (their shape is read),
                or `None` for a batch without volumes, which must then hold no image token.
            num_images_per_sample: `(B,)` volumes per sample; `None` to take them from the text.

        Returns:
            `(B, L, 1)` bool mask of image-token positions.

        Raises:
            ValueError: naming every sample whose image-token count is not its volumes × `image_seq_length`, even
                when the batch totals agree, and every sample whose blocks are split by text; or if a volume's
                features are not `image_seq_length` long.
        """
        special_image_mask = self._image_token_mask(input_ids, inputs_embeds)
        seq_length = self.config.image_seq_length
        tokens_per_sample = special_image_mask.sum(dim=1).cpu()
        if image_features is None:
            num_volumes, num_images_per_sample = 0, torch.zeros(len(tokens_per_sample), dtype=torch.long)
        else:
            num_volumes = image_features.shape[0]
            if image_features.shape[1] != seq_length:
                # masked_scatter would silently fill the blocks with part of the features, or a mix of volumes.
                raise ValueError(
                    f"The vision path gives {image_features.shape[1]} features per volume, but config.image_seq_length "
                    f"is {seq_length}. Build the config with the volume geometry and volume_merge_size rather than "
                    "setting image_seq_length by hand."
                )
        if num_images_per_sample is None:
            # Flattened volumes without counts: the text alone says which sample owns which volume.
            num_images_per_sample = tokens_per_sample // seq_length
            if int(num_images_per_sample.sum()) != num_volumes:
                raise ValueError(
                    f"The text holds {int(tokens_per_sample.sum())} image tokens ({seq_length} per volume), but "
                    f"pixel_values holds {num_volumes} volumes."
                )
        if len(num_images_per_sample) != len(tokens_per_sample):
            raise ValueError(
                f"num_images_per_sample has {len(num_images_per_sample)} entries for a batch of "
                f"{len(tokens_per_sample)} samples."
            )
        check_image_tokens_per_sample(special_image_mask, num_images_per_sample, seq_length)
        return special_image_mask.unsqueeze(-1)

    def _write_pre_encoded_features(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, pre_encoded: BaseModelOutputWithPooling
    ) -> torch.Tensor:
        """Write pre-encoded volume features into the image tokens of `inputs_embeds` (see `mm_encoder_outputs`)."""
        features = pre_encoded.pooler_output
        if isinstance(features, (list, tuple)):
            features = torch.cat([feature.reshape(-1, feature.shape[-1]) for feature in features])
        features = features.to(inputs_embeds.device, inputs_embeds.dtype)
        counts = getattr(pre_encoded, "num_images_per_sample", None)
        if counts is not None:
            if features.dim() == 2:
                features = features.reshape(-1, self.config.image_seq_length, features.shape[-1])
            placeholder_mask = self.get_placeholder_mask(input_ids, inputs_embeds, features, counts)
        else:
            placeholder_mask = self._image_token_mask(input_ids, inputs_embeds).unsqueeze(-1)
            rows = features.numel() // features.shape[-1]
            tokens = int(placeholder_mask.sum())
            if tokens != rows:
                raise ValueError(
                    f"The text holds {tokens} image tokens, but mm_encoder_outputs['image'] holds {rows} feature rows "
                    "(pre-encoded features without num_images_per_sample fill the image tokens one row each)."
                )
        return inputs_embeds.masked_scatter(placeholder_mask.to(inputs_embeds.device), features)

    def _splice_volumes(
        self, input_ids, inputs_embeds, pixel_values, image_mask, num_images_per_sample, feature_options
    ) -> tuple[torch.Tensor, BaseModelOutputWithPooling | None]:
        """Eager volume path: keep the valid volumes, encode them, check each sample's image tokens against them
        (naming the samples), and write their features into the image tokens. `(inputs_embeds, None)` when the batch
        holds no valid volume."""
        volumes, counts = flatten_volumes(pixel_values, image_mask, num_images_per_sample)
        if volumes.shape[0] == 0:
            return inputs_embeds, None
        image_outputs = self._encode_volumes(volumes, **feature_options)
        image_features = image_outputs.pooler_output.to(inputs_embeds.device, inputs_embeds.dtype)
        placeholder_mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features, counts)
        if counts is None:  # flattened volumes owned by the text's blocks, which the check above matched
            counts = placeholder_mask.sum(dim=(1, 2)).cpu() // self.config.image_seq_length
        check_volume_values(volumes, counts, image_mask if pixel_values.dim() == 6 else None)
        inputs_embeds = inputs_embeds.masked_scatter(placeholder_mask.to(inputs_embeds.device), image_features)
        return inputs_embeds, image_outputs

    def _splice_volumes_compiled(
        self, input_ids, inputs_embeds, pixel_values, image_mask, num_images_per_sample, feature_options
    ) -> tuple[torch.Tensor, BaseModelOutputWithPooling]:
        """The volume path under `torch.compile`: static shapes, no host sync, so the training forward compiles in
        one graph.

        Every slot of 6-D `pixel_values` is encoded (padded ones as zeros, their features never read), since keeping
        only the valid ones would give a shape that depends on the mask's values; flattened volumes are all valid
        anyway. The eager path's per-sample checks become device asserts (`torch._assert_async`): a mismatched or
        non-finite batch stops the run instead of training, and running it once uncompiled names the sample. The
        all-zero-volume warning is eager only. The image outputs hold every slot's features, in (sample, slot) order.
        """
        special_image_mask = self._image_token_mask(input_ids, inputs_embeds)
        seq_length = self.config.image_seq_length
        if pixel_values.dim() == 6:
            slot_mask = compiled_slot_mask(pixel_values, image_mask, num_images_per_sample)
            volumes = torch.where(slot_mask[:, :, None, None, None, None], pixel_values, 0.0).flatten(0, 1)
            counts = slot_mask.sum(dim=1)
        elif pixel_values.dim() == 5:
            volumes, counts = pixel_values, num_images_per_sample
            if counts is not None:
                counts = torch.as_tensor(counts, device=volumes.device)
                torch._assert_async(
                    counts.sum() == volumes.shape[0], "num_images_per_sample does not add up to the volumes given"
                )
        else:
            flatten_volumes(pixel_values)  # refuses the shape, as eagerly
        torch._assert_async(
            torch.isfinite(volumes).all(), "pixel_values holds NaN or Inf voxels in a valid volume" + _COMPILED_HINT
        )
        assert_image_tokens_match(special_image_mask, seq_length, counts, volumes.shape[0])
        image_outputs = self._encode_volumes(volumes, **feature_options)
        features = image_outputs.pooler_output
        if pixel_values.dim() == 6:
            features = features.unflatten(0, pixel_values.shape[:2])
            return splice_slot_features(inputs_embeds, special_image_mask, features, slot_mask), image_outputs
        placeholder_mask = special_image_mask[:, :, None].to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(placeholder_mask, features.to(inputs_embeds.dtype)), image_outputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        num_images_per_sample: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs,
    ):
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`):
                Text with `config.image_seq_length` image tokens per volume, in the order of the sample's slots.
            pixel_values (`torch.Tensor` of shape `(B, N, C, H, W, D)` or `(M, C, H, W, D)`):
                Volumes per sample (padded slots allowed), or the valid volumes already flattened in sample order.
            attention_mask (`torch.Tensor` of shape `(B, L)`):
                1 for tokens to attend to, 0 for padding.
            image_mask (`torch.BoolTensor` of shape `(B, N)`):
                True where a slot holds a volume. Padded slots are never encoded.
            num_images_per_sample (`torch.LongTensor` of shape `(B,)`):
                Volumes per sample; with 6-D `pixel_values` and no `image_mask`, the first slots are taken.
            vision_feature_layer, vision_feature_select_strategy:
                As in [`LlavaModel.forward`]; the config's when `None`.
            mm_encoder_outputs (`dict`):
                Volumes encoded beforehand, under `"image"`, in place of `pixel_values` (what `generate()` passes). With
                `num_images_per_sample` (as [`get_image_features`] returns them) they are checked per sample like
                raw volumes; without it (one chunk of a chunked prefill) they are feature rows that fill the text's
                image tokens one each, in (sample, position) order, and only their number is checked.
            **kwargs:
                Passed on to [`LlavaModel.forward`] (cache, position ids, attention options, ...).

        Without volumes, image tokens in the text are refused, except when a cache is given: the forward then
        continues a generation, whose prompt was checked when it filled the cache, and a generated token may be any.
        That test is on the arguments, not on tensor values, so a compiled decoding step has no branch on them.

        Returns:
            [`LlavaModelOutputWithPast`], whose image outputs hold the valid volumes' features
            `(M, image_seq_length, text_hidden)`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        name, text = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
        if text.shape[0] == 0:
            raise ValueError(
                f"The batch is empty: {name} has shape {tuple(text.shape)}, 0 samples. Pass at least one sample (an "
                "empty batch usually means an empty data set, or a filter that removed every record)."
            )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        feature_options = {
            "vision_feature_layer": vision_feature_layer,
            "vision_feature_select_strategy": vision_feature_select_strategy,
        }

        pre_encoded = (mm_encoder_outputs or {}).get("image")
        if pre_encoded is not None and pixel_values is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        image_outputs = None
        if pixel_values is not None:
            check_volume_dtype(pixel_values)
            if torch.compiler.is_compiling() and isinstance(pixel_values, torch.Tensor) and pixel_values.numel() > 0:
                inputs_embeds, image_outputs = self._splice_volumes_compiled(
                    input_ids, inputs_embeds, pixel_values, image_mask, num_images_per_sample, feature_options
                )
            else:
                inputs_embeds, image_outputs = self._splice_volumes(
                    input_ids, inputs_embeds, pixel_values, image_mask, num_images_per_sample, feature_options
                )
        elif pre_encoded is not None:
            image_outputs = pre_encoded
            inputs_embeds = self._write_pre_encoded_features(input_ids, inputs_embeds, pre_encoded)
        if image_outputs is None:
            if self.training and torch.is_grad_enabled():
                # A text-only batch still runs one blank volume through the vision path, so that every rank of a
                # DDP / ZeRO-3 run touches the same parameters in every step.
                blank = torch.zeros(
                    (1, self.config.volume_channels, *self.config.volume_size), device=inputs_embeds.device
                )
                blank_features = self._encode_volumes(blank, **feature_options).pooler_output
                inputs_embeds = inputs_embeds + 0.0 * blank_features.sum().to(inputs_embeds.dtype)
            if input_ids is not None and kwargs.get("cache", kwargs.get("past_key_values")) is None:
                # Image tokens without volumes would train on the token's embedding instead of a scan: refuse.
                if torch.compiler.is_compiling():
                    special_image_mask = self._image_token_mask(input_ids, inputs_embeds)
                    assert_image_tokens_match(special_image_mask, self.config.image_seq_length, None, 0)
                else:
                    self.get_placeholder_mask(input_ids, inputs_embeds, None)

        outputs = super().forward(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=True, **kwargs
        )
        if image_outputs is None:
            return outputs
        # transformers 5.2x carries the tower's whole output; 5.17 only its features.
        if "image_outputs" in type(outputs).__dataclass_fields__:
            return type(outputs)(**outputs, image_outputs=image_outputs)
        return type(outputs)(**outputs, image_hidden_states=image_outputs.pooler_output)


class UmbrellaLlavaForConditionalGeneration(UmbrellaLlavaPreTrainedModel, LlavaForConditionalGeneration):
    """[`LlavaForConditionalGeneration`] on 3-D volumes: the stock `Trainer`, `generate()` and PEFT work unchanged."""

    _auto_class = "AutoModelForImageTextToText"

    def __init__(self, config: UmbrellaLlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = UmbrellaLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_image_features(
        self,
        pixel_values: torch.Tensor | None,
        image_mask: torch.Tensor | None = None,
        num_images_per_sample: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> UmbrellaVolumeFeaturesOutput | None:
        """As [`UmbrellaLlavaModel.get_image_features`]."""
        return self.model.get_image_features(
            pixel_values,
            image_mask=image_mask,
            num_images_per_sample=num_images_per_sample,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            **kwargs,
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        num_images_per_sample: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs,
    ):
        r"""
        Args:
            input_ids, pixel_values, attention_mask, image_mask, num_images_per_sample, mm_encoder_outputs:
                As in [`UmbrellaLlavaModel.forward`]. Naming `mm_encoder_outputs` here is what makes `generate()`
                (transformers 5.2x) encode the volumes once through [`get_image_features`] before the prefill.
            labels (`torch.LongTensor` of shape `(B, L)`):
                Next-token targets; -100 where no loss is taken (prompt, padding, image tokens).
            logits_to_keep (`int` or `torch.Tensor`):
                Compute logits for the last `logits_to_keep` positions only (all when 0), or for the positions a 1-D
                tensor lists; `generate()` asks for 1 at prefill.
            **kwargs:
                Passed on to [`LlavaForConditionalGeneration.forward`]: cache, vision feature layer and strategy, and
                the Trainer's `num_items_in_batch`, which keeps the loss normalised over gradient-accumulation steps.
        """
        if mm_encoder_outputs is not None:  # LLaVA's forward names it from transformers 5.2x on, 5.17 passes it on
            kwargs["mm_encoder_outputs"] = mm_encoder_outputs
        if labels is not None and self.training:
            # A training step reads no cache: building one costs memory, and under activation checkpointing the
            # language model logs that it turns it off, on every step, which breaks a compiled step's graph. (A new
            # dict: dynamo breaks the graph at LLaVA's signature check after a mutated one.)
            kwargs = {"use_cache": False, **kwargs}
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            image_mask=image_mask,
            num_images_per_sample=num_images_per_sample,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        cache=None,
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        # transformers passes volumes (raw, or pre-encoded as `mm_encoder_outputs`) on the first iteration only. An
        # assistant model's first forward is not one, yet it fills an empty cache with the whole prompt, so the
        # volumes go to whichever forward fills an empty cache. This runs eagerly, outside a compiled forward. A
        # prompt's image tokens are checked against its volumes once, in `_expand_inputs_for_generation`. (The cache
        # is `cache` from transformers 5.2x on, `past_key_values` before; `generate()` validates its keywords against
        # this signature.)
        given_cache = {"cache": cache} if cache is not None else {}
        if past_key_values is not None:
            cache, given_cache = past_key_values, {"past_key_values": past_key_values}
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **given_cache,
            **kwargs,
        )
        fills_cache = is_first_iteration or cache is None or int(cache.get_seq_length()) == 0
        for name in ("pixel_values", "image_mask", "num_images_per_sample", "mm_encoder_outputs"):
            if fills_cache and kwargs.get(name) is not None:
                model_inputs[name] = kwargs[name]
            else:
                model_inputs.pop(name, None)
        return model_inputs

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        r"""[`GenerationMixin.generate`], with volumes beside the prompt (`pixel_values`, `image_mask`,
        `num_images_per_sample`, as the processor returns them).

        A conversation continues from the cache a previous call returned (`cache=` / `past_key_values=`, with
        `input_ids` the whole conversation so far, as in transformers' `test_generate_continue_from_past_key_values`):
        the image tokens the cache holds need no volumes. The volumes given are those of the image tokens after the
        cache, or those of the whole conversation, of which only the ones after the cache are encoded (so a follow-up
        question may pass the same volumes again and no scan is encoded twice).
        """
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is not None and kwargs.get("pixel_values") is not None:
            cached = _cached_prompt_length(input_ids, kwargs)
            if cached:
                self._keep_volumes_after_cache(input_ids, cached, kwargs)
        return super().generate(inputs=inputs, generation_config=generation_config, **kwargs)

    def _keep_volumes_after_cache(self, input_ids: torch.LongTensor, cached: int, kwargs: dict) -> None:
        """When the volumes given are those of the whole conversation `input_ids (B, L)` and a cache holds its first
        `cached` positions, keep in `kwargs` only each sample's volumes whose image tokens come after the cache (the
        last ones, in slot order); drop the volume inputs when none remain. Anything else is left to the prompt's
        per-sample check, which names the samples."""
        pixel_values = kwargs["pixel_values"]
        _, counts = flatten_volumes(pixel_values, kwargs.get("image_mask"), kwargs.get("num_images_per_sample"))
        is_image = (input_ids == self.config.image_token_id).cpu()
        seq_length = self.config.image_seq_length
        whole, after_cache = is_image.sum(dim=1) // seq_length, is_image[:, cached:].sum(dim=1) // seq_length
        if counts is None:
            counts = whole  # flattened volumes without counts belong to the text's blocks
        if torch.equal(counts, after_cache) or not torch.equal(counts, whole):
            return
        if int(after_cache.sum()) == 0:
            for name in ("pixel_values", "image_mask", "num_images_per_sample"):
                kwargs.pop(name, None)
            return
        if pixel_values.dim() == 6:
            slots = pixel_values.shape[1]
            valid = kwargs.get("image_mask")
            valid = torch.arange(slots) < counts[:, None] if valid is None else valid.cpu().bool()
            rank = valid.cumsum(dim=1) - 1  # a slot's rank among its sample's volumes
            kept = valid & (rank >= (counts - after_cache)[:, None])
            kwargs["image_mask"] = kept.to(pixel_values.device)
        else:
            rank = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
            kept = rank >= torch.repeat_interleave(counts - after_cache, counts)
            kwargs["pixel_values"] = pixel_values[kept.to(pixel_values.device)]
        kwargs["num_images_per_sample"] = after_cache

    def _check_generation_prompt(self, input_ids: torch.LongTensor | None, model_kwargs: dict) -> None:
        """Refuse a prompt whose image tokens do not match its volumes, sample by sample, before any forward.

        The forward checks raw volumes at the prefill, but not image tokens without volumes once a cache is given,
        nor a prompt whose pre-encoded features reach the forward chunk by chunk (`prefill_chunk_size`). Only the
        positions after a given cache are checked: the cache already holds what the earlier image tokens read. A
        prompt given as `inputs_embeds` without volumes is not checked: its embeddings, not its ids, fill the cache.
        """
        if input_ids is None or input_ids.numel() == 0:
            return
        cached = _cached_prompt_length(input_ids, model_kwargs)
        if model_kwargs.get("inputs_embeds") is not None and model_kwargs.get("pixel_values") is None:
            return
        pre_encoded = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")
        if pre_encoded is not None:
            counts = getattr(pre_encoded, "num_images_per_sample", None)
            if counts is not None:
                # Features of the whole prompt (an assistant model's later calls) or of the part after the cache.
                blocks = (input_ids == self.config.image_token_id).sum(dim=1).cpu() // self.config.image_seq_length
                if cached and not torch.equal(blocks, torch.as_tensor(counts).cpu()):
                    input_ids = input_ids[:, cached:]
                self.model.get_placeholder_mask(input_ids, None, pre_encoded.pooler_output, counts)
        elif model_kwargs.get("pixel_values") is None:
            self.model.get_placeholder_mask(input_ids[:, cached:], None, None)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        # generate() calls this once per call, after any pre-encoding: the place to check the whole prompt.
        self._check_generation_prompt(input_ids, model_kwargs)
        # Beams and `num_return_sequences` repeat every tensor along dim 0. That is right for (B, N, ...) slots, but
        # flattened (M, ...) volumes must be repeated per sample, not per volume, to stay with their sample.
        # transformers repeats pre-encoded features per sample itself; their counts follow here.
        pre_encoded = (model_kwargs.get("mm_encoder_outputs") or {}).get("image")
        pixel_values = model_kwargs.get("pixel_values")
        if expand_size == 1 or (pre_encoded is None and (pixel_values is None or pixel_values.dim() != 5)):
            return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
        if pre_encoded is not None:
            counts = getattr(pre_encoded, "num_images_per_sample", None)
            input_ids, model_kwargs = super()._expand_inputs_for_generation(
                expand_size, is_encoder_decoder, input_ids, **model_kwargs
            )
            if counts is not None:
                pre_encoded.num_images_per_sample = counts.repeat_interleave(expand_size)
            return input_ids, model_kwargs

        _, counts = flatten_volumes(
            pixel_values, model_kwargs.get("image_mask"), model_kwargs.get("num_images_per_sample")
        )
        if counts is None:
            counts = (input_ids == self.config.image_token_id).sum(dim=1).cpu() // self.config.image_seq_length
        model_kwargs["num_images_per_sample"] = counts
        del model_kwargs["pixel_values"]
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        starts = (torch.cumsum(counts, 0) - counts).tolist()
        order = torch.cat(
            [torch.arange(start, start + count).repeat(expand_size) for start, count in zip(starts, counts.tolist())]
        )
        model_kwargs["pixel_values"] = pixel_values[order.to(pixel_values.device)]
        return input_ids, model_kwargs


__all__ = [
    "UmbrellaLlavaForConditionalGeneration",
    "UmbrellaLlavaModel",
    "UmbrellaLlavaPreTrainedModel",
    "UmbrellaMultiModalProjector",
    "UmbrellaVolumeEmbeddings",
    "UmbrellaVolumeFeaturesOutput",
    "UmbrellaVolumeMerger",
    "damaged_weight_files",
    "flatten_volumes",
]
