"""Processor of UmbrellaLlava: one call turns chat text and 3-D volumes into everything the model's forward takes.

This file travels to the Hub as remote code: it imports only the standard library, torch and transformers, so that
`AutoProcessor.from_pretrained(..., trust_remote_code=True)` works without the umbrella_llava package.
"""

import json
from typing import Any

import torch
from transformers import ProcessorMixin

from .image_processing_umbrella_llava import _as_batch

# ChatML, as Qwen and llava-interleave use it. An image content item becomes the placeholder and a newline, as in
# LLaVA's "<image>\n..." records, so both record formats read alike to the model. The assistant's
# words and its end-of-turn token sit in a `{% generation %}` block, so that the character spans of what the model
# learns to say are known after rendering (transformers' `return_assistant_tokens_mask` uses the same block).
DEFAULT_CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- else -%}{{ raise_exception('Unsupported content type: ' + item['type']) }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{ render_content(message['content']) + '<|im_end|>' }}{%- endgeneration -%}"
    "{%- else -%}{{ render_content(message['content']) + '<|im_end|>' }}{%- endif -%}"
    "{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

VOLUME_INPUT_NAMES = ("pixel_values", "image_mask", "num_images_per_sample")


def drop_volume_inputs_without_volumes(features: dict[str, Any]) -> dict[str, Any]:
    """Remove `pixel_values`, `image_mask` and `num_images_per_sample` from a batch that holds no volume at all.

    A batch without volumes is text-only for the model, which reads an absent `pixel_values` that way; this keeps
    `(B, 0, C, H, W, D)` tensors out of the vision tower.
    """
    counts = features.get("num_images_per_sample")
    if counts is not None and int(torch.as_tensor(counts).sum()) == 0:
        features = {key: value for key, value in features.items() if key not in VOLUME_INPUT_NAMES}
    return features


