"""Configuration of UmbrellaLlava: a LLaVA model whose vision tower reads 3-D volumes.

This file travels to the Hub as remote code: it imports only torch, transformers and einops, and siblings with
single-dot relative imports.
"""

from transformers import LlavaConfig

# Vision towers whose embeddings prepend a class token that LLaVA's "default" feature strategy then drops.
CLASS_TOKEN_VISION_MODELS = ("clip_vision_model",)
SUPPORTED_VISION_MODELS = ("siglip_vision_model", "clip_vision_model")


def _as_triple(value, name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        value = (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3 or any(v <= 0 for v in value):
        raise ValueError(f"`{name}` must be three positive ints (H, W, D), got {value}.")
    return value


def _remainders(sizes, divisors) -> str:
    """`"W: 30 % 8 = 6"` for every axis whose size the divisor does not divide, joined by "; " (empty if none)."""
    return "; ".join(
        f"{axis}: {size} % {divisor} = {size % divisor}"
        for axis, size, divisor in zip("HWD", sizes, divisors)
        if size % divisor
    )


class UmbrellaLlavaConfig(LlavaConfig):
    r"""
    A [`LlavaConfig`] for 3-D volumes. The vision tower's encoder layers, the projector and the language model are
    configured exactly as in LLaVA (`vision_config`, `text_config`, ...); the tower's 2-D patch embedding is replaced
    by a 3-D one described by the fields below.

    Args:
        volume_size (`tuple[int, int, int]`, defaults to `(96, 96, 96)`):
            Spatial size (H, W, D) of a preprocessed volume, in voxels.
        volume_patch_size (`tuple[int, int, int]`, defaults to `(16, 16, 16)`):
            Size (H, W, D) of one 3-D patch, in voxels. Must divide `volume_size` on every axis.
        volume_channels (`int`, defaults to 1):
            Channels per volume (1 for a single MRI contrast).
        volume_merge_size (`tuple[int, int, int]`, defaults to `(1, 1, 1)`):
            Neighbouring patch tokens (H, W, D) of the tower's output that are merged into one token, their average,
            before the projector: the token budget of a volume. Must divide `volume_grid` on every axis. `(1, 1, 1)`
            merges nothing.

    `image_seq_length`, the number of tokens one volume occupies in the text, is derived from these: one token per
    merged block of patches (`volume_num_patches / (mh * mw * md)`), plus the class token where the tower has one and
    `vision_feature_select_strategy="full"` keeps it; the class token is never merged.

    Raises:
        ValueError: if the patch does not divide the volume, if the merge size does not divide the patch grid, if
            the vision tower is not one of `SUPPORTED_VISION_MODELS`, or if `vision_feature_select_strategy="default"`
            would drop a patch token of a tower that has no class token.
    """

    model_type = "umbrella_llava"
    keys_to_ignore_at_inference = ["past_key_values", "cache", "image_hidden_states", "image_outputs"]

    volume_size: list[int] | tuple[int, ...] = (96, 96, 96)
    volume_patch_size: list[int] | tuple[int, ...] = (16, 16, 16)
    volume_channels: int = 1
    volume_merge_size: list[int] | tuple[int, ...] = (1, 1, 1)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.volume_size = list(_as_triple(self.volume_size, "volume_size"))
        self.volume_patch_size = list(_as_triple(self.volume_patch_size, "volume_patch_size"))
        if self.volume_channels < 1:
            raise ValueError(f"`volume_channels` must be at least 1, got {self.volume_channels}.")
        not_divided = _remainders(self.volume_size, self.volume_patch_size)
        if not_divided:
            raise ValueError(
                f"volume_patch_size {tuple(self.volume_patch_size)} does not divide volume_size "
                f"{tuple(self.volume_size)} ({not_divided}). Resize the volumes or choose a patch size "
                "that divides every axis."
            )
        self.volume_merge_size = list(_as_triple(self.volume_merge_size, "volume_merge_size"))
        not_merged = _remainders(self.volume_grid, self.volume_merge_size)
        if not_merged:
            raise ValueError(
                f"volume_merge_size {tuple(self.volume_merge_size)} does not divide the patch grid "
                f"{self.volume_grid} (volume_size / volume_patch_size; {not_merged}). Choose a merge size "
                "that divides every axis of the grid, or a volume or patch size whose grid it divides."
            )

        vision_type = self.vision_config.model_type
        if vision_type not in SUPPORTED_VISION_MODELS:
            raise ValueError(f"UmbrellaLlava supports vision towers {SUPPORTED_VISION_MODELS}, got '{vision_type}'.")
        if self.vision_feature_select_strategy == "default" and not self.volume_class_token:
            raise ValueError(
                f"vision_feature_select_strategy='default' drops the first token as a class token, but "
                f"'{vision_type}' has none, so it would drop a patch of every volume. Use 'full'."
            )
        if vision_type == "siglip_vision_model":
            # SigLIP's attention-pooling head feeds nothing LLaVA uses; leaving it out keeps every parameter trained.
            self.vision_config.vision_use_head = False

        keeps_class_token = self.volume_class_token and self.vision_feature_select_strategy == "full"
        self.image_seq_length = self.volume_num_patches // self.volume_patches_per_token + int(keeps_class_token)

    @property
    def volume_grid(self) -> tuple[int, int, int]:
        """Patches along (H, W, D)."""
        return tuple(size // patch for size, patch in zip(self.volume_size, self.volume_patch_size))

    @property
    def volume_num_patches(self) -> int:
        h, w, d = self.volume_grid
        return h * w * d

    @property
    def volume_patches_per_token(self) -> int:
        """Patch tokens merged into one image token (mh * mw * md)."""
        mh, mw, md = self.volume_merge_size
        return mh * mw * md

    @property
    def volume_class_token(self) -> bool:
        """Whether the vision tower's embeddings prepend a class token (CLIP does, SigLIP does not)."""
        return self.vision_config.model_type in CLASS_TOKEN_VISION_MODELS


__all__ = ["UmbrellaLlavaConfig"]
