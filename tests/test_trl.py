"""TRL's SFTTrainer on the package's records with assistant_only_loss=True: it trains on the answers.

TRL builds its labels from `processor.apply_chat_template(..., return_assistant_tokens_mask=True)`, so these tests
compare them with the package's own turn-masked labels (`tokenize_conversation`), record by record.
"""

import json
import shutil

import pytest
import torch
from conftest import tiny_config
from packaging.version import Version
from transformers import __version__ as transformers_version

from umbrella_llava import UmbrellaLlavaForConditionalGeneration
from umbrella_llava.data import IGNORE_INDEX, ConversationDataset, chat_example, tokenize_conversation

requires_shifted_masks = pytest.mark.skipif(
    Version(transformers_version) < Version("5.18"),
    reason="TRL's assistant_only_loss on vision data needs transformers 5.18 (5.17 cannot shift the mask past an "
    "expanded placeholder; the processor refuses it there, see test_processing.py)",
)


def records() -> list[dict]:
    """An UMBRELLA record with two volumes and two answers, a LLaVA one, and a text-only one."""
    return [
        {
            "task_id": "t2-0001",
            "task_type": "T2",
            "images": [{"path": "t1.nii.gz", "modality": "T1"}, {"path": "gm.nii.gz", "modality": "GM"}],
            "conversations": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "modality": "T1", "image_path": "t1.nii.gz"},
                        {"type": "image", "modality": "GM", "image_path": "gm.nii.gz"},
                        {"type": "text", "text": "Which is the grey-matter map?"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "the second"}]},
                {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
            ],
        },
        {
            "id": "llava-1",
            "image": "wm.nii.gz",
            "conversations": [
                {"from": "human", "value": "<image>\nWhich map is this?"},
                {"from": "gpt", "value": "white matter"},
            ],
        },
        {"id": "llava-2", "conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "hi"}]},
    ]


@pytest.fixture
def train_file(tmp_path, mni_volume_paths):
    for name, path in mni_volume_paths.items():
        shutil.copy(path, tmp_path / f"{name.lower()}.nii.gz")
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records()))
    return path


def sft_trainer(tiny_processor, tokenizer, train_dataset, output_dir, **overrides):
    trl = pytest.importorskip("trl")
    torch.manual_seed(0)
    model = UmbrellaLlavaForConditionalGeneration(tiny_config(tokenizer))
    args = trl.SFTConfig(
        output_dir=str(output_dir),
        assistant_only_loss=True,
        per_device_train_batch_size=3,
        max_steps=2,
        learning_rate=1e-3,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        **overrides,
    )
    return trl.SFTTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=tiny_processor)


@requires_shifted_masks
def test_sft_trainer_assistant_only_loss_trains_on_the_answers(tiny_processor, tokenizer, train_file, tmp_path):
    datasets = pytest.importorskip("datasets")
    records = ConversationDataset(train_file, tiny_processor).records
    train_dataset = datasets.Dataset.from_list([chat_example(record) for record in records])
    trainer = sft_trainer(tiny_processor, tokenizer, train_dataset, tmp_path / "run")

    batch = trainer.data_collator([train_dataset[i] for i in range(len(train_dataset))])
    assert batch["num_images_per_sample"].tolist() == [2, 1, 0]
    for row, record in enumerate(records):
        input_ids, labels = tokenize_conversation(tiny_processor, record.messages)
        length = len(input_ids)
        assert torch.equal(batch["input_ids"][row, :length], input_ids), record.record_id
        assert torch.equal(batch["labels"][row, :length], labels), record.record_id
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
    answers = [tokenizer.decode(batch["labels"][0][batch["labels"][0] != IGNORE_INDEX])]
    assert answers == ["the second<|im_end|>yes<|im_end|>"]

    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    embedder = "model.vision_tower.embeddings."
    assert any(
        not torch.equal(p, before[name]) for name, p in trainer.model.named_parameters() if name.startswith(embedder)
    ), "the volume path did not train"


def test_chat_example_renders_as_the_record(tiny_processor, train_file):
    # A LLaVA record's "<image>\n" and an UMBRELLA record's image item both become an image item and render alike.
    for record in ConversationDataset(train_file, tiny_processor).records:
        example = chat_example(record)
        assert tiny_processor.apply_chat_template(example["messages"]) == tiny_processor.apply_chat_template(
            record.messages
        )
        assert len(example["images"]) == len(record.volume_paths)
