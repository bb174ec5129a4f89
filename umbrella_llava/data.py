"""Conversation datasets with turn-masked labels, and the collator that batches them for the stock Trainer.

Two record formats are read, from a `.json` file (one record or a list), a `.jsonl` file, or a folder of them:

- UMBRELLA: `{"task_id", "task_type", "images": [{"path", "token", "modality"}], "conversations": [{"role",
  "content": [{"type": "text", "text"}, {"type": "image", "modality", "image_path"}]}], "metadata"}`.
- LLaVA: `{"id", "image": path or list, "conversations": [{"from": "human" | "gpt" | "system", "value"}]}`.

Placeholders and volumes: the k-th image placeholder of a conversation, in reading order, is the k-th volume of the
record's `images` (UMBRELLA) or `image` (LLaVA). A placeholder is an image content item or the image token (`<image>`)
written in text. An image item's `image_path`, when given, must name the same file as the volume it stands for; a
UMBRELLA record without `images` takes its volumes from its image items' `image_path`s. Relative paths are resolved
against `image_root`, or else the folder of the file the record came from.

What is refused (an `InvalidRecordError` naming the file and the line or entry, or a counted skip with
`on_invalid="skip"`): bytes that are not UTF-8 and text that is not JSON (also JSON nested too deeply to parse), a
wrapper object around the list of records, `conversations` that is not a list of turns, both `images` and `image`,
a turn whose `role` and `from` (or `content` and `value`) disagree, a tokenizer's special token (`<|im_end|>`,
`<|im_start|>`, ...) typed into message text, where it would forge turn markers, and, when `image_root` is given, a
volume path outside it unless `allow_outside_image_root`. Records identical to an earlier one are kept with one
warning that counts them.
"""

import json
import operator
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers.utils.chat_template_utils import render_jinja_template

from .image_processing_umbrella_llava import InvalidVolumeError, stack_volumes
from .processing_umbrella_llava import UmbrellaLlavaProcessor, drop_volume_inputs_without_volumes
from .volume_cache import VolumeCache

IGNORE_INDEX = -100
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


