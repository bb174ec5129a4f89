"""Reading a whole data set once: every record validated and tokenized, every problem collected with where it is,
duplicates found, and (optionally) every volume decoded once. Shared by `ConversationDataset`, `umbrella-check-data`
and `umbrella-train --check_data`."""

import json
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..image_processing_umbrella_llava import InvalidVolumeError
from ..processing_umbrella_llava import UmbrellaLlavaProcessor
from .labels import encode_record
from .records import (
    ConversationRecord,
    InvalidRecordError,
    describe_record,
    parse_record,
    raw_record_id,
    read_raw_records,
    volume_error,
)


def text_special_tokens(processor: UmbrellaLlavaProcessor) -> list[str]:
    """The tokenizer's special tokens that may not be typed into message text: all but the image placeholder."""
    tokenizer = processor.tokenizer
    special = {*tokenizer.all_special_tokens}
    special |= {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    return sorted(special - {processor.image_token})


@dataclass
class RecordScan:
    """What reading a data set found: the valid records and their tokens `(input_ids (L,), labels (L,))`, the invalid
    records, lines and files as `(where, error)` in reading order, and the records identical to an earlier one as
    `(where, earlier)`."""

    records: list[ConversationRecord]
    encodings: list[tuple[torch.Tensor, torch.Tensor]]
    problems: list[tuple[str, Exception]]
    duplicates: list[tuple[str, str]]
    num_read: int

    @property
    def lengths(self) -> list[int]:
        """Token length of each valid record."""
        return [len(input_ids) for input_ids, _ in self.encodings]

    def describe_problems(self, path: str | Path, limit: int = 50) -> str:
        """One message listing the problems (the first `limit`), one line each."""
        listed = "".join(f"\n  - {error}" for _, error in self.problems[:limit])
        more = f"\n  ... and {len(self.problems) - limit} more" if len(self.problems) > limit else ""
        return f"{len(self.problems)} invalid records in {path}:{listed}{more}"


def warn_skipped(skipped: list[tuple[str, str, str]], num_read: int, what: str, stacklevel: int = 3) -> None:
    """One warning counting the skipped `(where, kind, message)` entries by kind, with the first message: `what` says
    what was read (`"records in train.jsonl"`, `"rows of the dataset"`)."""
    if not skipped:
        return
    counts = Counter(kind for _, kind, _ in skipped)
    reasons = ", ".join(f"{kind}: {count}" for kind, count in sorted(counts.items()))
    warnings.warn(
        f"Skipped {len(skipped)} of {num_read} {what} ({reasons}). First: {skipped[0][2]} See `dataset.skipped` for "
        "all.",
        stacklevel=stacklevel,
    )


def problem_kind(error: Exception) -> str:
    """The short reason a problem of a `RecordScan` is counted under."""
    return getattr(error, "kind", None) or ("missing volume" if isinstance(error, FileNotFoundError) else "invalid")


def scan_records(
    path: str | Path,
    processor: UmbrellaLlavaProcessor,
    image_root: str | Path | None = None,
    max_length: int | None = None,
    allow_outside_image_root: bool = False,
    stop_at_first: bool = False,
    load_volume: Callable[[Path], torch.Tensor] | None = None,
) -> RecordScan:
    """Read, validate and tokenize every record of `path` (see [`parse_record`], [`encode_record`]).

    Args:
        stop_at_first: raise the first problem instead of collecting them all.
        load_volume: if given, every distinct volume of the valid records is decoded once with it (with a progress
            bar), and the records with a volume that fails become problems.

    Raises:
        FileNotFoundError / ValueError: for a missing path or a wrong suffix; with `stop_at_first`, the first
            `InvalidRecordError` or missing volume.
    """
    special_tokens = text_special_tokens(processor)
    undecodable: list[InvalidRecordError] = []
    scan = RecordScan(records=[], encodings=[], problems=[], duplicates=[], num_read=0)
    first_seen: dict[str, str] = {}
    for source, index, raw in read_raw_records(path, errors=None if stop_at_first else undecodable):
        scan.num_read += 1
        where = describe_record(raw_record_id(raw, index), source, index)
        try:
            record = parse_record(
                raw, source, index, processor.image_token, image_root, special_tokens, allow_outside_image_root
            )
            encoding = encode_record(processor, record, max_length)
        except (InvalidRecordError, FileNotFoundError) as error:
            if stop_at_first:
                raise
            scan.problems.append((where, error))
            continue
        scan.records.append(record)
        scan.encodings.append(encoding)
        key = json.dumps(raw, sort_keys=True)
        if key in first_seen:
            scan.duplicates.append((where, first_seen[key]))
        else:
            first_seen[key] = where
    scan.num_read += len(undecodable)
    scan.problems[:0] = [(error.where, error) for error in undecodable]
    if load_volume is not None:
        _check_volumes(scan, load_volume, Path(path).name)
    return scan


def _check_volumes(scan: RecordScan, load_volume: Callable[[Path], torch.Tensor], name: str) -> None:
    """Decode every distinct volume of `scan.records` once; move the records with a bad volume to the problems."""
    paths = sorted({path for record in scan.records for path in record.volume_paths})
    failures: dict[Path, Exception] = {}
    for path in tqdm(paths, desc=f"Checking the volumes of {name}", unit="volume"):
        try:
            load_volume(path)
        except (InvalidVolumeError, OSError) as error:
            failures[path] = error
    kept = list(zip(scan.records, scan.encodings))
    scan.records, scan.encodings = [], []
    for record, encoding in kept:
        bad = [path for path in record.volume_paths if path in failures]
        if bad:
            scan.problems.append((record.where, volume_error(record, failures[bad[0]])))
        else:
            scan.records.append(record)
            scan.encodings.append(encoding)
