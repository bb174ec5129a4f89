"""ConversationDataset and UmbrellaCollator on real brain volumes: both record formats, turn-masked labels, bad
records, truncation, batching, and the collator's output in the model."""

import inspect
import json
import shutil

import pytest
import torch
from conftest import tiny_config

from umbrella_llava.data import (
    IGNORE_INDEX,
    ConversationDataset,
    InvalidRecordError,
    UmbrellaCollator,
    tokenize_conversation,
)


def umbrella_t1() -> dict:
    return {
        "task_id": "t1-sub01",
        "task_type": "T1",
        "images": [{"path": "t1.nii.gz", "token": "<image>", "modality": "T1"}],
        "conversations": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "modality": "T1", "image_path": "t1.nii.gz"},
                    {"type": "text", "text": "Is this a T1-weighted brain MRI?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
        ],
        "metadata": {"subject": "sub01"},
    }


def umbrella_t2() -> dict:
    return {
        "task_id": "t2-sub01",
        "task_type": "T2",
        "images": [
            {"path": "t1.nii.gz", "token": "<image>", "modality": "T1"},
            {"path": "gm.nii.gz", "token": "<image>", "modality": "GM"},
        ],
        "conversations": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "modality": "T1", "image_path": "t1.nii.gz"},
                    {"type": "image", "modality": "GM", "image_path": "gm.nii.gz"},
                    {"type": "text", "text": "Which scan is brighter?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "The first."}]},
        ],
    }


