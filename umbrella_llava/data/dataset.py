"""`ConversationDataset`: records from files as model inputs, tokens made once, volumes decoded when read."""

import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset, get_worker_info

from ..image_processing_umbrella_llava import InvalidVolumeError
from ..processing_umbrella_llava import UmbrellaLlavaProcessor
from ..volume_cache import VolumeCache
from .checks import problem_kind, scan_records, warn_skipped
from .collator import empty_volume_stack
from .records import ConversationRecord, InvalidRecordError, volume_error


class ConversationDataset(Dataset):
    r"""
    Conversation records (UMBRELLA or LLaVA) as model inputs with turn-masked labels.

    Every record is validated and tokenized at construction, so bad records surface before training; volumes are
    decoded lazily in `__getitem__` (through a [`VolumeCache`] when `cache_dir` is given), unless `check_volumes`
    decodes each of them once up front. A volume that fails in `__getitem__` is an `InvalidRecordError` naming the
    record, its file and the volume.

    Args:
        path: a `.json` file (one record or a list), a `.jsonl` file, or a folder of them.
        processor: the [`UmbrellaLlavaProcessor`] whose chat template, tokenizer and image processor are used.
        image_root: folder that relative volume paths are resolved against; defaults to each data file's folder.
        max_length: truncate token sequences to this length. Truncation may cut text, never an image-token block.
        on_invalid: `"error"` raises on the first invalid record (with `check_volumes`, on all of them at once);
            `"skip"` drops invalid records, and lines or files that do not parse, and reports how many, and why, in
            one warning (the details are in `dataset.skipped`).
        cache_dir: folder for preprocessed volumes, so later epochs do not decode NIfTI files again.
        allow_outside_image_root: accept volume paths that lead out of `image_root` (`../`, or absolute elsewhere);
            refused by default when `image_root` is given.
        check_volumes: decode every volume once now (with a progress bar, and into the cache), so that a bad file
            is an invalid record before training instead of an error hours in.
        preprocess_device: where volumes are preprocessed (`UmbrellaVolumeProcessor.preprocess_volume(device=)`):
            files are decoded on the CPU, the arithmetic runs on this device and `pixel_values` stay there. A GPU
            needs the items read in the main process (`dataloader_num_workers=0`); [`UmbrellaCollator`]'s
            `decode_threads` then decode a batch's files in parallel. `None`: the CPU.

    `dataset[i]` is a mapping `{"input_ids": (L,), "labels": (L,), "pixel_values": (n_i, C, H, W, D)}`, named as the
    model's forward parameters so the Trainer keeps them; its tokens were made at construction, its volumes are
    decoded when `pixel_values` is read (see [`ConversationItem`]). `dataset.lengths[i]` is its token length,
    `dataset.records[i]` holds the record (`task_type`, `record_id`, `metadata`, ...) and `dataset.task_types[i]` its
    task type (`None` for LLaVA records without a `task_type`).

    Raises:
        InvalidRecordError / FileNotFoundError: with `on_invalid="error"`, naming the record and its file (see
            [`parse_record`]); also for a record whose image-token block `max_length` would cut, that keeps no
            labeled token after truncation, or (with `check_volumes`) whose volume cannot be preprocessed. With
            `check_volumes`, one error lists every invalid record when there are several.
        ValueError: if no valid record remains.

    Warns:
        UserWarning: counting the records identical to an earlier one (kept), and the skipped records.
    """

    def __init__(
        self,
        path: str | Path,
        processor: UmbrellaLlavaProcessor,
        image_root: str | Path | None = None,
        max_length: int | None = None,
        on_invalid: Literal["error", "skip"] = "error",
        cache_dir: str | Path | None = None,
        allow_outside_image_root: bool = False,
        check_volumes: bool = False,
        preprocess_device: str | torch.device | None = None,
    ):
        if on_invalid not in ("error", "skip"):
            raise ValueError(f"`on_invalid` must be 'error' or 'skip', got {on_invalid!r}.")
        if max_length is not None and max_length < 1:
            raise ValueError(f"`max_length` must be positive, got {max_length}.")
        self.path = Path(path)
        self.processor = processor
        self.max_length = max_length
        self.volume_cache = VolumeCache(cache_dir) if cache_dir is not None else None
        self.preprocess_device = torch.device(preprocess_device) if preprocess_device is not None else None

        scan = scan_records(
            self.path,
            processor,
            image_root=image_root,
            max_length=max_length,
            allow_outside_image_root=allow_outside_image_root,
            stop_at_first=on_invalid == "error" and not check_volumes,
            load_volume=self.load_volume if check_volumes else None,
        )
        num_read = scan.num_read
        if scan.problems and on_invalid == "error":
            if len(scan.problems) == 1:
                raise scan.problems[0][1]
            raise InvalidRecordError(scan.describe_problems(self.path), "several")
        self.records: list[ConversationRecord] = scan.records
        # Tokenized once here; `__getitem__` hands these out and `lengths` is read off them.
        self.encodings: list[tuple[torch.Tensor, torch.Tensor]] = scan.encodings
        self.lengths: list[int] = scan.lengths
        self.skipped: list[tuple[str, str, str]] = [
            (where, problem_kind(error), str(error)) for where, error in scan.problems
        ]
        self.duplicates: list[tuple[str, str]] = scan.duplicates
        if self.duplicates:
            first, earlier = self.duplicates[0]
            warnings.warn(
                f"{len(self.duplicates)} of {num_read} records in {self.path} are identical to an earlier record; they "
                f"are kept, so each weighs more in training. First: {first} repeats {earlier}. See "
                "`dataset.duplicates` for all.",
                stacklevel=2,
            )
        warn_skipped(self.skipped, num_read, f"records in {self.path}")
        if not self.records:
            raise ValueError(f"No valid record in {self.path} ({num_read} read).")

    @property
    def task_types(self) -> list[str | None]:
        return [record.task_type for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def load_volume(self, path: Path) -> torch.Tensor:
        """One preprocessed volume `(C, H, W, D)`, through the cache when there is one.

        Raises:
            InvalidVolumeError / OSError: naming the file (see `UmbrellaVolumeProcessor.preprocess_volume`).
        """
        image_processor = self.processor.image_processor
        device = self.preprocess_device
        if device is not None and device.type != "cpu" and get_worker_info() is not None:
            raise RuntimeError(
                f"Volumes are preprocessed on {device}, which a DataLoader worker process cannot use: read the items "
                "in the main process (dataloader_num_workers=0; umbrella-train --dataloader_num_workers 0) and decode "
                "the files in threads (UmbrellaCollator(decode_threads=...); umbrella-train --decode_threads)."
            )
        if self.volume_cache is not None:
            return self.volume_cache.get(path, image_processor).to(device or "cpu", non_blocking=True)
        return image_processor.preprocess_volume(path, device=device)

    def __getitem__(self, index: int) -> "ConversationItem":
        input_ids, labels = self.encodings[index]
        return ConversationItem(self, index, input_ids, labels)

    def volumes(self, index: int) -> torch.Tensor:
        """The preprocessed volumes of record `index`, `(n_i, C, H, W, D)` (`n_i` may be 0).

        Raises:
            InvalidRecordError: naming the record, its file and the volume that cannot be preprocessed.
        """
        record = self.records[index]
        try:
            volumes = [self.load_volume(path) for path in record.volume_paths]
        except (InvalidVolumeError, OSError) as error:
            raise volume_error(record, error) from error
        if not volumes:
            return empty_volume_stack(self.processor.image_processor).to(self.preprocess_device or "cpu")
        return torch.stack(volumes)


ITEM_KEYS = ("input_ids", "labels", "pixel_values")


class ConversationItem(Mapping):
    """`dataset[i]`: `input_ids` and `labels` at once, `pixel_values` decoded when first read.

    The Trainer's `LengthGroupedSampler` (`--train_sampling_strategy group_by_length`) learns each sample's length by
    reading `processor.model_input_names[0]` (`input_ids`) off every item of a dataset that is not a
    `datasets.Dataset`; with the volumes deferred, that decodes none of them. `dataset` is any of the package's
    map-style datasets: what it needs is their `volumes(index)`.
    """

    def __init__(self, dataset: ConversationDataset, index: int, input_ids: torch.Tensor, labels: torch.Tensor):
        self._dataset, self._index = dataset, index
        self._values: dict[str, torch.Tensor] = {"input_ids": input_ids, "labels": labels}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key == "pixel_values" and key not in self._values:
            self._values[key] = self._dataset.volumes(self._index)
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(ITEM_KEYS)

    def __len__(self) -> int:
        return len(ITEM_KEYS)
