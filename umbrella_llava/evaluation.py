"""Generation accuracy: greedy answers to held-out conversations, compared with their reference answers.

[`evaluate_generation`] measures it once (every rank its shard, the results gathered); [`GenerationAccuracyCallback`]
measures it during and after a `Trainer` run, logs it and writes `output_dir/eval_generation.json`.
"""

import json
import math
import os
import string
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback

from .data import ConversationDataset
from .data.records import ConversationRecord, _placeholder_paths
from .image_processing_umbrella_llava import stack_volumes
from .processing_umbrella_llava import UmbrellaLlavaProcessor, drop_volume_inputs_without_volumes

GENERATION_REPORT = "eval_generation.json"
UNTYPED = "untyped"  # the task type of a record without one


def normalize_answer(text: str) -> str:
    """The form answers are compared in: Unicode NFKC, lower case, punctuation turned into spaces, runs of whitespace
    collapsed, stripped. `"Yes."` and `" yes"` match; `"T1-weighted"` becomes `"t1 weighted"`."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if ch in string.punctuation or unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def _content_text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(item["text"] for item in content if item["type"] == "text")


def generation_prompt(record: ConversationRecord, image_token: str = "<image>") -> tuple[list[dict[str, Any]], str]:
    """Split a record into the prompt (every turn before the last assistant turn) and the reference answer.

    Raises:
        ValueError: naming the record, if its last assistant turn holds an image placeholder (its volume would be
            missing from the prompt).
    """
    last = max(i for i, message in enumerate(record.messages) if message["role"] == "assistant")
    answer = record.messages[last]["content"]
    if _placeholder_paths(record.messages[last : last + 1], image_token):  # data's one count of placeholders
        raise ValueError(
            f"{record.where}: its last assistant turn holds an image placeholder, so it cannot be the reference "
            "answer of a generation evaluation."
        )
    return record.messages[:last], _content_text(answer)


def accuracy_metrics(results: list[dict[str, Any]], prefix: str = "eval") -> dict[str, float]:
    """`{prefix}_accuracy_<task_type>` per task type and `{prefix}_accuracy_overall`, from per-record results with
    `task_type` and `correct`."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    for result in results:
        per_task[result["task_type"]].append(bool(result["correct"]))
    metrics = {f"{prefix}_accuracy_{task}": sum(flags) / len(flags) for task, flags in sorted(per_task.items())}
    metrics[f"{prefix}_accuracy_overall"] = sum(r["correct"] for r in results) / max(len(results), 1)
    return metrics


