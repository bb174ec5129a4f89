"""`UmbrellaCollator`: items of any of the package's datasets batched into the model's forward inputs."""

from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch

from ..image_processing_umbrella_llava import stack_volumes
from ..modeling_umbrella_llava import check_image_tokens_per_sample
from ..processing_umbrella_llava import UmbrellaLlavaProcessor, drop_volume_inputs_without_volumes
from .labels import IGNORE_INDEX


def empty_volume_stack(image_processor) -> torch.Tensor:
    """An empty `(0, C, H, W, D)` stack, for a sample without volumes."""
    return torch.zeros(0, image_processor.volume_channels, *image_processor.volume_size)


class UmbrellaCollator:
    r"""
    Batches [`ConversationDataset`] items into the model's forward inputs.

    Token sequences are padded to the longest in the batch (rounded up to `pad_to_multiple_of`): `input_ids` with the
    tokenizer's pad token, `attention_mask` with 0, `labels` with -100. Volumes are stacked into
    `pixel_values (B, max_n, C, H, W, D)` with `image_mask (B, max_n)` and `num_images_per_sample (B,)`; a batch in
    which no sample has a volume carries none of these three keys, which the model reads as text-only. Each sample's
    image tokens are checked against its volumes here, on the host, so a compiled training step (whose own checks are
    device asserts) still gets a mismatched sample named.

    Args:
        processor: the [`UmbrellaLlavaProcessor`] (its tokenizer gives the pad token).
        pad_to_multiple_of: round the padded length up to a multiple of this.
        padding_side: `"right"` by default: in training every sequence then starts at position 0 and the pads trail
            behind the labels. `None` follows the tokenizer's `padding_side` (which is left for generation).
        decode_threads: read the items' volumes (decoded when first read, see [`ConversationItem`]) in this many
            threads. Decompression and preprocessing release the GIL, so threads decode a batch's files in parallel
            in the process that collates: the way to feed volumes preprocessed on a GPU, which DataLoader worker
            processes cannot use. 1: one after the other.

    Returns (from `__call__`):
        `dict` with `input_ids (B, L)`, `attention_mask (B, L)`, `labels (B, L)` when the items have labels, and the
        volume inputs above; it goes straight into `model(**batch)`.
    """

    def __init__(
        self,
        processor: UmbrellaLlavaProcessor,
        pad_to_multiple_of: int | None = None,
        padding_side: Literal["left", "right"] | None = "right",
        decode_threads: int = 1,
    ):
        tokenizer = processor.tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token` before batching.")
        self.processor = processor
        self.pad_token_id = tokenizer.pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        if decode_threads < 1:
            raise ValueError(f"`decode_threads` must be at least 1, got {decode_threads}.")
        self.decode_threads = decode_threads
        self.padding_side = padding_side or tokenizer.padding_side
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {self.padding_side!r}.")

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if len(features) == 0:
            raise ValueError(
                "UmbrellaCollator got an empty list of items, so there is no sample to batch: the data set or the "
                "sampler gave nothing (check the data with umbrella-check-data, and that no filter removed every record)."
            )
        length = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        has_labels = all("labels" in feature for feature in features)

        batch_size = len(features)
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            positions = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            input_ids[row, positions] = torch.as_tensor(feature["input_ids"])
            attention_mask[row, positions] = 1
            if has_labels:
                labels[row, positions] = torch.as_tensor(feature["labels"])

        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if has_labels:
            batch["labels"] = labels
        volumes = self.read_volumes(features)
        batch.update(drop_volume_inputs_without_volumes(stack_volumes(volumes)))
        self.check_image_tokens(batch)
        return batch

    def read_volumes(self, features: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Each item's `pixel_values` (an empty stack for an item without), in `decode_threads` threads."""

        def read(feature) -> torch.Tensor:
            if "pixel_values" in feature:
                return feature["pixel_values"]
            return empty_volume_stack(self.processor.image_processor)

        if self.decode_threads == 1 or len(features) == 1:
            return [read(feature) for feature in features]
        with ThreadPoolExecutor(min(self.decode_threads, len(features))) as pool:
            return list(pool.map(read, features))

    def check_image_tokens(self, batch: dict[str, torch.Tensor]) -> None:
        """Check every sample's image tokens against its volumes on the host, naming the sample, as the model's eager
        forward does: a compiled forward can only assert on the device (see README, "What is checked where")."""
        counts = batch.get("num_images_per_sample", torch.zeros(len(batch["input_ids"]), dtype=torch.long))
        try:
            check_image_tokens_per_sample(
                batch["input_ids"] == self.processor.image_token_id, counts, self.processor.image_seq_length
            )
        except ValueError as error:
            raise ValueError(
                f"UmbrellaCollator: {error} Samples are numbered in the order of the items given."
            ) from None