class UmbrellaLlavaProcessor(ProcessorMixin):
    r"""
    Wraps an [`UmbrellaVolumeProcessor`] and a tokenizer into one processor, like [`LlavaProcessor`] does for 2-D
    images: every image placeholder in the text stands for one volume and is expanded into the image-token block of
    `image_seq_length` tokens that the model fills with that volume's features.

    Args:
        image_processor (`UmbrellaVolumeProcessor`):
            Reads and preprocesses the volumes.
        tokenizer (`PreTrainedTokenizerBase`):
            A tokenizer that holds the image placeholder as one special token.
        image_seq_length (`int`):
            Tokens per volume; `UmbrellaLlavaConfig.image_seq_length` of the model this processor feeds.
        chat_template (`str`, *optional*):
            A Jinja chat template. Defaults to `DEFAULT_CHAT_TEMPLATE` (ChatML), which renders plain string content
            and UMBRELLA content items (`{"type": "text", "text": ...}`, `{"type": "image", ...}`).
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The placeholder, used only when the tokenizer has no `image_token` attribute.

    Calling it, `processor(text=..., images=..., **kwargs)` (`ProcessorMixin.__call__`), takes one string per sample,
    with one placeholder per volume, and `images` as one list of volumes per sample (paths, nibabel images, arrays,
    tensors; a list may be empty), or for one sample a volume or a flat list. Volume options (`voxel_spacing`,
    `normalization`, ... or `images_kwargs={...}`) reach the volume processor, the rest the tokenizer. It returns
    `input_ids (B, L)`, `attention_mask (B, L)` and, when a sample has volumes, `pixel_values (B, N, C, H, W, D)`,
    `image_mask (B, N)` and `num_images_per_sample (B,)`; a sample whose placeholders and volumes disagree in number,
    or a truncation through an image-token block, is a `ValueError` naming the sample.

    Raises:
        ValueError: if `image_seq_length` is not a positive int, or if the tokenizer does not hold the image
            placeholder as a single token.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_seq_length: int | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
    ):
        if not isinstance(image_seq_length, int) or isinstance(image_seq_length, bool) or image_seq_length < 1:
            raise ValueError(
                f"`image_seq_length` must be a positive int (the model config's `image_seq_length`), got "
                f"{image_seq_length!r}."
            )
        self.image_seq_length = image_seq_length
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        image_token_ids = tokenizer.encode(self.image_token, add_special_tokens=False)
        if len(image_token_ids) != 1:
            raise ValueError(
                f"The tokenizer splits the image placeholder {self.image_token!r} into {len(image_token_ids)} tokens; "
                "add it as a special token (`tokenizer.add_special_tokens`) so that one placeholder is one token."
            )
        self.image_token_id = image_token_ids[0]
        if chat_template is None:
            chat_template = DEFAULT_CHAT_TEMPLATE.replace("<image>", self.image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def model_input_names(self) -> list[str]:
        """The tokenizer's input names, then the volume processor's: the Trainer's `LengthGroupedSampler` measures a
        sample by `model_input_names[0]`, which must be `input_ids` (tokens), not `pixel_values` (volumes)."""
        names = self.tokenizer.model_input_names + self.image_processor.model_input_names
        return list(dict.fromkeys(names))

    def expand_image_placeholders(self, text: str) -> str:
        """Replace every image placeholder in `text` by its image-token block (`image_seq_length` image tokens)."""
        return text.replace(self.image_token, self.replace_image_token({}, 0))

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The image-token block of one volume: every volume gives `image_seq_length` tokens, whatever its source."""
        return self.image_token * self.image_seq_length

    # `ProcessorMixin.__call__` does the rest: it routes keywords (`_merge_kwargs`: the volume options of
    # `UmbrellaVolumeKwargs` to the volume processor, the rest to the tokenizer), expands each placeholder by
    # `replace_image_token` and records where (so that `apply_chat_template(..., return_assistant_tokens_mask=True)`
    # marks the assistant's tokens). The hooks below differ from LLaVA's only where volumes differ from 2-D images:
    # they are grouped per sample, read by the volume processor rather than fetched as PIL images, and counted per
    # sample.

    def prepare_inputs_layout(self, images: Any = None, text: str | list[str] | None = None, **kwargs):
        """Text as a list of samples and `images` as one list of volumes per sample, nothing read yet.

        `images` may be one volume, a flat list of volumes or one list per sample (see `_as_batch`). A flat list
        beside several texts is dealt out by each text's placeholder count, in order, as LLaVA deals out a flat list
        of images.
        """
        if text is None:
            raise ValueError(f"{type(self).__name__} needs `text`; use the image processor alone for volumes only.")
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            return None, texts, None, None
        volumes_per_sample = _as_batch(images)
        counts = [sample.count(self.image_token) for sample in texts]
        if len(volumes_per_sample) == 1 and len(texts) > 1 and len(volumes_per_sample[0]) == sum(counts):
            flat, volumes_per_sample = volumes_per_sample[0], []
            for count in counts:
                volumes_per_sample.append(flat[:count])
                flat = flat[count:]
        return volumes_per_sample, texts, None, None

    def validate_inputs(self, images: Any = None, text: list[str] | None = None, **kwargs) -> None:
        """Each sample's placeholders and volumes must agree in number (the base class checks only the totals)."""
        volumes_per_sample = images if images is not None else [[] for _ in text]
        if len(volumes_per_sample) != len(text):
            raise ValueError(
                f"Got {len(text)} texts but {len(volumes_per_sample)} lists of volumes; pass one list of volumes per "
                "sample (an empty list for a sample without volumes)."
            )
        for index, (sample_text, volumes) in enumerate(zip(text, volumes_per_sample)):
            num_placeholders = sample_text.count(self.image_token)
            if num_placeholders != len(volumes):
                raise ValueError(
                    f"Sample {index} has {num_placeholders} {self.image_token} placeholders in its text but "
                    f"{len(volumes)} volumes; each volume needs exactly one placeholder."
                )

    def _process_images(self, images: list[list[Any]], **kwargs) -> tuple[dict[str, Any], list[str]]:
        """Preprocess the volumes of every sample and give one image-token block per volume, in order. A batch
        without any volume is text-only: no volume inputs at all (see `drop_volume_inputs_without_volumes`)."""
        processed = drop_volume_inputs_without_volumes(dict(self.image_processor(images, **kwargs)))
        num_volumes = sum(len(volumes) for volumes in images)
        return processed, [self.replace_image_token(processed, index) for index in range(num_volumes)]

    def _check_special_mm_tokens(self, text: list[str], text_inputs: Any, modalities: list[str]) -> None:
        """Refuse a truncation that cut an image-token block, naming the sample and both counts."""
        for index, (sample_text, input_ids) in enumerate(zip(text, text_inputs["input_ids"])):
            expected = sample_text.count(self.image_token)
            num_image_tokens = sum(int(token) == self.image_token_id for token in input_ids)
            if num_image_tokens != expected:
                raise ValueError(
                    f"Sample {index} keeps {num_image_tokens} image tokens after tokenization, but its "
                    f"{expected // self.image_seq_length} volumes need {expected}; truncation cut an image-token "
                    "block. Raise `max_length` or shorten the text."
                )

    if not hasattr(ProcessorMixin, "_adjust_assistant_masks_indices"):
        # transformers 5.17 builds the assistant mask from token offsets into the text with every placeholder
        # already expanded, but from character spans of the text before expansion, so with a volume it marks the
        # wrong tokens (stock LLaVA too). Refuse rather than train on a wrong mask. 5.18 on shift the spans; TRL's
        # SFTTrainer requires 5.18 for assistant_only_loss on vision data.

        def apply_chat_template(self, conversation, *args, return_assistant_tokens_mask: bool = False, **kwargs):
            serialized = json.dumps(conversation, default=str)
            if return_assistant_tokens_mask and ('"type": "image"' in serialized or self.image_token in serialized):
                raise NotImplementedError(
                    "return_assistant_tokens_mask=True with volumes needs transformers 5.18 or newer: this version "
                    "marks the wrong tokens once an image placeholder is expanded. Upgrade transformers, or build "
                    "turn-masked labels with umbrella_llava.data.ConversationDataset."
                )
            return super().apply_chat_template(
                conversation, *args, return_assistant_tokens_mask=return_assistant_tokens_mask, **kwargs
            )


__all__ = ["UmbrellaLlavaProcessor", "DEFAULT_CHAT_TEMPLATE", "drop_volume_inputs_without_volumes"]