@torch.no_grad()
def evaluate_generation(
    model: nn.Module,
    processor: UmbrellaLlavaProcessor,
    dataset: ConversationDataset,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Greedy answers for every record of `dataset`, compared with the reference after [`normalize_answer`].

    The prompt is the conversation up to its last assistant turn, rendered with the processor's chat template and
    `add_generation_prompt=True`; the reference is that turn's text; a record is correct on an exact match of the
    normalised texts. Under `torch.distributed`, every rank generates for its shard (`rank::world_size`, padded with
    repeats to the same length, as ZeRO-3's synced generation needs the same number of calls on every rank) and the results are gathered, so
    every rank returns the same report, each record counted once.

    Returns:
        `{"metrics": {"accuracy_<task_type>": ..., "accuracy_overall": ...}, "per_task": {task: {"correct",
        "total"}}, "results": [{"record_id", "task_type", "prompt", "prediction", "reference", "correct"}]}`;
        records without a `task_type` count as `"untyped"`.
    """
    was_training = model.training
    model.eval()
    device = device if device is not None else next(model.parameters()).device
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    prompts, references = [], []
    for record in dataset.records:
        messages, reference = generation_prompt(record, processor.image_token)
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        references.append(reference)
    if max_new_tokens is None:
        longest = max(len(processor.tokenizer.encode(r, add_special_tokens=False)) for r in references)
        max_new_tokens = longest + 16

    shard = list(range(rank, len(dataset), world_size))
    # Equal shard lengths give every rank the same number of generate() calls.
    padded = shard + [shard[-1] if shard else 0] * (math.ceil(len(dataset) / world_size) - len(shard))

    local_results = []
    for start in range(0, len(padded), batch_size):
        indices = padded[start : start + batch_size]
        # Tokenized as in training (data.tokenize_conversation); the volumes come from the dataset and its cache.
        inputs = processor.tokenizer(
            [processor.expand_image_placeholders(prompts[i]) for i in indices],
            add_special_tokens=False,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        volumes = stack_volumes([dataset[i]["pixel_values"] for i in indices])
        inputs = {**inputs, **drop_volume_inputs_without_volumes(dict(volumes))}
        inputs = {key: value.to(device) for key, value in inputs.items()}
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers = processor.tokenizer.batch_decode(
            generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        for position, (index, answer) in enumerate(zip(indices, answers)):
            if start + position >= len(shard):
                continue  # a repeat that only keeps the ranks in step
            record = dataset.records[index]
            local_results.append(
                {
                    "index": index,
                    "record_id": record.record_id,
                    "task_type": record.task_type if record.task_type is not None else UNTYPED,
                    "prompt": prompts[index],
                    "prediction": answer,
                    "reference": references[index],
                    "correct": normalize_answer(answer) == normalize_answer(references[index]),
                }
            )

    if distributed:
        gathered: list[list[dict[str, Any]] | None] = [None] * world_size
        dist.all_gather_object(gathered, local_results)
        local_results = [result for part in gathered for result in part]
    results = sorted(local_results, key=lambda result: result["index"])
    if was_training:
        model.train()

    per_task: dict[str, dict[str, int]] = defaultdict(lambda: {"correct": 0, "total": 0})
    for result in results:
        per_task[result["task_type"]]["total"] += 1
        per_task[result["task_type"]]["correct"] += int(result["correct"])
    return {
        "metrics": accuracy_metrics(results, prefix="eval"),
        "per_task": dict(sorted(per_task.items())),
        "results": results,
    }


class GenerationAccuracyCallback(TrainerCallback):
    """Measures generation accuracy on the eval records every `eval_steps` steps, logs it through the Trainer
    (so it reaches `trainer_state.json` and every reporter) and writes `output_dir/eval_generation.json`."""

    def __init__(
        self,
        trainer: Trainer,
        dataset: ConversationDataset,
        eval_steps: int | None = None,
        max_new_tokens: int | None = None,
    ):
        self.trainer, self.dataset = trainer, dataset
        self.eval_steps, self.max_new_tokens = eval_steps, max_new_tokens

    def evaluate(self) -> dict[str, float]:
        """Run the evaluation now (on every rank), log the metrics and write the report (main process)."""
        trainer = self.trainer
        report = evaluate_generation(
            trainer.model,
            trainer.processing_class,
            self.dataset,
            batch_size=trainer.args.per_device_eval_batch_size,
            max_new_tokens=self.max_new_tokens,
            device=trainer.args.device,
        )
        metrics = report["metrics"]
        trainer.log(dict(metrics))
        if trainer.args.should_save:
            os.makedirs(trainer.args.output_dir, exist_ok=True)
            report = {
                "global_step": trainer.state.global_step,
                "comparison": "exact match after normalize_answer: NFKC, lower case, punctuation to spaces, "
                "whitespace collapsed",
                **report,
            }
            Path(trainer.args.output_dir, GENERATION_REPORT).write_text(json.dumps(report, indent=2))
        return metrics

    def on_step_end(self, args, state, control, **kwargs):
        if self.eval_steps and state.global_step % self.eval_steps == 0 and state.global_step < state.max_steps:
            self.evaluate()


__all__ = [
    "GENERATION_REPORT",
    "GenerationAccuracyCallback",
    "accuracy_metrics",
    "evaluate_generation",
    "generation_prompt",
    "normalize_answer",
]
