"""Hugging Face `datasets` with a `Nifti` volume column: the same batches as the JSONL records of the same data,
streaming, the stock Trainer and TRL's SFTTrainer, and bad rows named."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config
from packaging.version import Version
from test_trl import records as trl_records
from transformers import Trainer, TrainingArguments
from transformers import __version__ as transformers_version

from umbrella_llava import UmbrellaLlavaForConditionalGeneration
from umbrella_llava.data import (
    ConversationDataset,
    InvalidRecordError,
    IterableNiftiConversationDataset,
    NiftiConversationDataset,
    UmbrellaCollator,
    records_to_dataset,
)

datasets = pytest.importorskip("datasets")


def records() -> list[dict]:
    """test_trl's records (an UMBRELLA record with two volumes, T1 then GM, and two answers; a LLaVA one, WM; a
    text-only one), each with a task type, and metadata on the first."""
    raw = trl_records()
    for record, task in zip(raw, ("T2", "T1", "text")):
        record["task_type"] = task
    raw[0]["metadata"] = {"subject": "sub-01"}
    return raw


@pytest.fixture
def train_file(tmp_path, mni_volume_paths):
    for name, path in mni_volume_paths.items():
        shutil.copy(path, tmp_path / f"{name.lower()}.nii.gz")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records()))
    return path


def assert_same_batches(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def test_a_nifti_column_gives_the_batches_of_the_jsonl_records(tiny_processor, train_file):
    from_files = ConversationDataset(train_file, tiny_processor)
    table = records_to_dataset(train_file)
    assert isinstance(table.features["images"].feature, datasets.Nifti)
    assert table["id"] == ["t2-0001", "llava-1", "llava-2"]
    from_table = NiftiConversationDataset(table, tiny_processor)

    collator = UmbrellaCollator(tiny_processor)
    expected = collator([from_files[i] for i in range(3)])
    batch = collator([from_table[i] for i in range(3)])
    assert_same_batches(batch, expected)
    assert batch["num_images_per_sample"].tolist() == [2, 1, 0]
    # The volumes are the right ones, in order: T1 and GM differ, so a swap would show.
    assert not torch.equal(batch["pixel_values"][0, 0], batch["pixel_values"][0, 1])
    assert from_table.task_types == ["T2", "T1", "text"]
    assert from_table.records[0].metadata == {"subject": "sub-01"}
    assert from_table.lengths == from_files.lengths


def test_embedded_nifti_bytes_decode_to_the_same_volumes(tiny_processor, train_file, tmp_path):
    # What a dataset pulled from the Hub holds: the files' bytes, no path on this machine.
    table = records_to_dataset(train_file)
    plain = table.cast_column("images", datasets.List(datasets.Nifti(decode=False)))
    embedded = datasets.Dataset.from_dict(
        {
            "messages": plain["messages"],
            "images": [
                [{"bytes": open(v["path"], "rb").read(), "path": None} for v in row] for row in plain["images"]
            ],
        }
    ).cast_column("images", datasets.List(datasets.Nifti()))
    expected = NiftiConversationDataset(table, tiny_processor)
    from_bytes = NiftiConversationDataset(embedded, tiny_processor)
    undecoded = NiftiConversationDataset(plain, tiny_processor)
    for index in range(3):
        assert torch.equal(from_bytes[index]["pixel_values"], expected[index]["pixel_values"])
        assert torch.equal(undecoded[index]["pixel_values"], expected[index]["pixel_values"])


def test_a_streaming_dataset_yields_the_same_items(tiny_processor, train_file):
    table = records_to_dataset(train_file)
    stream = IterableNiftiConversationDataset(table.to_iterable_dataset(num_shards=3), tiny_processor)
    expected = NiftiConversationDataset(table, tiny_processor)
    items = list(stream)
    assert len(items) == 3
    for index, item in enumerate(items):
        for key in ("input_ids", "labels", "pixel_values"):
            assert torch.equal(item[key], expected[index][key]), (index, key)


def test_the_stock_trainer_trains_on_both_dataset_kinds(tiny_processor, tokenizer, train_file, tmp_path):
    table = records_to_dataset(train_file)
    for kind, train_dataset in (
        ("map", NiftiConversationDataset(table, tiny_processor)),
        ("stream", IterableNiftiConversationDataset(table.to_iterable_dataset(), tiny_processor)),
    ):
        torch.manual_seed(0)
        model = UmbrellaLlavaForConditionalGeneration(tiny_config(tokenizer))
        embedder = model.model.vision_tower.embeddings
        before = [p.detach().clone() for p in embedder.parameters()]
        args = TrainingArguments(
            output_dir=str(tmp_path / kind),
            per_device_train_batch_size=3,
            max_steps=2,
            learning_rate=1e-3,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=train_dataset, data_collator=UmbrellaCollator(tiny_processor)
        )
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), kind
        assert any(not torch.equal(p, b) for p, b in zip(embedder.parameters(), before)), kind


@pytest.mark.skipif(
    Version(transformers_version) < Version("5.18"),
    reason="TRL's assistant_only_loss on vision data needs transformers 5.18 (see test_trl.py)",
)
def test_sft_trainer_takes_a_nifti_dataset_unchanged(tiny_processor, tokenizer, train_file, tmp_path):
    trl = pytest.importorskip("trl")
    table = records_to_dataset(train_file).select_columns(["messages", "images"])
    torch.manual_seed(0)
    model = UmbrellaLlavaForConditionalGeneration(tiny_config(tokenizer))
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        assistant_only_loss=True,
        per_device_train_batch_size=3,
        max_steps=1,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=table, processing_class=tiny_processor)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    ours = UmbrellaCollator(tiny_processor)([NiftiConversationDataset(table, tiny_processor)[i] for i in range(3)])
    assert torch.equal(batch["pixel_values"], ours["pixel_values"])
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


def test_bad_rows_are_named(tiny_processor, train_file, mni_volume_paths, tmp_path):
    table = records_to_dataset(train_file)
    # One placeholder too many in row 1: named by its id and row.
    messages = [row["messages"] for row in table.select_columns(["messages"])]
    messages[1][0]["content"].insert(0, {"type": "image", "text": None})
    mismatched = table.remove_columns("messages").add_column("messages", messages)
    with pytest.raises(InvalidRecordError, match=r"record 'llava-1' \(row 1 of .*\) has 2 image placeholders .* 1"):
        NiftiConversationDataset(mismatched, tiny_processor)
    with pytest.warns(UserWarning, match=r"Skipped 1 of 3 rows .*placeholder mismatch: 1"):
        skipping = NiftiConversationDataset(mismatched, tiny_processor, on_invalid="skip")
    assert len(skipping) == 2 and [kind for _, kind, _ in skipping.skipped] == ["placeholder mismatch"]

    # A volume that is not a NIfTI: named by row and volume when its pixels are read, in both kinds.
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(b"not a nifti at all" * 40)
    broken = datasets.Dataset.from_dict(
        {"messages": [table["messages"][1]], "images": [[str(garbage)]]},
    )
    item = NiftiConversationDataset(broken, tiny_processor)[0]
    with pytest.raises(InvalidRecordError, match=r"row 0 of .*volume 0 .*garbage\.nii"):
        item["pixel_values"]
    with pytest.raises(InvalidRecordError, match=r"row 0 of .*volume 0 .*garbage\.nii"):
        list(IterableNiftiConversationDataset(broken.to_iterable_dataset(), tiny_processor))

    # A volume column of another feature is refused at construction, naming the column.
    numbers = datasets.Dataset.from_dict({"messages": [table["messages"][1]], "images": [[1.0]]})
    with pytest.raises(ValueError, match=r"volume column 'images' has the feature"):
        NiftiConversationDataset(numbers, tiny_processor)
    with pytest.raises(ValueError, match=r"no volume column 'volumes'"):
        NiftiConversationDataset(table, tiny_processor, images_column="volumes")


def test_without_the_extra_the_error_names_it(tmp_path):
    from conftest import import_blocker

    code = import_blocker("datasets") + (
        "from umbrella_llava.data import NiftiConversationDataset\n"
        "try:\n    NiftiConversationDataset(None, None)\n"
        "except ImportError as error:\n    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pip install 'umbrella_llava[datasets]'" in result.stdout
