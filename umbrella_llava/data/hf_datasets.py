"""Hugging Face `datasets` as a data source: rows with a conversation and a volume column of the `datasets.Nifti`
feature, as the same items [`ConversationDataset`] gives, for the same [`UmbrellaCollator`].

A row holds TRL's conversational vision form, which is also what [`chat_example`] writes: `messages` (ChatML turns,
an `{"type": "image"}` content item or an `<image>` in text per volume) and `images` (the volumes, in placeholder
order). The volume column may be `List(Nifti())` (several volumes per row), `Nifti()` (one), either with
`decode=False`, or plain strings (paths, including DICOM series folders). A `task_type` column, when present, is
the record's task (for per-task metrics), an `id` or `task_id` column its name in messages.

- [`NiftiConversationDataset`]: a map-style `datasets.Dataset`; every conversation is validated and tokenized at
  construction (the volume column is not decoded for that: its lengths are read off the Arrow column), and the
  volumes of a row are decoded when its `pixel_values` is read.
- [`IterableNiftiConversationDataset`]: a streaming `datasets.IterableDataset` (`load_dataset(..., streaming=True)`,
  for data larger than a disk), checked and tokenized row by row as it is read. The shards of the stream are split
  across `DataLoader` workers by `datasets` itself.
- [`records_to_dataset`]: record files → a `datasets.Dataset` with a `List(Nifti())` column, ready for
  `push_to_hub` (which embeds the NIfTI bytes).

TRL's `SFTTrainer` takes such a `datasets.Dataset` itself (its collator hands the decoded images to the processor);
the classes here are for the stock `Trainer`, with turn-masked labels made as for records read from files.

Needs the `datasets` extra: `pip install 'umbrella_llava[datasets]'`.
"""

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.utils.data import Dataset, IterableDataset

from ..image_processing_umbrella_llava import InvalidVolumeError, describe_source
from ..processing_umbrella_llava import UmbrellaLlavaProcessor
from .checks import text_special_tokens, warn_skipped
from .collator import empty_volume_stack
from .dataset import ConversationItem
from .labels import encode_record
from .records import (
    ConversationRecord,
    InvalidRecordError,
    _placeholder_paths,
    chat_example,
    parse_messages,
    parse_record,
    read_raw_records,
    volume_error,
)

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

# The first release whose `Nifti` feature embeds local files on `push_to_hub` and decodes bytes.
MIN_DATASETS_VERSION = "4.5"


def require_datasets():
    """Import `datasets`, or raise an `ImportError` that names the extra to install."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            "Reading a Hugging Face `datasets` dataset needs the `datasets` library, which is not installed: "
            "`pip install 'umbrella_llava[datasets]'`."
        ) from error
    if not hasattr(datasets, "Nifti"):
        raise ImportError(
            f"datasets {datasets.__version__} has no `Nifti` feature; `pip install 'datasets>={MIN_DATASETS_VERSION}'` "
            "(or `pip install 'umbrella_llava[datasets]'`)."
        )
    return datasets


def _row_name(index: int, name: str) -> str:
    return f"row {index} of {name}"


def _messages_column(column_names: list[str], messages_column: str | None, name: str) -> str:
    if messages_column is not None:
        if messages_column not in column_names:
            raise ValueError(f"{name} has no column {messages_column!r}; its columns are {column_names}.")
        return messages_column
    for candidate in ("messages", "conversations"):
        if candidate in column_names:
            return candidate
    raise ValueError(
        f"{name} has neither a `messages` nor a `conversations` column (its columns are {column_names}); name the "
        "column that holds the turns with messages_column=..."
    )


def _check_images_column(features: "datasets.Features | None", images_column: str, name: str) -> None:
    """Refuse a volume column of another feature than Nifti, List(Nifti) or strings (paths), when the features are
    known (a stream may not know them before its first row)."""
    if features is None:
        return
    if images_column not in features:
        raise ValueError(
            f"{name} has no volume column {images_column!r}; its columns are {list(features)}. Name it with "
            "images_column=... (a text-only data set needs a column of empty lists)."
        )
    datasets = require_datasets()
    feature = features[images_column]
    inner = getattr(feature, "feature", feature)  # List(Nifti()) / Sequence(Nifti()) -> Nifti()
    readable = isinstance(inner, datasets.Nifti) or (isinstance(inner, datasets.Value) and inner.dtype == "string")
    if not readable:
        raise ValueError(
            f"{name}: the volume column {images_column!r} has the feature {feature}; expected datasets.Nifti(), "
            "List(datasets.Nifti()) or strings (paths). Cast it with dataset.cast_column("
            f"{images_column!r}, datasets.List(datasets.Nifti()))."
        )


def _as_sources(value: Any) -> list[Any]:
    """The volume column's cell as a list of what `UmbrellaVolumeProcessor.preprocess_volume` reads."""
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    sources = []
    for item in values:
        if isinstance(item, dict):  # Nifti(decode=False): {"path", "bytes"}; the feature itself decodes it
            item = require_datasets().Nifti().decode_example(item)
        sources.append(item)
    return sources