def umbrella_t3() -> dict:
    return {
        "task_id": "t3-sub01-sub02",
        "task_type": "T3",
        "images": [
            {"path": "t1.nii.gz", "token": "<image>", "modality": "T1"},
            {"path": "wm.nii.gz", "token": "<image>", "modality": "T1"},
        ],
        "conversations": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "This is the reference scan:"},
                    {"type": "image", "modality": "T1", "image_path": "t1.nii.gz"},
                    {"type": "text", "text": "The subject is male."},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Understood."}]},
            {
                "role": "user",
                "content": [
                    {"type": "image", "modality": "T1", "image_path": "wm.nii.gz"},
                    {"type": "text", "text": "What is the sex of the subject of this scan?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "female"}]},
        ],
    }


def llava_one_image() -> dict:
    return {
        "id": "llava-1",
        "image": "t1.nii.gz",
        "conversations": [
            {"from": "system", "value": "You are a helpful radiology assistant."},
            {"from": "human", "value": "<image>\nDescribe the brain volume."},
            {"from": "gpt", "value": "grey matter, white matter."},
        ],
    }


def llava_text_only() -> dict:
    return {
        "id": "llava-2",
        "task_type": "QA",
        "conversations": [
            {"from": "human", "value": "What is the cortex?"},
            {"from": "gpt", "value": "grey matter."},
        ],
    }


def all_records() -> list[dict]:
    return [umbrella_t1(), umbrella_t2(), umbrella_t3(), llava_one_image(), llava_text_only()]


@pytest.fixture
def data_dir(tmp_path, mni_volume_paths):
    """A folder with the three MNI volumes under the names the records use."""
    for name, path in mni_volume_paths.items():
        shutil.copy(path, tmp_path / f"{name.lower()}.nii.gz")
    return tmp_path


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def labeled_texts(tokenizer, input_ids: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """Decode each run of consecutive labeled tokens, checking that labels equal input_ids where set."""
    labeled = labels != IGNORE_INDEX
    assert torch.equal(labels[labeled], input_ids[labeled])
    texts, run = [], []
    for token, is_labeled in zip(input_ids.tolist(), labeled.tolist()):
        if is_labeled:
            run.append(token)
        elif run:
            texts.append(tokenizer.decode(run))
            run = []
    if run:
        texts.append(tokenizer.decode(run))
    return texts


@pytest.mark.parametrize("layout", ["json", "jsonl", "folder"])
def test_reads_umbrella_and_llava_records_from_json_jsonl_and_a_folder(tiny_processor, data_dir, layout):
    records = all_records()
    if layout == "json":
        path = write_json(data_dir / "records.json", records)
    elif layout == "jsonl":
        path = data_dir / "records.jsonl"
        path.write_text("\n".join(json.dumps(record) for record in records) + "\n\n")
    else:
        path = data_dir / "records"
        path.mkdir()
        write_json(path / "a_umbrella.json", records[:3])
        write_json(path / "b_llava_one.json", records[3])  # one record, not a list
        write_json(path / "c_llava_list.json", records[4:])
        for name in ("t1", "gm", "wm"):
            shutil.copy(data_dir / f"{name}.nii.gz", path / f"{name}.nii.gz")

    dataset = ConversationDataset(path, tiny_processor)

    assert len(dataset) == 5
    assert dataset.task_types == ["T1", "T2", "T3", None, "QA"]
    assert [record.record_id for record in dataset.records] == [
        "t1-sub01",
        "t2-sub01",
        "t3-sub01-sub02",
        "llava-1",
        "llava-2",
    ]
    assert dataset.records[0].metadata == {"subject": "sub01"}
    assert dataset.records[1].modalities == ["T1", "GM"]
    for index, num_volumes in enumerate([1, 2, 2, 1, 0]):
        item = dataset[index]
        assert set(item) == {"input_ids", "labels", "pixel_values"}
        assert item["pixel_values"].shape == (num_volumes, 1, 16, 16, 16)
        assert item["input_ids"].shape == item["labels"].shape
        assert (item["input_ids"] == tiny_processor.image_token_id).sum() == 8 * num_volumes
        assert dataset.lengths[index] == len(item["input_ids"])


def test_volumes_come_in_placeholder_order_and_are_the_preprocessed_files(tiny_processor, data_dir):
    dataset = ConversationDataset(write_json(data_dir / "t2.json", [umbrella_t2()]), tiny_processor)
    pixel_values = dataset[0]["pixel_values"]
    image_processor = tiny_processor.image_processor
    torch.testing.assert_close(pixel_values[0], image_processor.preprocess_volume(data_dir / "t1.nii.gz"))
    torch.testing.assert_close(pixel_values[1], image_processor.preprocess_volume(data_dir / "gm.nii.gz"))


@pytest.mark.parametrize(
    "record, expected",
    [
        (umbrella_t1(), ["Yes.<|im_end|>"]),
        (umbrella_t3(), ["Understood.<|im_end|>", "female<|im_end|>"]),
        (llava_one_image(), ["grey matter, white matter.<|im_end|>"]),
    ],
)
def test_labels_are_exactly_the_assistant_turns_and_their_end_of_turn_token(
    tiny_processor, tokenizer, data_dir, record, expected
):
    dataset = ConversationDataset(write_json(data_dir / "records.json", [record]), tiny_processor)
    item = dataset[0]
    assert labeled_texts(tokenizer, item["input_ids"], item["labels"]) == expected

    # The labeled sequence is the whole rendered conversation, tokenized as the processor does it.
    rendered = tiny_processor.apply_chat_template(dataset.records[0].messages)
    whole = tiny_processor(text=rendered, images=[dataset.records[0].volume_paths], return_tensors="pt")
    assert torch.equal(item["input_ids"], whole["input_ids"][0])
    assert torch.equal(item["pixel_values"][None], whole["pixel_values"])


def test_a_template_without_generation_block_cannot_build_labels(tiny_processor):
    tiny_processor.chat_template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="generation"):
        tokenize_conversation(tiny_processor, [{"role": "assistant", "content": "Yes."}])


def test_relative_paths_resolve_against_image_root(tiny_processor, data_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("annotations")
    path = write_json(elsewhere / "records.json", [umbrella_t2()])
    dataset = ConversationDataset(path, tiny_processor, image_root=data_dir)
    assert dataset.records[0].volume_paths == [data_dir / "t1.nii.gz", data_dir / "gm.nii.gz"]
    with pytest.raises(FileNotFoundError, match="t2-sub01"):
        ConversationDataset(path, tiny_processor)


def test_a_record_without_images_takes_its_volumes_from_the_image_items(tiny_processor, data_dir):
    record = umbrella_t2()
    del record["images"]
    dataset = ConversationDataset(write_json(data_dir / "records.json", [record]), tiny_processor)
    assert dataset.records[0].volume_paths == [data_dir / "t1.nii.gz", data_dir / "gm.nii.gz"]
    assert dataset[0]["pixel_values"].shape[0] == 2


def test_a_missing_volume_names_the_record_and_the_path(tiny_processor, data_dir):
    record = umbrella_t1()
    record["images"][0]["path"] = record["conversations"][0]["content"][0]["image_path"] = "absent.nii.gz"
    path = write_json(data_dir / "records.json", [record])
    with pytest.raises(FileNotFoundError) as error:
        ConversationDataset(path, tiny_processor)
    assert "t1-sub01" in str(error.value)
    assert str(data_dir / "absent.nii.gz") in str(error.value)
    assert str(path) in str(error.value)


def record_with_unknown_role():
    record = llava_one_image()
    record["conversations"][1]["from"] = "doctor"
    return record


def record_with_empty_conversation():
    record = umbrella_t1()
    record["conversations"] = []
    return record


def record_without_assistant_turn():
    record = umbrella_t1()
    record["conversations"] = record["conversations"][:1]
    return record


def record_with_more_volumes_than_placeholders():
    record = llava_one_image()
    record["image"] = ["t1.nii.gz", "gm.nii.gz"]
    return record


def record_whose_image_item_names_another_volume():
    record = umbrella_t2()
    record["conversations"][0]["content"][1]["image_path"] = "wm.nii.gz"
    return record


INVALID_RECORDS = [
    (record_with_unknown_role, "llava-1", "unknown role 'doctor'"),
    (record_with_empty_conversation, "t1-sub01", "no conversation turns"),
    (record_without_assistant_turn, "t1-sub01", "no assistant turn"),
    (record_with_more_volumes_than_placeholders, "llava-1", "1 image placeholders .* but 2 volumes"),
    (record_whose_image_item_names_another_volume, "t2-sub01", "placeholder 1 names wm.nii.gz"),
]


@pytest.mark.parametrize("make_record, record_id, message", INVALID_RECORDS)
def test_invalid_records_are_errors_naming_the_record_and_file(
    tiny_processor, data_dir, make_record, record_id, message
):
    path = write_json(data_dir / "records.json", [umbrella_t1(), make_record()])
    with pytest.raises(InvalidRecordError, match=message) as error:
        ConversationDataset(path, tiny_processor)
    assert f"record '{record_id}' (entry 1 of {path})" in str(error.value)


def test_jsonl_errors_name_the_line(tiny_processor, data_dir):
    path = data_dir / "records.jsonl"
    path.write_text(json.dumps(umbrella_t1()) + "\n" + json.dumps(record_without_assistant_turn()) + "\n")
    with pytest.raises(InvalidRecordError, match=f"record 't1-sub01' \\(line 2 of {path}\\) has no assistant turn"):
        ConversationDataset(path, tiny_processor)
    path.write_text(json.dumps(umbrella_t1()) + "\n{not json\n")
    with pytest.raises(ValueError, match=f"{path}, line 2: not valid JSON"):
        ConversationDataset(path, tiny_processor)


def test_skip_mode_drops_invalid_records_and_counts_them_in_one_warning(tiny_processor, data_dir):
    missing = umbrella_t1()
    missing["task_id"] = "missing"
    missing["images"][0]["path"] = missing["conversations"][0]["content"][0]["image_path"] = "absent.nii.gz"
    invalid = [make_record() for make_record, _, _ in INVALID_RECORDS] + [missing]
    path = write_json(data_dir / "records.json", [umbrella_t1(), *invalid, llava_text_only()])

    with pytest.warns(UserWarning, match="Skipped 6 of 8 records") as warning:
        dataset = ConversationDataset(path, tiny_processor, on_invalid="skip")

    message = str(warning[0].message)
    for reason in ("unknown role: 1", "empty conversation: 1", "no assistant turn: 1", "placeholder mismatch: 2"):
        assert reason in message
    assert "missing volume: 1" in message
    assert [record.record_id for record in dataset.records] == ["t1-sub01", "llava-2"]
    assert len(dataset.skipped) == 6
    assert dataset[1]["pixel_values"].shape == (0, 1, 16, 16, 16)


def image_token_positions(tiny_processor, data_dir, record) -> torch.Tensor:
    dataset = ConversationDataset(write_json(data_dir / "full.json", [record]), tiny_processor)
    return (dataset[0]["input_ids"] == tiny_processor.image_token_id).nonzero().flatten()


def test_truncation_never_cuts_an_image_token_block(tiny_processor, data_dir):
    positions = image_token_positions(tiny_processor, data_dir, umbrella_t2())
    inside_second_block = int(positions[8]) + 3
    path = write_json(data_dir / "records.json", [umbrella_t2()])

    with pytest.raises(InvalidRecordError, match=f"t2-sub01.*max_length={inside_second_block} would cut an image"):
        ConversationDataset(path, tiny_processor, max_length=inside_second_block)

    short = {"id": "short", "conversations": [{"from": "gpt", "value": "Yes."}]}
    path = write_json(data_dir / "records.json", [umbrella_t2(), short])
    with pytest.warns(UserWarning, match=r"Skipped 1 of 2 records .*\(truncation through an image block: 1\)"):
        dataset = ConversationDataset(path, tiny_processor, max_length=inside_second_block, on_invalid="skip")
    assert [record.record_id for record in dataset.records] == ["short"]


def test_truncation_may_cut_text_after_the_last_image_block(tiny_processor, tokenizer, data_dir):
    full = ConversationDataset(write_json(data_dir / "full.json", [umbrella_t3()]), tiny_processor)[0]
    max_length = len(full["input_ids"]) - 2  # drops "<|im_end|>\n" of the last turn
    dataset = ConversationDataset(data_dir / "full.json", tiny_processor, max_length=max_length)
    item = dataset[0]
    assert len(item["input_ids"]) == max_length
    assert torch.equal(item["input_ids"], full["input_ids"][:max_length])
    assert labeled_texts(tokenizer, item["input_ids"], item["labels"]) == ["Understood.<|im_end|>", "female"]


def test_truncation_that_leaves_no_assistant_token_is_an_error(tiny_processor, data_dir):
    positions = image_token_positions(tiny_processor, data_dir, umbrella_t1())
    with pytest.raises(InvalidRecordError, match="t1-sub01.*keeps no assistant token"):
        ConversationDataset(data_dir / "full.json", tiny_processor, max_length=int(positions[-1]) + 2)


def test_volume_cache_gives_the_same_items(tiny_processor, data_dir, tmp_path_factory):
    path = write_json(data_dir / "records.json", [umbrella_t2()])
    cache_dir = tmp_path_factory.mktemp("cache")
    cached = ConversationDataset(path, tiny_processor, cache_dir=cache_dir)
    uncached = ConversationDataset(path, tiny_processor)
    first = cached[0]["pixel_values"]  # reading an item's pixel_values decodes its volumes, through the cache
    assert any(cache_dir.rglob("*")), "the cache wrote nothing"
    torch.testing.assert_close(first, uncached[0]["pixel_values"])
    torch.testing.assert_close(cached[0]["pixel_values"], first)


@pytest.fixture
def mixed_dataset(tiny_processor, data_dir):
    path = write_json(data_dir / "records.json", [umbrella_t2(), llava_text_only(), umbrella_t1()])
    return ConversationDataset(path, tiny_processor)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collator_pads_tokens_and_labels_and_stacks_volumes(tiny_processor, tokenizer, mixed_dataset, padding_side):
    items = [mixed_dataset[i] for i in range(3)]
    batch = UmbrellaCollator(tiny_processor, pad_to_multiple_of=8, padding_side=padding_side)(items)

    lengths = [len(item["input_ids"]) for item in items]
    length = batch["input_ids"].shape[1]
    assert length % 8 == 0 and length >= max(lengths)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (3, length)
    for row, item in enumerate(items):
        n = lengths[row]
        real = slice(0, n) if padding_side == "right" else slice(length - n, length)
        pad = slice(n, length) if padding_side == "right" else slice(0, length - n)
        assert torch.equal(batch["input_ids"][row, real], item["input_ids"])
        assert torch.equal(batch["labels"][row, real], item["labels"])
        assert (batch["input_ids"][row, pad] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, pad] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].sum() == n and (batch["attention_mask"][row, real] == 1).all()

    assert batch["pixel_values"].shape == (3, 2, 1, 16, 16, 16)
    assert batch["image_mask"].tolist() == [[True, True], [False, False], [True, False]]
    assert batch["num_images_per_sample"].tolist() == [2, 0, 1]
    torch.testing.assert_close(batch["pixel_values"][2, 0], items[2]["pixel_values"][0])
    assert (batch["pixel_values"][2, 1] == 0).all()


def test_collator_follows_the_tokenizer_when_padding_side_is_none(tiny_processor, mixed_dataset):
    items = [mixed_dataset[1], mixed_dataset[2]]
    batch = UmbrellaCollator(tiny_processor, padding_side=None)(items)
    assert tiny_processor.tokenizer.padding_side == "left"
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]
    assert 0 in batch["attention_mask"][:, 0].tolist()