class InvalidRecordError(ValueError):
    """A conversation record that cannot be trained on; `kind` is a short reason, used to count skipped records."""

    def __init__(self, message: str, kind: str, where: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.where = where


@dataclass
class ConversationRecord:
    """One validated record, in ChatML messages, with its volumes resolved to absolute paths."""

    record_id: str
    source: Path
    index_in_source: int
    task_type: str | None
    messages: list[dict[str, Any]]
    volume_paths: list[Path]
    modalities: list[str | None]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return _describe(self.record_id, self.source, self.index_in_source)


def _describe(record_id: str, source: Path, index: int) -> str:
    position = f"line {index + 1}" if source.suffix == ".jsonl" else f"entry {index}"
    return f"record '{record_id}' ({position} of {source})"


def read_raw_records(
    path: str | Path, errors: list[InvalidRecordError] | None = None
) -> Iterator[tuple[Path, int, Any]]:
    """Yield `(file, index in file (0-based; JSONL: line - 1), raw record)` from a `.json` (a record or a list), a `.jsonl`, or a folder.

    Args:
        errors: if given, a file (or JSONL line) that cannot be decoded is appended to it and reading goes on with the
            next; if `None`, it is raised.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: for another suffix.
        InvalidRecordError: (a ValueError) naming the file and line, for bytes that are not UTF-8, text that is not
            JSON, or JSON nested too deeply to parse.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Conversation data not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl"))
        if not files:
            raise ValueError(f"Folder {path} holds no .json or .jsonl files.")
    elif path.suffix in (".json", ".jsonl"):
        files = [path]
    else:
        raise ValueError(f"Conversation data must be a .json or .jsonl file or a folder of them, got {path}.")

    for file in files:
        content = file.read_bytes()
        if file.suffix == ".jsonl":
            for line_number, line in enumerate(content.split(b"\n"), start=1):
                if not line.strip():
                    continue
                try:
                    raw = decode_json(line, f"{file}, line {line_number}")
                except InvalidRecordError as error:
                    if errors is None:
                        raise
                    errors.append(error)
                    continue
                yield file, line_number - 1, raw
        else:
            try:
                data = decode_json(content, str(file))
            except InvalidRecordError as error:
                if errors is None:
                    raise
                errors.append(error)
                continue
            for index, raw in enumerate(data if isinstance(data, list) else [data]):
                yield file, index, raw


def decode_json(content: bytes, where: str) -> Any:
    """Parse UTF-8 JSON `content`; every failure is an `InvalidRecordError` that starts with `where` and gives the
    line within `content`."""
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = content.count(b"\n", 0, error.start) + 1
        raise InvalidRecordError(
            f"{where}: byte {content[error.start]:#04x} (line {line} of it, byte {error.start}) is not UTF-8 "
            f"({error.reason}); re-save the file as UTF-8.",
            "not UTF-8",
            where,
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidRecordError(
            f"{where}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno} of it).",
            "not JSON",
            where,
        ) from None
    except RecursionError:
        raise InvalidRecordError(
            f"{where}: JSON nested deeper than Python's parser can read (about {sys.getrecursionlimit()} levels of "
            "[ or {); no conversation record is that deep, so the file is damaged or not conversation data.",
            "not JSON",
            where,
        ) from None


def parse_record(
    raw: Any,
    source: Path,
    index: int,
    image_token: str = "<image>",
    image_root: str | Path | None = None,
    special_tokens: Collection[str] = (),
    allow_outside_image_root: bool = False,
) -> ConversationRecord:
    """Validate one raw UMBRELLA or LLaVA record and turn it into a [`ConversationRecord`].

    The checks are cheap (no volume is decoded): structure, roles, an assistant turn, placeholders against volumes,
    and that every volume file exists.

    Args:
        special_tokens: texts that may not appear in a message (the tokenizer's special tokens but the image token):
            typed into a user's text, `<|im_end|>` and `<|im_start|>` would become real turn markers.
        allow_outside_image_root: accept volume paths that lead out of `image_root` (`../`, or absolute elsewhere).
            Only checked when `image_root` is given.

    Raises:
        InvalidRecordError: naming the record and file, for a malformed record, an unknown role, an empty
            conversation, no assistant turn, placeholders that disagree with the volumes, contradictory keys, a
            special token in message text, or a path outside `image_root`.
        FileNotFoundError: naming the record, file and path, for a volume that does not exist.
    """
    if not isinstance(raw, dict):
        raise InvalidRecordError(
            f"{_describe(f'#{index}', source, index)} is a {type(raw).__name__}, not a record object.", "malformed"
        )
    record_id = _record_id(raw, index)
    where = _describe(record_id, source, index)
    root = Path(image_root) if image_root is not None else source.parent

    turns = raw.get("conversations")
    if "conversations" not in raw:
        wrapped = [key for key, value in raw.items() if isinstance(value, list) and value and _all_records(value)]
        if wrapped:
            raise InvalidRecordError(
                f"{where} is an object holding a list of records under {wrapped[0]!r}, not a record; write the list "
                "itself at the top level of the file (or one record per line of a .jsonl).",
                "wrapped records",
            )
    if isinstance(turns, str):
        raise InvalidRecordError(
            f"{where} has `conversations` as a string, not a list of turns (was it JSON-encoded twice?); write it "
            "as a JSON list of turn objects.",
            "malformed",
        )
    if turns is not None and not isinstance(turns, list):
        raise InvalidRecordError(
            f"{where} has `conversations` of type {type(turns).__name__}; it must be a list of turns.", "malformed"
        )
    if not turns:
        raise InvalidRecordError(f"{where} has no conversation turns.", "empty conversation")
    messages = [_parse_turn(turn, turn_index, where, special_tokens) for turn_index, turn in enumerate(turns)]
    if not any(message["role"] == "assistant" for message in messages):
        raise InvalidRecordError(
            f"{where} has no assistant turn: there is nothing to learn, and an all -100 label row gives a NaN loss.",
            "no assistant turn",
        )

    placeholders = _placeholder_paths(messages, image_token)
    volume_entries = _volume_entries(raw, where)
    if volume_entries is None:
        volume_entries = [{"path": path} for path in placeholders if path is not None]
    for entry in volume_entries:
        token = entry.get("token", image_token)
        if token != image_token:
            raise InvalidRecordError(
                f"{where} marks a volume with the token {token!r}, but the processor's image placeholder is "
                f"{image_token!r}.",
                "placeholder mismatch",
            )
    volume_paths = [_resolve(entry["path"], root) for entry in volume_entries]
    if image_root is not None and not allow_outside_image_root:
        inside = os.path.normpath(os.path.abspath(root))
        for volume_path in volume_paths:
            resolved = os.path.normpath(os.path.abspath(volume_path))
            if os.path.commonpath([inside, resolved]) != inside:
                raise InvalidRecordError(
                    f"{where} names volume {volume_path}, which is outside image_root {root}; move it under the "
                    "root, or allow it with allow_outside_image_root=True (train.py: --allow_outside_image_root).",
                    "outside image_root",
                )
    if len(placeholders) != len(volume_paths):
        raise InvalidRecordError(
            f"{where} has {len(placeholders)} image placeholders in its conversation but {len(volume_paths)} volumes; "
            "each volume needs exactly one placeholder.",
            "placeholder mismatch",
        )
    for position, (item_path, volume_path) in enumerate(zip(placeholders, volume_paths)):
        if item_path is not None and _resolve(item_path, root) != volume_path:
            raise InvalidRecordError(
                f"{where}: image placeholder {position} names {item_path}, but volume {position} of the record is "
                f"{volume_path}; placeholders map to volumes in order.",
                "placeholder mismatch",
            )
    for volume_path in volume_paths:
        if not volume_path.is_file():
            raise FileNotFoundError(f"{where} names volume {volume_path}, which does not exist.")

    return ConversationRecord(
        record_id=record_id,
        source=source,
        index_in_source=index,
        task_type=raw.get("task_type"),
        messages=messages,
        volume_paths=volume_paths,
        modalities=[entry.get("modality") for entry in volume_entries],
        metadata=raw.get("metadata") or {},
    )


def _same_role(first: Any, second: Any) -> bool:
    if isinstance(first, str) and isinstance(second, str):
        return ROLE_ALIASES.get(first, first) == ROLE_ALIASES.get(second, second)
    return first == second


def _all_records(values: list) -> bool:
    return all(isinstance(value, dict) and "conversations" in value for value in values)


def _parse_turn(turn: Any, turn_index: int, where: str, special_tokens: Collection[str] = ()) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise InvalidRecordError(f"{where}: turn {turn_index} is not an object.", "malformed")
    for key, alias, same in (("role", "from", _same_role), ("content", "value", operator.eq)):
        if key in turn and alias in turn and not same(turn[key], turn[alias]):
            raise InvalidRecordError(
                f"{where}: turn {turn_index} has {key}={turn[key]!r} but {alias}={turn[alias]!r}; one of them would "
                "be ignored. Keep one of the two keys.",
                "contradiction",
            )
    role = turn.get("role", turn.get("from"))
    if role not in ROLE_ALIASES:
        raise InvalidRecordError(
            f"{where}: turn {turn_index} has unknown role {role!r}; expected one of {sorted(ROLE_ALIASES)}.",
            "unknown role",
        )
    content = turn["content"] if "content" in turn else turn.get("value")
    if isinstance(content, list):
        for item in content:
            if not (
                isinstance(item, dict)
                and (item.get("type") == "image" or (item.get("type") == "text" and isinstance(item.get("text"), str)))
            ):
                raise InvalidRecordError(
                    f"{where}: turn {turn_index} has content item {item!r}; expected "
                    '{"type": "text", "text": ...} or {"type": "image", ...}.',
                    "malformed",
                )
    elif not isinstance(content, str):
        raise InvalidRecordError(f"{where}: turn {turn_index} has no text (`content` or `value`).", "malformed")
    texts = [content] if isinstance(content, str) else [item["text"] for item in content if item["type"] == "text"]
    for token in special_tokens:
        if any(token in text for text in texts):
            raise InvalidRecordError(
                f"{where}: turn {turn_index} has the special token {token!r} in its text. The chat template would "
                "turn it into a real control token, so the text could forge turns; remove it from the data.",
                "special token in text",
            )
    return {"role": ROLE_ALIASES[role], "content": content}


def _volume_entries(raw: dict, where: str) -> list[dict[str, Any]] | None:
    """The record's volumes as `{"path", ...}` dicts, or `None` when the record lists none."""
    if "images" in raw and "image" in raw:
        raise InvalidRecordError(
            f"{where} has both `images` (UMBRELLA) and `image` (LLaVA); one of them would be ignored. Keep one.",
            "contradiction",
        )
    entries = raw["images"] if "images" in raw else raw.get("image")
    if entries is None:
        return None
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list):
        raise InvalidRecordError(f"{where}: `images`/`image` must be a path or a list.", "malformed")
    entries = [{"path": entry} if isinstance(entry, str) else entry for entry in entries]
    for entry in entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)):
            raise InvalidRecordError(f"{where}: volume entry {entry!r} has no `path`.", "malformed")
    return entries