class RowEncoder:
    """Checks and tokenizes one row's conversation, and preprocesses its volumes; shared by both dataset classes."""

    def __init__(self, processor: UmbrellaLlavaProcessor, name: str, max_length: int | None = None):
        if max_length is not None and max_length < 1:
            raise ValueError(f"`max_length` must be positive, got {max_length}.")
        self.processor = processor
        self.name = name
        self.max_length = max_length
        self.special_tokens = text_special_tokens(processor)

    def record(self, row: dict[str, Any], index: int, messages_column: str, num_volumes: int) -> ConversationRecord:
        """Row `index` as a validated [`ConversationRecord`] (no volume is read: `num_volumes` is the length of its
        volume cell).

        Raises:
            InvalidRecordError: naming the row, for anything `parse_messages` refuses, or placeholders that do not
                match the row's volumes.
        """
        record_id = str(row.get("task_id", row.get("id", f"#{index}")))
        where = f"record '{record_id}' ({_row_name(index, self.name)})"
        messages = parse_messages({"conversations": row[messages_column]}, where, self.special_tokens)
        placeholders = len(_placeholder_paths(messages, self.processor.image_token))
        if placeholders != num_volumes:
            raise InvalidRecordError(
                f"{where} has {placeholders} image placeholders in its conversation but {num_volumes} volumes in its "
                "volume column; each volume needs exactly one placeholder, in order.",
                "placeholder mismatch",
            )
        metadata = row.get("metadata")
        if isinstance(metadata, str):  # records_to_dataset stores it as JSON, since rows must share one schema
            metadata = json.loads(metadata) if metadata else {}
        return ConversationRecord(
            record_id=record_id,
            source=Path(self.name),
            index_in_source=index,
            task_type=row.get("task_type"),
            messages=messages,
            volume_paths=[],
            modalities=[None] * num_volumes,
            metadata=metadata or {},
            location=where,
        )

    def encode(self, record: ConversationRecord) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_ids (L,)` and turn-masked `labels (L,)` of `record` (see `encode_record`)."""
        return encode_record(self.processor, record, self.max_length)

    def volumes(self, record: ConversationRecord, cell: Any) -> torch.Tensor:
        """The preprocessed volumes of a row, `(n, C, H, W, D)` (`n` may be 0).

        Raises:
            InvalidRecordError: naming the row and the volume (its file, or its shape for an image decoded from
                bytes) that cannot be preprocessed, or a count that differs from the one the record was checked with.
        """
        sources = _as_sources(cell)
        if len(sources) != len(record.modalities):
            raise InvalidRecordError(
                f"{record.where} had {len(record.modalities)} volumes when it was checked and now holds "
                f"{len(sources)}; the dataset changed underneath.",
                "placeholder mismatch",
            )
        image_processor = self.processor.image_processor
        volumes = []
        for position, source in enumerate(sources):
            try:
                volumes.append(image_processor.preprocess_volume(source))
            except (InvalidVolumeError, OSError, TypeError) as error:
                kind = volume_error(record, error).kind
                raise InvalidRecordError(
                    f"{record.where}, volume {position} ({describe_source(source)}): {error}", kind
                ) from error
        return torch.stack(volumes) if volumes else empty_volume_stack(image_processor)


def _volume_counts(dataset: "datasets.Dataset", images_column: str) -> list[int]:
    """How many volumes each row holds, read off the Arrow column (no NIfTI is decoded, no byte is copied)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = dataset.with_format("arrow")[images_column]
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return pc.fill_null(pc.list_value_length(column), 0).to_pylist()
    return [0 if value is None else 1 for value in column.is_valid().to_pylist()]


class NiftiConversationDataset(Dataset):
    r"""
    A `datasets.Dataset` of conversations and volumes as model inputs with turn-masked labels: the items
    [`ConversationDataset`] gives, for the same [`UmbrellaCollator`] and the stock `Trainer`.

    Args:
        dataset: a `datasets.Dataset` whose rows hold the turns (`messages` or `conversations`) and the volumes
            (`images_column`, of the `Nifti` feature, a list of it, or path strings).
        processor: the [`UmbrellaLlavaProcessor`] whose chat template, tokenizer and image processor are used.
        images_column: the volume column.
        messages_column: the turns' column; by default `messages`, else `conversations`.
        max_length: truncate token sequences to this length (never through an image-token block).
        on_invalid: `"error"` raises on the first invalid row; `"skip"` drops invalid rows and counts them in one
            warning (`dataset.skipped` lists them).
        name: how errors name the data set; by default its `info.dataset_name`, or "the datasets.Dataset".

    `dataset[i]` is `{"input_ids": (L,), "labels": (L,), "pixel_values": (n_i, C, H, W, D)}`, volumes decoded when
    `pixel_values` is read; `dataset.records[i]` and `dataset.task_types[i]` are as in [`ConversationDataset`].

    Raises:
        ImportError: without the `datasets` extra.
        ValueError: for a missing column, a volume column of another feature, or when no valid row remains.
        InvalidRecordError: with `on_invalid="error"`, naming the row (see `RowEncoder.record`).
    """

    def __init__(
        self,
        dataset: "datasets.Dataset",
        processor: UmbrellaLlavaProcessor,
        images_column: str = "images",
        messages_column: str | None = None,
        max_length: int | None = None,
        on_invalid: Literal["error", "skip"] = "error",
        name: str | None = None,
    ):
        datasets = require_datasets()
        if isinstance(dataset, datasets.IterableDataset):
            raise TypeError("A streaming datasets.IterableDataset goes in IterableNiftiConversationDataset.")
        if on_invalid not in ("error", "skip"):
            raise ValueError(f"`on_invalid` must be 'error' or 'skip', got {on_invalid!r}.")
        self.name = name or getattr(dataset.info, "dataset_name", None) or "the datasets.Dataset"
        self.dataset = dataset
        self.images_column = images_column
        _check_images_column(dataset.features, images_column, self.name)
        messages_column = _messages_column(dataset.column_names, messages_column, self.name)
        self.encoder = RowEncoder(processor, self.name, max_length)
        self.processor = processor

        counts = _volume_counts(dataset, images_column)
        text_columns = [column for column in dataset.column_names if column != images_column]
        self.records: list[ConversationRecord] = []
        self.encodings: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.rows: list[int] = []  # the row of `dataset` behind each item
        self.skipped: list[tuple[str, str, str]] = []
        for index, row in enumerate(dataset.select_columns(text_columns)):
            try:
                record = self.encoder.record(row, index, messages_column, counts[index])
                encoding = self.encoder.encode(record)
            except InvalidRecordError as error:
                if on_invalid == "error":
                    raise
                self.skipped.append((_row_name(index, self.name), error.kind, str(error)))
                continue
            self.records.append(record)
            self.encodings.append(encoding)
            self.rows.append(index)
        self.lengths: list[int] = [len(input_ids) for input_ids, _ in self.encodings]
        warn_skipped(self.skipped, len(dataset), f"rows of {self.name}")
        if not self.records:
            raise ValueError(f"No valid row in {self.name} ({len(dataset)} read).")

    @property
    def task_types(self) -> list[str | None]:
        return [record.task_type for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ConversationItem:
        input_ids, labels = self.encodings[index]
        return ConversationItem(self, index, input_ids, labels)

    def volumes(self, index: int) -> torch.Tensor:
        """The preprocessed volumes of item `index`, `(n_i, C, H, W, D)`; see `RowEncoder.volumes`."""
        cell = self.dataset[self.rows[index]][self.images_column]
        return self.encoder.volumes(self.records[index], cell)


class IterableNiftiConversationDataset(IterableDataset):
    r"""
    A streaming `datasets.IterableDataset` of conversations and volumes as model inputs: each row is checked,
    tokenized and its volumes preprocessed as it is read, and yielded as
    `{"input_ids": (L,), "labels": (L,), "pixel_values": (n, C, H, W, D)}` for [`UmbrellaCollator`].

    The stock `Trainer` takes it with `max_steps` (a stream has no length). With `DataLoader` workers, `datasets`
    gives each worker its own shards (`dataset.num_shards` should be at least the number of workers).

    Args: as [`NiftiConversationDataset`]; with `on_invalid="skip"` an invalid row is logged, counted in
    `skipped` (of the process that read it) and passed over.

    Raises (while iterating):
        InvalidRecordError: with `on_invalid="error"`, naming the row (its index in the stream, or in the worker's
            shards when there are workers) and, for a volume, the volume.
    """

    def __init__(
        self,
        dataset: "datasets.IterableDataset",
        processor: UmbrellaLlavaProcessor,
        images_column: str = "images",
        messages_column: str | None = None,
        max_length: int | None = None,
        on_invalid: Literal["error", "skip"] = "error",
        name: str | None = None,
    ):
        require_datasets()
        if on_invalid not in ("error", "skip"):
            raise ValueError(f"`on_invalid` must be 'error' or 'skip', got {on_invalid!r}.")
        self.name = name or getattr(dataset.info, "dataset_name", None) or "the datasets.IterableDataset"
        self.dataset = dataset
        self.images_column = images_column
        self.messages_column = messages_column
        self.on_invalid = on_invalid
        _check_images_column(dataset.features, images_column, self.name)
        self.encoder = RowEncoder(processor, self.name, max_length)
        self.skipped: list[tuple[str, str, str]] = []

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        messages_column = None
        for index, row in enumerate(self.dataset):
            if messages_column is None:
                messages_column = _messages_column(list(row), self.messages_column, self.name)
                if self.images_column not in row:
                    raise ValueError(f"{self.name} has no volume column {self.images_column!r}: {list(row)}.")
            cell = row[self.images_column]
            try:
                record = self.encoder.record(row, index, messages_column, len(_as_sources(cell)))
                input_ids, labels = self.encoder.encode(record)
                pixel_values = self.encoder.volumes(record, cell)
            except InvalidRecordError as error:
                if self.on_invalid == "error":
                    raise
                self.skipped.append((_row_name(index, self.name), error.kind, str(error)))
                logger.warning("Skipped %s", error)
                continue
            yield {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}

    def set_epoch(self, epoch: int) -> None:
        """Passed on to the stream, so that `datasets`' shuffling buffer reshuffles each epoch (the Trainer calls it)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def records_to_dataset(
    path: str | Path,
    image_root: str | Path | None = None,
    image_token: str = "<image>",
    allow_outside_image_root: bool = False,
) -> "datasets.Dataset":
    """UMBRELLA or LLaVA record files (as [`ConversationDataset`] reads them) as a `datasets.Dataset` with the
    columns `id`, `task_type`, `messages` (as [`chat_example`] writes them), `images` (`List(Nifti())`, the volume
    files) and `metadata` (JSON text, since rows must share one schema).

    Share it with `records_to_dataset("train.jsonl", image_root=...).push_to_hub("you/brains", split="train")`:
    the `Nifti` feature embeds each file's bytes in the pushed Parquet files.

    Raises:
        InvalidRecordError / FileNotFoundError: naming the record and its file, as when the records are read for
            training (see `parse_record`).
    """
    datasets = require_datasets()
    rows = []
    for source, index, raw in read_raw_records(path):
        record = parse_record(raw, source, index, image_token, image_root, (), allow_outside_image_root)
        example = chat_example(record, image_token)
        rows.append(
            {
                "id": record.record_id,
                "task_type": record.task_type,
                "messages": example["messages"],
                "images": example["images"],
                "metadata": json.dumps(record.metadata, sort_keys=True),
            }
        )
    dataset = datasets.Dataset.from_list(rows)
    return dataset.cast_column("images", datasets.List(datasets.Nifti()))


def push_records_to_hub(
    files: dict[str, str | Path], repo_id: str, image_root: str | Path | None = None, **push_kwargs
) -> "datasets.DatasetDict":
    """Share record files as one `datasets` dataset on the Hub: a split per file (`{"train": "out/train.jsonl",
    ...}`), each as `records_to_dataset` builds it, so the volumes travel as `Nifti` bytes. `push_kwargs` go to
    `DatasetDict.push_to_hub` (`private=True`, `token=...`, `commit_message=...`). Returns the pushed dataset.

    Raises:
        ImportError: without the `datasets` extra.
        InvalidRecordError / FileNotFoundError: as `records_to_dataset`, before anything is uploaded.
    """
    datasets = require_datasets()
    splits = datasets.DatasetDict(
        {name: records_to_dataset(path, image_root=image_root) for name, path in files.items()}
    )
    splits.push_to_hub(repo_id, **push_kwargs)
    return splits


__all__ = [
    "IterableNiftiConversationDataset",
    "NiftiConversationDataset",
    "RowEncoder",
    "push_records_to_hub",
    "records_to_dataset",
    "require_datasets",
]
