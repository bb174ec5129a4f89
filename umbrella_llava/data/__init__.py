"""Conversation data: from records on disk to batches the stock `Trainer` takes.

One job per file, in the order the data travels:

- `records.py`: UMBRELLA and LLaVA record formats read from `.json` / `.jsonl` files and folders, validated into
  [`ConversationRecord`]s (bad input is an `InvalidRecordError` naming the file and line).
- `labels.py`: a conversation rendered with the chat template and tokenized with turn-masked labels.
- `checks.py`: a whole data set read once (every problem collected, duplicates found, volumes optionally decoded).
- `dataset.py`: [`ConversationDataset`], records from files as model inputs.
- `collator.py`: [`UmbrellaCollator`], items batched into `input_ids`, `labels`, `pixel_values` and `image_mask`.
- `hf_datasets.py`: Hugging Face `datasets` with a `Nifti` volume column (map-style and streaming) as the same
  items, and record files as such a dataset for `push_to_hub` (the `datasets` extra, imported when first used).

Every public name is importable from `umbrella_llava.data` itself (those of `hf_datasets.py` import `datasets` only
when used).
"""

from .checks import RecordScan, problem_kind, scan_records, text_special_tokens
from .collator import UmbrellaCollator, empty_volume_stack
from .dataset import ITEM_KEYS, ConversationDataset, ConversationItem
from .hf_datasets import IterableNiftiConversationDataset, NiftiConversationDataset, records_to_dataset
from .labels import IGNORE_INDEX, encode_record, tokenize_conversation
from .records import (
    ROLE_ALIASES,
    ConversationRecord,
    InvalidRecordError,
    _placeholder_paths,  # noqa: F401 (read by evaluation.py)
    chat_example,
    decode_json,
    parse_record,
    read_raw_records,
    volume_error,
)

__all__ = [
    "IGNORE_INDEX",
    "ITEM_KEYS",
    "ROLE_ALIASES",
    "ConversationDataset",
    "ConversationItem",
    "ConversationRecord",
    "InvalidRecordError",
    "IterableNiftiConversationDataset",
    "NiftiConversationDataset",
    "RecordScan",
    "UmbrellaCollator",
    "chat_example",
    "decode_json",
    "empty_volume_stack",
    "encode_record",
    "parse_record",
    "problem_kind",
    "read_raw_records",
    "records_to_dataset",
    "scan_records",
    "text_special_tokens",
    "tokenize_conversation",
    "volume_error",
]