def _placeholder_paths(messages: list[dict[str, Any]], image_token: str) -> list[str | None]:
    """One entry per image placeholder in reading order: an image item's `image_path`, or `None`."""
    placeholders = []
    for message in messages:
        content = message["content"]
        for item in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if item["type"] == "image":
                placeholders.append(item.get("image_path"))
            else:
                placeholders.extend([None] * item["text"].count(image_token))
    return placeholders


def _resolve(path: str, root: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else root / path


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


def chat_example(record: ConversationRecord, image_token: str = "<image>") -> dict[str, Any]:
    """`record` as a row of a conversational vision dataset, the form TRL's `SFTTrainer` (and
    `processor.apply_chat_template`) take: `{"messages": [...], "images": [volume paths as str]}`.

    Every placeholder becomes an `{"type": "image"}` item, filled in reading order from `images`; a placeholder typed
    into a string (LLaVA records) loses the newline right after it, which the chat template writes back, so both
    record formats render as `tokenize_conversation` renders them (a placeholder followed by other text than a
    newline gains one). Only `type` and `text` of an item are kept, so that rows share one schema in a
    `datasets.Dataset`.
    """
    messages = []
    for message in record.messages:
        content = message["content"]
        if isinstance(content, str):
            items = []
            for index, text in enumerate(content.split(image_token)):
                if index:
                    items.append({"type": "image"})
                    text = text.removeprefix("\n")
                if text:
                    items.append({"type": "text", "text": text})
        else:
            items = [
                {"type": "image"} if item["type"] == "image" else {"type": "text", "text": item["text"]}
                for item in content
            ]
        messages.append({"role": message["role"], "content": items})
    return {"messages": messages, "images": [str(path) for path in record.volume_paths]}


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
        where = _describe(_record_id(raw, index), source, index)
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
            scan.problems.append((record.where, _volume_error(record, failures[bad[0]])))
        else:
            scan.records.append(record)
            scan.encodings.append(encoding)


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
    ):
        if on_invalid not in ("error", "skip"):
            raise ValueError(f"`on_invalid` must be 'error' or 'skip', got {on_invalid!r}.")
        if max_length is not None and max_length < 1:
            raise ValueError(f"`max_length` must be positive, got {max_length}.")
        self.path = Path(path)
        self.processor = processor
        self.max_length = max_length
        self.volume_cache = VolumeCache(cache_dir) if cache_dir is not None else None

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
        if self.skipped:
            counts = Counter(kind for _, kind, _ in self.skipped)
            reasons = ", ".join(f"{kind}: {count}" for kind, count in sorted(counts.items()))
            warnings.warn(
                f"Skipped {len(self.skipped)} of {num_read} records in {self.path} ({reasons}). First: "
                f"{self.skipped[0][2]} See `dataset.skipped` for all.",
                stacklevel=2,
            )
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
        if self.volume_cache is not None:
            return self.volume_cache.get(path, image_processor)
        return image_processor.preprocess_volume(path)

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
            raise _volume_error(record, error) from error
        return torch.stack(volumes) if volumes else _no_volumes(self.processor.image_processor)


