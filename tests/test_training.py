"""Ready for real training: the stock Trainer, activation checkpointing, bf16, gradients for every parameter."""

import pytest
import torch
from conftest import tiny_config
from test_modeling import make_batch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from umbrella_llava import UmbrellaLlavaForConditionalGeneration
from umbrella_llava.data import IGNORE_INDEX


class BrightnessQuestions(Dataset):
    """One volume per sample; the answer ("bright" / "dark") is in the volume only, never in the question.

    Items are already padded to one length, so the Trainer's default collator stacks them: no custom collator.
    """

    def __init__(self, config, tokenizer, size: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.config, self.tokenizer = config, tokenizer
        self.bright = torch.rand(size, generator=generator) > 0.5
        self.noise = torch.randn(size, config.volume_channels, *config.volume_size, generator=generator) * 0.1
        question = tokenizer.encode("<|im_start|>user\n", add_special_tokens=False)
        self.prompt = question + [config.image_token_id] * config.image_seq_length
        self.prompt += tokenizer.encode("Is it bright?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
        self.answers = {
            flag: tokenizer.encode(word + "<|im_end|>", add_special_tokens=False)
            for flag, word in ((True, "bright"), (False, "dark"))
        }
        self.length = len(self.prompt) + max(len(a) for a in self.answers.values())

    def __len__(self):
        return len(self.bright)

    def __getitem__(self, i):
        answer = self.answers[bool(self.bright[i])]
        pad = self.length - len(self.prompt) - len(answer)
        input_ids = torch.tensor(self.prompt + answer + [self.tokenizer.pad_token_id] * pad)
        labels = torch.tensor([IGNORE_INDEX] * len(self.prompt) + answer + [IGNORE_INDEX] * pad)
        volume = self.noise[i] + (1.0 if self.bright[i] else -1.0)
        return {
            "input_ids": input_ids,
            "attention_mask": (torch.arange(self.length) < self.length - pad).long(),
            "labels": labels,
            "pixel_values": volume[None],
            "image_mask": torch.ones(1, dtype=torch.bool),
        }


def held_out_accuracy(model, dataset) -> float:
    """Share of `dataset` whose answer word the model ranks first at the answer's first position (teacher-forced)."""
    batch = {key: torch.stack([dataset[i][key] for i in range(len(dataset))]) for key in dataset[0]}
    first = len(dataset.prompt)  # the first answer token, predicted from the position before it
    words = torch.tensor([dataset.answers[True][0], dataset.answers[False][0]])
    with torch.no_grad():
        logits = model.eval()(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, first - 1, words]
    predicted_bright = logits[:, 0] > logits[:, 1]
    return float((predicted_bright == dataset.bright).float().mean())


@pytest.mark.slow
def test_stock_trainer_with_default_arguments_learns_from_the_volumes(tmp_path, tokenizer):
    """A text-only model cannot beat the majority answer on held-out volumes; the trained model must."""
    torch.manual_seed(0)
    config = tiny_config(tokenizer)
    model = UmbrellaLlavaForConditionalGeneration(config)
    dataset = BrightnessQuestions(config, tokenizer, size=64)
    held_out = BrightnessQuestions(config, tokenizer, size=32, seed=1)
    majority = max(float(held_out.bright.float().mean()), 1 - float(held_out.bright.float().mean()))
    embedder_before = model.model.vision_tower.embeddings.patch_embedding.weight.detach().clone()

    trainer = Trainer(
        model=model.train(), args=TrainingArguments(output_dir=str(tmp_path), max_steps=60), train_dataset=dataset
    )
    trainer.train()

    accuracy = held_out_accuracy(model, held_out)
    assert accuracy >= 0.9 and accuracy > majority + 0.2, (accuracy, majority)
    embedder_after = model.model.vision_tower.embeddings.patch_embedding.weight.detach()
    assert not torch.allclose(embedder_before, embedder_after)


def test_trainer_evaluate_and_predict(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = tiny_config(tokenizer)
    model = UmbrellaLlavaForConditionalGeneration(config)
    dataset = BrightnessQuestions(config, tokenizer, size=6)
    trainer = Trainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[])
    )
    metrics = trainer.evaluate(eval_dataset=dataset)
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    prediction = trainer.predict(dataset)
    assert prediction.predictions.shape == (6, dataset.length, config.text_config.vocab_size)


def _training_step_grads(model, batch):
    model.train()
    model.zero_grad()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    return loss, {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def test_every_trainable_parameter_gets_a_gradient(tiny_model):
    _, grads = _training_step_grads(tiny_model, make_batch(tiny_model.config, [2, 1]))
    missing = [name for name, grad in grads.items() if grad is None]
    assert not missing


def test_text_only_batch_still_gives_every_vision_parameter_a_gradient(tiny_model):
    batch = make_batch(tiny_model.config, [0, 0])
    del batch["pixel_values"], batch["image_mask"], batch["num_images_per_sample"]
    loss, grads = _training_step_grads(tiny_model, batch)
    vision = {name: grad for name, grad in grads.items() if "vision_tower" in name or "multi_modal_projector" in name}
    assert vision and all(grad is not None for grad in vision.values())
    with torch.no_grad():  # and the blank volume changes nothing
        tiny_model.eval()
        torch.testing.assert_close(tiny_model(**batch, labels=batch["input_ids"]).loss, loss.detach())


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_model):
    """Mirrors transformers' `test_training_gradient_checkpointing`, with volumes."""
    batch = make_batch(tiny_model.config, [2, 1])
    torch.manual_seed(0)
    loss, grads = _training_step_grads(tiny_model, batch)
    tiny_model.gradient_checkpointing_enable()
    for part in (tiny_model.model.vision_tower, tiny_model.model.language_model):
        # transformers renamed the property after 5.17; the old name warns from then on.
        name = (
            "is_activation_checkpointing"
            if hasattr(type(part), "is_activation_checkpointing")
            else "is_gradient_checkpointing"
        )
        assert getattr(part, name)
    loss_ckpt, grads_ckpt = _training_step_grads(tiny_model, batch)
    torch.testing.assert_close(loss_ckpt, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_weights_with_fp32_volumes(tokenizer):
    torch.manual_seed(0)
    model = UmbrellaLlavaForConditionalGeneration(tiny_config(tokenizer)).to(torch.bfloat16)
    batch = make_batch(model.config, [1, 2])
    assert batch["pixel_values"].dtype == torch.float32
    assert model(**batch).logits.dtype == torch.bfloat16
    loss, grads = _training_step_grads(model, batch)
    assert torch.isfinite(loss)
    assert grads["model.vision_tower.embeddings.patch_embedding.weight"].abs().sum() > 0


def test_no_split_modules_name_only_classes_in_the_model(tiny_model):
    present = {type(m).__name__ for m in tiny_model.modules()}
    assert tiny_model._no_split_modules
    assert set(tiny_model._no_split_modules) <= present
    from accelerate.utils.dataclasses import get_module_class_from_name

    for name in tiny_model._no_split_modules:
        assert get_module_class_from_name(tiny_model, name) is not None


def test_num_items_in_batch_reaches_the_loss(tmp_path, tiny_model):
    """The Trainer normalises the loss over gradient-accumulation steps through `num_items_in_batch` in **kwargs."""
    batch = make_batch(tiny_model.config, [2, 1])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == tiny_model.config.image_token_id, IGNORE_INDEX)
    with torch.no_grad():
        mean_loss = tiny_model(**batch, labels=labels).loss
        tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        summed = tiny_model(**batch, labels=labels, num_items_in_batch=torch.tensor(2 * tokens)).loss
    torch.testing.assert_close(summed, mean_loss / 2)
    trainer = Trainer(model=tiny_model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    assert trainer.model_accepts_loss_kwargs
