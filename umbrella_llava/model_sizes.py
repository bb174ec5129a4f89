"""Small random models: the one definition of their configs, which the tests, the benchmarks and the demo build from.

A [`ModelSize`] names the widths and depths of a SigLIP (or CLIP) tower and a Qwen2 language model, and the volume
geometry. [`llava_config_kwargs`] turns it into the arguments of a `LlavaConfig` (the same sub-configs back stock
LLaVA in the conversion tests and the benchmarks' baseline), [`umbrella_config`] into an [`UmbrellaLlavaConfig`].
Each user names its own sizes; the dicts are built here only.
"""

from dataclasses import dataclass

from .configuration_umbrella_llava import UmbrellaLlavaConfig

DEFAULT_IMAGE_TOKEN_ID = 3  # `<image>` of `tokenization.build_chatml_tokenizer`, for configs built without a tokenizer


@dataclass(frozen=True)
class ModelSize:
    """The sizes of one small model: tower, language model and volume geometry."""

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


def vision_config(
    size: ModelSize,
    tower: str = "siglip",
    image_size: int | None = None,
    patch_size: int | None = None,
    num_channels: int | None = None,
    use_head: bool | None = None,
) -> dict:
    """The tower's sub-config. `image_size`, `patch_size` and `num_channels` size the 2-D embedding (which the 3-D
    one replaces in UmbrellaLlava, and which stock LLaVA uses); `None` keeps the tower's default. `use_head` is
    SigLIP's `vision_use_head`, left at its default when `None`."""
    config = {
        "model_type": f"{tower}_vision_model",
        "hidden_size": size.vision_hidden,
        "intermediate_size": size.vision_intermediate,
        "num_hidden_layers": size.vision_layers,
        "num_attention_heads": size.vision_heads,
    }
    optional = {
        "image_size": image_size,
        "patch_size": patch_size,
        "num_channels": num_channels,
        "vision_use_head": use_head,
    }
    config.update({key: value for key, value in optional.items() if value is not None})
    return config


def text_config(size: ModelSize, vocab_size: int | None = None, max_position_embeddings: int = 8192) -> dict:
    """The Qwen2 language model's sub-config; `vocab_size` overrides the size's (a tokenizer's length)."""
    return {
        "model_type": "qwen2",
        "hidden_size": size.text_hidden,
        "intermediate_size": size.text_intermediate,
        "num_hidden_layers": size.text_layers,
        "num_attention_heads": size.text_heads,
        "num_key_value_heads": size.text_kv_heads,
        "vocab_size": size.vocab_size if vocab_size is None else vocab_size,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": size.tie_word_embeddings,
    }


def llava_config_kwargs(
    size: ModelSize,
    tokenizer=None,
    tower: str = "siglip",
    max_position_embeddings: int = 8192,
    **vision_options,
) -> dict:
    """`LlavaConfig` arguments for `size`: sub-configs, the image token, and the feature choice LLaVA makes for the
    tower (every token of SigLIP's last layer; CLIP's without its class token). With a `tokenizer`, the vocabulary,
    image, padding and end tokens are its own. `vision_options` go to [`vision_config`]."""
    kwargs = {
        "vision_config": vision_config(size, tower, **vision_options),
        "text_config": text_config(size, len(tokenizer) if tokenizer is not None else None, max_position_embeddings),
        "image_token_index": tokenizer.image_token_id if tokenizer is not None else DEFAULT_IMAGE_TOKEN_ID,
        "vision_feature_select_strategy": "full" if tower == "siglip" else "default",
        "vision_feature_layer": -1,
        "tie_word_embeddings": size.tie_word_embeddings,
    }
    if tokenizer is not None:
        special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
        kwargs["text_config"].update(special)
        kwargs.update(special)
    return kwargs


def umbrella_config(
    size: ModelSize,
    tokenizer=None,
    tower: str = "siglip",
    max_position_embeddings: int = 8192,
    vision_options: dict | None = None,
    **overrides,
) -> UmbrellaLlavaConfig:
    """An [`UmbrellaLlavaConfig`] for `size`: [`llava_config_kwargs`] with cubic `size.volume_size` volumes in
    `size.volume_patch` patches, one channel, GELU projector; `overrides` replace any argument."""
    kwargs = llava_config_kwargs(size, tokenizer, tower, max_position_embeddings, **(vision_options or {}))
    kwargs.update(
        volume_size=(size.volume_size,) * 3,
        volume_patch_size=(size.volume_patch,) * 3,
        volume_channels=1,
        projector_hidden_act="gelu",
    )
    kwargs.update(overrides)
    return UmbrellaLlavaConfig(**kwargs)


__all__ = ["ModelSize", "llava_config_kwargs", "text_config", "umbrella_config", "vision_config"]