ITEM_KEYS = ("input_ids", "labels", "pixel_values")


class ConversationItem(Mapping):
    """`dataset[i]`: `input_ids` and `labels` at once, `pixel_values` decoded when first read.

    The Trainer's `LengthGroupedSampler` (`--train_sampling_strategy group_by_length`) learns each sample's length by
    reading `processor.model_input_names[0]` (`input_ids`) off every item of a dataset that is not a
    `datasets.Dataset`; with the volumes deferred, that decodes none of them.
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


def _volume_error(record: ConversationRecord, error: Exception) -> InvalidRecordError:
    kind = getattr(error, "kind", "missing volume" if isinstance(error, FileNotFoundError) else "unreadable volume")
    return InvalidRecordError(f"{record.where}: {error}", kind)


def _record_id(raw: Any, index: int) -> str:
    return str(raw.get("task_id", raw.get("id", f"#{index}"))) if isinstance(raw, dict) else f"#{index}"


def _no_volumes(image_processor) -> torch.Tensor:
    """An empty `(0, C, H, W, D)` stack, for a sample without volumes."""
    return torch.zeros(0, image_processor.volume_channels, *image_processor.volume_size)


class UmbrellaCollator:
    r"""
    Batches [`ConversationDataset`] items into the model's forward inputs.

    Token sequences are padded to the longest in the batch (rounded up to `pad_to_multiple_of`): `input_ids` with the
    tokenizer's pad token, `attention_mask` with 0, `labels` with -100. Volumes are stacked into
    `pixel_values (B, max_n, C, H, W, D)` with `image_mask (B, max_n)` and `num_images_per_sample (B,)`; a batch in
    which no sample has a volume carries none of these three keys, which the model reads as text-only.

    Args:
        processor: the [`UmbrellaLlavaProcessor`] (its tokenizer gives the pad token).
        pad_to_multiple_of: round the padded length up to a multiple of this.
        padding_side: `"right"` by default: in training every sequence then starts at position 0 and the pads trail
            behind the labels. `None` follows the tokenizer's `padding_side` (which is left for generation).

    Returns (from `__call__`):
        `dict` with `input_ids (B, L)`, `attention_mask (B, L)`, `labels (B, L)` when the items have labels, and the
        volume inputs above; it goes straight into `model(**batch)`.
    """

    def __init__(
        self,
        processor: UmbrellaLlavaProcessor,
        pad_to_multiple_of: int | None = None,
        padding_side: Literal["left", "right"] | None = "right",
    ):
        tokenizer = processor.tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token` before batching.")
        self.processor = processor
        self.pad_token_id = tokenizer.pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
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
        volumes = [
            feature["pixel_values"] if "pixel_values" in feature else _no_volumes(self.processor.image_processor)
            for feature in features
        ]
        batch.update(drop_volume_inputs_without_volumes(stack_volumes(volumes)))
        return batch


__all__ = [
    "IGNORE_INDEX",
    "ConversationDataset",
    "ConversationRecord",
    "InvalidRecordError",
    "UmbrellaCollator",
    "RecordScan",
    "chat_example",
    "encode_record",
    "parse_record",
    "read_raw_records",
    "scan_records",
    "tokenize_conversation",
]
