"""Turn-masked labels: a conversation rendered with the chat template and tokenized, labels only on the assistant's
words and end-of-turn tokens."""

from typing import Any

import torch
from transformers.utils.chat_template_utils import render_jinja_template

from ..processing_umbrella_llava import UmbrellaLlavaProcessor
from .records import ConversationRecord, InvalidRecordError

IGNORE_INDEX = -100


def tokenize_conversation(
    processor: UmbrellaLlavaProcessor, messages: list[dict[str, Any]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render `messages` with the processor's chat template and tokenize them with turn-masked labels.

    This is the one place labels are built. The template marks each assistant turn's words and end-of-turn token with
    a `{% generation %}` block; the rendered text is tokenized whole (with image placeholders expanded to their
    image-token blocks), and a token is labeled when its characters overlap a marked span.

    Returns:
        `input_ids (L,)` and `labels (L,)`, int64; labels are -100 outside the assistant spans and on image tokens.

    Raises:
        ValueError: if the chat template has no `{% generation %}` block.
    """
    template = processor.chat_template
    if not isinstance(template, str) or "generation" not in template:
        raise ValueError(
            "The processor's chat template has no `{% generation %}` block marking the assistant's words, so labels "
            "cannot be built; use umbrella_llava's default template or add the block around assistant content."
        )
    rendered, spans = render_jinja_template(
        conversations=[messages],
        chat_template=template,
        return_assistant_tokens_mask=True,
        **processor.tokenizer.special_tokens_map,
    )
    rendered, spans = rendered[0], spans[0]

    # Expanding a placeholder lengthens the text, so a span moves right by the growth of every placeholder before it.
    growth = len(processor.image_token) * (processor.image_seq_length - 1)

    def expanded_position(position: int) -> int:
        return position + growth * rendered.count(processor.image_token, 0, position)

    encoding = processor.tokenizer(
        processor.expand_image_placeholders(rendered), add_special_tokens=False, return_offsets_mapping=True
    )
    input_ids = torch.tensor(encoding["input_ids"], dtype=torch.long)
    offsets = torch.tensor(encoding["offset_mapping"], dtype=torch.long).reshape(-1, 2)
    learned = torch.zeros_like(input_ids, dtype=torch.bool)
    for start, end in spans:
        start, end = expanded_position(start), expanded_position(end)
        learned |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    learned &= input_ids != processor.image_token_id
    labels = torch.where(learned, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return input_ids, labels


def encode_record(
    processor: UmbrellaLlavaProcessor, record: ConversationRecord, max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize `record` and truncate it to `max_length`: `input_ids (L,)` and `labels (L,)`.

    Raises:
        InvalidRecordError: if truncation would cut or drop an image-token block, or leave no labeled token.
    """
    input_ids, labels = tokenize_conversation(processor, record.messages)
    if max_length is not None and len(input_ids) > max_length:
        if (input_ids[max_length:] == processor.image_token_id).any():
            raise InvalidRecordError(
                f"{record.where} is {len(input_ids)} tokens long; truncating it to max_length={max_length} would cut "
                "an image-token block. Raise max_length or shorten the conversation.",
                "truncation through an image block",
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if (labels == IGNORE_INDEX).all():
        raise InvalidRecordError(
            f"{record.where} keeps no assistant token within max_length={max_length}; an all -100 label row gives a "
            "NaN loss.",
            "no assistant token after truncation",
        )
    return input_ids, labels