def test_collator_batch_without_volumes_is_text_only(tiny_processor, mixed_dataset):
    batch = UmbrellaCollator(tiny_processor)([mixed_dataset[1], mixed_dataset[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_items_survive_the_trainers_column_filter_and_the_batch_gives_a_finite_loss(
    tiny_processor, tokenizer, mixed_dataset
):
    from umbrella_llava import UmbrellaLlavaForConditionalGeneration

    torch.manual_seed(0)
    config = tiny_config(tokenizer)
    assert config.image_seq_length == tiny_processor.image_seq_length
    model = UmbrellaLlavaForConditionalGeneration(config).eval()
    forward_parameters = set(inspect.signature(model.forward).parameters)
    assert set(mixed_dataset[0]) <= forward_parameters

    batch = UmbrellaCollator(tiny_processor)([mixed_dataset[i] for i in range(3)])
    assert set(batch) <= forward_parameters
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss) and loss > 0


@pytest.mark.slow
def test_stock_trainer_trains_on_the_dataset_with_the_collator(tiny_processor, tokenizer, mixed_dataset, tmp_path):
    from transformers import Trainer, TrainingArguments

    from umbrella_llava import UmbrellaLlavaForConditionalGeneration

    torch.manual_seed(0)
    model = UmbrellaLlavaForConditionalGeneration(tiny_config(tokenizer))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=3, report_to=[], dataloader_pin_memory=False
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=mixed_dataset, data_collator=UmbrellaCollator(tiny_processor)
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
