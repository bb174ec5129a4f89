"""Processor of UmbrellaLlava: one call turns chat text and 3-D volumes into everything the model's forward takes.

This file travels to the Hub as remote code: it imports only the standard library, torch and transformers, so that
`AutoProcessor.from_pretrained(..., trust_remote_code=True)` works without the umbrella_llava package.
"""

from typing import Any

import torch
from transformers import BatchFeature, ProcessorMixin

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
        return text.replace(self.image_token, self.image_token * self.image_seq_length)

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        return_tensors: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        r"""
        Tokenize `text` with every image placeholder expanded and preprocess the volumes of each sample.

        Args:
            images:
                One list of volumes per sample (paths, nibabel images, arrays or tensors; a list may be empty). For a
                single sample, a flat list of volumes or one volume is accepted too.
            text (`str` or `list[str]`):
                One string per sample, holding one image placeholder per volume of that sample, in order.
            return_tensors (`str`, *optional*):
                `"pt"` for torch tensors.
            **kwargs:
                Passed to the tokenizer (`padding`, `truncation`, `max_length`, `pad_to_multiple_of`, ...).

        Returns:
            [`BatchFeature`] with `input_ids (B, L)`, `attention_mask (B, L)` and, when a sample has volumes,
            `pixel_values (B, N, C, H, W, D)`, `image_mask (B, N)` and `num_images_per_sample (B,)`.

        Raises:
            ValueError: if a sample's placeholders and volumes disagree in number (naming the sample and both
                counts), or if truncation would cut an image-token block.
        """
        if text is None:
            raise ValueError(f"{type(self).__name__} needs `text`; use the image processor alone for volumes only.")
        texts = [text] if isinstance(text, str) else list(text)
        volumes_per_sample = _as_batch(images) if images is not None else [[] for _ in texts]
        if len(volumes_per_sample) != len(texts):
            raise ValueError(
                f"Got {len(texts)} texts but {len(volumes_per_sample)} lists of volumes; pass one list of volumes per "
                "sample (an empty list for a sample without volumes)."
            )

        for index, (sample_text, volumes) in enumerate(zip(texts, volumes_per_sample)):
            num_placeholders = sample_text.count(self.image_token)
            if num_placeholders != len(volumes):
                raise ValueError(
                    f"Sample {index} has {num_placeholders} {self.image_token} placeholders in its text but "
                    f"{len(volumes)} volumes; each volume needs exactly one placeholder."
                )

        text_inputs = self.tokenizer([self.expand_image_placeholders(t) for t in texts], **kwargs)
        for index, (input_ids, volumes) in enumerate(zip(text_inputs["input_ids"], volumes_per_sample)):
            num_image_tokens = sum(token == self.image_token_id for token in input_ids)
            if num_image_tokens != len(volumes) * self.image_seq_length:
                raise ValueError(
                    f"Sample {index} keeps {num_image_tokens} image tokens after tokenization, but its {len(volumes)} "
                    f"volumes need {len(volumes) * self.image_seq_length}; truncation cut an image-token block. "
                    "Raise `max_length` or shorten the text."
                )

        features = dict(text_inputs)
        if images is not None:
            features.update(self.image_processor(volumes_per_sample, return_tensors="pt"))
            features = drop_volume_inputs_without_volumes(features)
        return BatchFeature(features, tensor_type=return_tensors)


__all__ = ["UmbrellaLlavaProcessor", "DEFAULT_CHAT_TEMPLATE", "drop_volume_inputs_without_volumes"]
