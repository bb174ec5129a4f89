"""Conversation record formats: reading `.json` / `.jsonl` files and folders, and validating UMBRELLA and LLaVA
records into [`ConversationRecord`]s.

Two record formats are read, from a `.json` file (one record or a list), a `.jsonl` file, or a folder of them:

- UMBRELLA: `{"task_id", "task_type", "images": [{"path", "token", "modality"}], "conversations": [{"role",
  "content": [{"type": "text", "text"}, {"type": "image", "modality", "image_path"}]}], "metadata"}`.
- LLaVA: `{"id", "image": path or list, "conversations": [{"from": "human" | "gpt" | "system", "value"}]}`.

Placeholders and volumes: the k-th image placeholder of a conversation, in reading order, is the k-th volume of the
record's `images` (UMBRELLA) or `image` (LLaVA). A placeholder is an image content item or the image token (`<image>`)
written in text. An image item's `image_path`, when given, must name the same file as the volume it stands for; a
UMBRELLA record without `images` takes its volumes from its image items' `image_path`s. Relative paths are resolved
against `image_root`, or else the folder of the file the record came from.

What is refused (an `InvalidRecordError` naming the file and the line or entry): bytes that are not UTF-8 and text
that is not JSON (also JSON nested too deeply to parse), a wrapper object around the list of records, `conversations`
that is not a list of turns, both `images` and `image`, a turn whose `role` and `from` (or `content` and `value`)
disagree, a tokenizer's special token (`<|im_end|>`, `<|im_start|>`, ...) typed into message text, where it would
forge turn markers, and, when `image_root` is given, a volume path outside it unless `allow_outside_image_root`.
"""

import json
import operator
import os
import sys
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    # How errors name a record that did not come from a file (a row of a `datasets` dataset); `None` for files.
    location: str | None = None

    @property
    def where(self) -> str:
        if self.location is not None:
            return self.location
        return describe_record(self.record_id, self.source, self.index_in_source)


def describe_record(record_id: str, source: Path, index: int) -> str:
    """`record 'ID' (line N of FILE)` for a `.jsonl`, `(entry N of FILE)` otherwise: how every error names a record."""
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
            f"{describe_record(f'#{index}', source, index)} is a {type(raw).__name__}, not a record object.",
            "malformed",
        )
    record_id = raw_record_id(raw, index)
    where = describe_record(record_id, source, index)
    root = Path(image_root) if image_root is not None else source.parent

    messages = parse_messages(raw, where, special_tokens)

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
        if not (volume_path.is_file() or volume_path.is_dir()):  # a folder may hold a DICOM series
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


def parse_messages(raw: dict, where: str, special_tokens: Collection[str] = ()) -> list[dict[str, Any]]:
    """The turns of a raw record (`conversations`, in UMBRELLA or LLaVA form) as ChatML messages `{"role",
    "content"}`, checked: a list of known roles with text, no special token typed into text, an assistant turn.

    `where` names the record in every error; the record's volumes are not looked at (see `parse_record`).

    Raises:
        InvalidRecordError: for a wrapper object around records, `conversations` that is not a list of turns or
            is empty, a malformed or contradictory turn, an unknown role, a special token in text, or no
            assistant turn.
    """
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
    return messages


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


def raw_record_id(raw: Any, index: int) -> str:
    """The id a raw record is named by in messages: its `task_id` (UMBRELLA) or `id` (LLaVA), else `#index`."""
    return str(raw.get("task_id", raw.get("id", f"#{index}"))) if isinstance(raw, dict) else f"#{index}"


def volume_error(record: ConversationRecord, error: Exception) -> InvalidRecordError:
    """`error`, from a volume of `record` that cannot be read, as an `InvalidRecordError` naming the record and its
    file; its `kind` counts the skip."""
    kind = getattr(error, "kind", "missing volume" if isinstance(error, FileNotFoundError) else "unreadable volume")
    return InvalidRecordError(f"{record.where}: {error}", kind)
