"""Asking a model about scans, one question or a conversation: the answering function behind `umbrella-explain`
and the web app (`umbrella-app`).

[`VolumeConversation`] preprocesses its scans once, and each follow-up question continues from the cache the
previous `generate()` returned, so no scan is encoded twice (see `UmbrellaLlavaForConditionalGeneration.generate`).
"""

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from .image_processing_umbrella_llava import VolumeInput
from .processing_umbrella_llava import UmbrellaLlavaProcessor


def user_turn(question: str, num_volumes: int = 0) -> dict[str, Any]:
    """A ChatML user turn: `num_volumes` image items (one per volume, in order), then the question."""
    return {"role": "user", "content": [{"type": "image"}] * num_volumes + [{"type": "text", "text": question}]}


def _common_prefix_length(first: torch.Tensor, second: torch.Tensor) -> int:
    length = min(len(first), len(second))
    differs = (first[:length] != second[:length]).nonzero()
    return int(differs[0]) if len(differs) else length


class VolumeConversation:
    r"""
    A conversation with a model about one set of scans (several volumes of one sample: two modalities, two
    subjects). The first question shows the model every scan; later questions are text, and are answered from the
    cache of the turns before, extended by the new turn only.

    Args:
        model: an [`UmbrellaLlavaForConditionalGeneration`] (or any model loaded with `trust_remote_code=True`).
        processor: its [`UmbrellaLlavaProcessor`].
        volumes: the scans, each a NIfTI path, a DICOM series folder, a nibabel image, an array or a tensor (see
            `UmbrellaVolumeProcessor.preprocess_volume`); preprocessed once, here.
        max_new_tokens: the longest answer, in tokens.
        **generate_kwargs: passed to every `generate()` call (greedy by default).

    Attributes:
        pixel_values: `(1, N, C, H, W, D)` the preprocessed scans, as the model sees them.
        messages: the conversation so far, in ChatML.

    Raises:
        InvalidVolumeError / OSError: naming the scan that cannot be preprocessed.
    """

    def __init__(
        self,
        model,
        processor: UmbrellaLlavaProcessor,
        volumes: Sequence[VolumeInput],
        max_new_tokens: int = 64,
        **generate_kwargs,
    ):
        self.model = model
        self.processor = processor
        volume_processor = processor.image_processor
        stacked = [volume_processor.preprocess_volume(volume) for volume in volumes]
        shape = (len(stacked), volume_processor.volume_channels, *volume_processor.volume_size)
        self.pixel_values = (torch.stack(stacked) if stacked else torch.zeros(shape)).unsqueeze(0)
        self.num_volumes = len(stacked)
        self.max_new_tokens = max_new_tokens
        self.generate_kwargs = {"do_sample": False, **generate_kwargs}
        self.messages: list[dict[str, Any]] = []
        self._sequence: torch.Tensor | None = None  # the ids the cache holds, (L,)
        self._cache = None

    def prompt_ids(self, messages: list[dict[str, Any]]) -> torch.Tensor:
        """`messages` rendered with the chat template (with the generation prompt) and tokenized, image
        placeholders expanded to their blocks: `(L,)` int64."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        expanded = self.processor.expand_image_placeholders(text)
        return torch.tensor(self.processor.tokenizer(expanded, add_special_tokens=False)["input_ids"])

    def ask(self, question: str) -> str:
        """Ask `question` (the first one about the scans, later ones following up); returns the answer's text and
        adds both turns to `messages`."""
        turn = user_turn(question, self.num_volumes if not self.messages else 0)
        messages = [*self.messages, turn]
        input_ids = self.prompt_ids(messages)
        inputs: dict[str, Any] = {}
        kept = 0 if self._sequence is None else _common_prefix_length(self._sequence, input_ids)
        if kept and self._cache is not None:
            # The re-rendered conversation extends what the cache holds up to `kept` tokens (the template may
            # write the end of the last answer differently from how it was generated); keep that part.
            surplus = int(self._cache.get_seq_length()) - kept
            if surplus > 0:
                self._cache.crop(-surplus)  # a negative count removes that many tokens, in every 5.x
            inputs["cache" if _takes_cache_keyword() else "past_key_values"] = self._cache
        if self.num_volumes:
            inputs["pixel_values"] = self.pixel_values.to(self.model.device, self.model.dtype)
        device = self.model.device
        output = self.model.generate(
            input_ids=input_ids[None].to(device),
            attention_mask=torch.ones(1, len(input_ids), dtype=torch.long, device=device),
            max_new_tokens=self.max_new_tokens,
            return_dict_in_generate=True,
            **inputs,
            **self.generate_kwargs,
        )
        sequence = output.sequences[0].cpu()
        self._sequence = sequence
        self._cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        answer = self.processor.decode(sequence[len(input_ids) :], skip_special_tokens=True).strip()
        self.messages = [*messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        return answer


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `load_for_answering` reads (`--model`, `--dtype`, `--device`), for the commands that answer
    questions (umbrella-explain, umbrella-app)."""
    parser.add_argument("--model", required=True, help="a saved UmbrellaLlava folder or a Hub id")
    parser.add_argument("--dtype", default="float32", help="the model's dtype: float32, bfloat16, float16, auto")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when there is one)")


def load_for_answering(
    model_id: str, dtype: str = "float32", device: str | None = None, **processor_options
) -> tuple[Any, UmbrellaLlavaProcessor]:
    """A saved model (a folder or a Hub id) and its processor, through the Auto classes with `trust_remote_code=True`,
    in eval mode on `device` (CUDA when there is one, by default) in `dtype` (`"float32"`, `"bfloat16"`, ...,
    `"auto"`); `processor_options` (e.g. `frames="mean"`) override the saved processor's."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True, dtype=torch_dtype)
    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True, **processor_options)
    return model.to(device).eval(), processor


def _takes_cache_keyword() -> bool:
    """Whether generate() names the cache `cache` (transformers 5.2x) rather than `past_key_values` (5.17)."""
    import inspect

    from transformers import GenerationMixin

    return "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters


def answer_question(
    model, processor: UmbrellaLlavaProcessor, volumes: Sequence[VolumeInput], question: str, max_new_tokens: int = 64
) -> str:
    """One question about `volumes`, answered greedily: `VolumeConversation(...).ask(question)`."""
    return VolumeConversation(model, processor, volumes, max_new_tokens=max_new_tokens).ask(question)


__all__ = ["VolumeConversation", "add_model_arguments", "answer_question", "load_for_answering", "user_turn"]
