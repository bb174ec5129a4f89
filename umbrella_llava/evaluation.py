"""Asking the questions: every assistant turn of held-out conversations, answered by `generate()` from the turns
before it, next to its reference answer.

[`evaluate_generation`] asks them once (every rank its shard, the results gathered) and returns one row per question,
the rows `predictions.jsonl` holds; `metrics.py` turns such rows into metrics and `report.py` into a report.
[`GenerationAccuracyCallback`] asks them during and after a `Trainer` run, logs the exact-match accuracy per task (and,
with `full_metrics`, every metric of `metrics.compute_metrics`) and writes `output_dir/eval_generation.json`.
"""

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback

from .data import ConversationDataset
from .data.records import ConversationRecord, _placeholder_paths
from .image_processing_umbrella_llava import stack_volumes
from .metrics import UNTYPED, normalize_answer
from .processing_umbrella_llava import UmbrellaLlavaProcessor, drop_volume_inputs_without_volumes
from .report import METRICS_FILE, evaluation_provenance

GENERATION_REPORT = "eval_generation.json"


@dataclass
class Question:
    """One assistant turn of a record, asked from the turns before it.

    `turn` is the index of the assistant turn in `record.messages`; `num_volumes` the number of image placeholders in
    the prompt, which take the record's first `num_volumes` volumes.
    """

    turn: int
    messages: list[dict[str, Any]]
    reference: str
    num_volumes: int


def _content_text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(item["text"] for item in content if item["type"] == "text")


def generation_questions(record: ConversationRecord, image_token: str = "<image>") -> list[Question]:
    """Every assistant turn of `record` as a [`Question`]: the turns before it are the prompt (earlier assistant turns
    as the record has them), its text the reference answer.

    Raises:
        ValueError: naming the record and the turn, if an assistant turn holds an image placeholder (its volume would
            be missing from the prompt).
    """
    questions = []
    for turn, message in enumerate(record.messages):
        if message["role"] != "assistant":
            continue
        if _placeholder_paths([message], image_token):  # data's one count of placeholders
            raise ValueError(
                f"{record.where}: its assistant turn {turn} holds an image placeholder, so it cannot be the reference "
                "answer of a generation evaluation."
            )
        prompt = record.messages[:turn]
        questions.append(
            Question(turn, prompt, _content_text(message["content"]), len(_placeholder_paths(prompt, image_token)))
        )
    return questions


def generation_prompt(record: ConversationRecord, image_token: str = "<image>") -> tuple[list[dict[str, Any]], str]:
    """The prompt (every turn before the last assistant turn) and reference answer of the record's last question.

    Raises:
        ValueError: see [`generation_questions`].
    """
    last = generation_questions(record, image_token)[-1]
    return last.messages, last.reference


def accuracy_metrics(results: list[dict[str, Any]], prefix: str = "eval") -> dict[str, float]:
    """`{prefix}_accuracy_<task>` per task and `{prefix}_accuracy_overall`, from per-question results with `task` and
    `correct`."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    for result in results:
        per_task[result["task"]].append(bool(result["correct"]))
    metrics = {f"{prefix}_accuracy_{task}": sum(flags) / len(flags) for task, flags in sorted(per_task.items())}
    metrics[f"{prefix}_accuracy_overall"] = sum(r["correct"] for r in results) / max(len(results), 1)
    return metrics


def _eos_token_ids(model: nn.Module, processor: UmbrellaLlavaProcessor, generate_kwargs: dict[str, Any]) -> set[int]:
    """The token ids that end an answer: `generate_kwargs`'s, else the model's generation config's, else the
    tokenizer's end-of-sequence token."""
    eos = generate_kwargs.get("eos_token_id")
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = processor.tokenizer.eos_token_id
    return set(eos) if isinstance(eos, Sequence) else {eos}


@torch.no_grad()
def evaluate_generation(
    model: nn.Module,
    processor: UmbrellaLlavaProcessor,
    dataset: ConversationDataset,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    device: torch.device | str | None = None,
    generate_kwargs: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Answers to every [`generation_questions`] of `dataset`, compared with the references after
    [`normalize_answer`].

    A prompt is rendered with the processor's chat template and `add_generation_prompt=True`, tokenized as in training
    and left-padded into batches of `batch_size`, with the record's volumes up to the prompt's last placeholder.
    Decoding is greedy (`do_sample=False`) unless `generate_kwargs` says otherwise; they go to `model.generate`
    as they are. Under `torch.distributed`, every rank answers its shard (`rank::world_size`, padded with repeats to
    the same length, as ZeRO-3's synced generation needs the same number of calls on every rank) and the results are
    gathered, so every rank returns the same report, each question counted once.

    Args:
        max_new_tokens: longest answer in tokens; default: the longest reference in tokens + 16.
        generate_kwargs: further `generate()` arguments (`num_beams`, `repetition_penalty`, ...);
            `num_return_sequences` must stay 1.
        progress: show a progress bar over the batches (on rank 0).

    Returns:
        `{"metrics": {"eval_accuracy_<task>": ..., "eval_accuracy_overall": ...}, "per_task": {task: {"correct",
        "total"}}, "results": [...]}`, one result per question in dataset order: `{"index"` (of the record in the
        dataset), `"record"` (its id), `"where"`, `"turn"`, `"task"` (its `task_type`, `"untyped"` without one),
        `"prompt"`, `"reference"`, `"prediction"`, `"correct"` (exact match after normalisation), `"new_tokens"`,
        `"truncated"` (stopped at `max_new_tokens` without an end-of-sequence token)`}`.

    Raises:
        ValueError: naming the record, for an assistant turn with an image placeholder; for `num_return_sequences`
            other than 1.
    """
    generate_kwargs = {"do_sample": False, **(generate_kwargs or {})}
    if generate_kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError("evaluate_generation compares one answer per question: num_return_sequences must be 1.")
    was_training = model.training
    model.eval()
    device = device if device is not None else next(model.parameters()).device
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    questions = [
        (index, question)
        for index, record in enumerate(dataset.records)
        for question in generation_questions(record, processor.image_token)
    ]
    prompts = [
        processor.apply_chat_template(question.messages, add_generation_prompt=True, tokenize=False)
        for _, question in questions
    ]
    if max_new_tokens is None:
        longest = max(len(processor.tokenizer.encode(q.reference, add_special_tokens=False)) for _, q in questions)
        max_new_tokens = longest + 16
    eos_ids = _eos_token_ids(model, processor, generate_kwargs)

    shard = list(range(rank, len(questions), world_size))
    # Equal shard lengths give every rank the same number of generate() calls.
    padded = shard + [shard[-1] if shard else 0] * (math.ceil(len(questions) / world_size) - len(shard))

    local_results = []
    batches = range(0, len(padded), batch_size)
    for start in tqdm(batches, desc="Answering", unit="batch", disable=not progress or rank != 0):
        numbers = padded[start : start + batch_size]
        # Tokenized as in training (data.tokenize_conversation); the volumes come from the dataset and its cache.
        inputs = processor.tokenizer(
            [processor.expand_image_placeholders(prompts[n]) for n in numbers],
            add_special_tokens=False,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        volumes = stack_volumes([dataset.volumes(questions[n][0])[: questions[n][1].num_volumes] for n in numbers])
        inputs = {**inputs, **drop_volume_inputs_without_volumes(dict(volumes))}
        inputs = {key: value.to(device) for key, value in inputs.items()}
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
        new_tokens = generated[:, inputs["input_ids"].shape[1] :].tolist()
        answers = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for position, (n, tokens, answer) in enumerate(zip(numbers, new_tokens, answers)):
            if start + position >= len(shard):
                continue  # a repeat that only keeps the ranks in step
            index, question = questions[n]
            record = dataset.records[index]
            ended = next((i + 1 for i, token in enumerate(tokens) if token in eos_ids), None)
            local_results.append(
                {
                    "number": n,
                    "index": index,
                    "record": record.record_id,
                    "where": record.where,
                    "turn": question.turn,
                    "task": record.task_type if record.task_type is not None else UNTYPED,
                    "prompt": prompts[n],
                    "reference": question.reference,
                    "prediction": answer,
                    "correct": normalize_answer(answer) == normalize_answer(question.reference),
                    "new_tokens": ended if ended is not None else len(tokens),
                    "truncated": ended is None and len(tokens) >= max_new_tokens,
                }
            )

    if distributed:
        gathered: list[list[dict[str, Any]] | None] = [None] * world_size
        dist.all_gather_object(gathered, local_results)
        local_results = [result for part in gathered for result in part]
    results = sorted(local_results, key=lambda result: result.pop("number"))
    if was_training:
        model.train()

    per_task: dict[str, dict[str, int]] = defaultdict(lambda: {"correct": 0, "total": 0})
    for result in results:
        per_task[result["task"]]["total"] += 1
        per_task[result["task"]]["correct"] += int(result["correct"])
    return {
        "metrics": accuracy_metrics(results, prefix="eval"),
        "per_task": dict(sorted(per_task.items())),
        "results": results,
    }


class GenerationAccuracyCallback(TrainerCallback):
    """Asks the eval records' questions every `eval_steps` steps, logs the results through the Trainer (so they reach
    `trainer_state.json` and every reporter: TensorBoard, W&B, ...) and writes `output_dir/eval_generation.json`.

    The exact-match accuracy per task is always logged (`eval_accuracy_<task>`). With `full_metrics`, so is every
    metric of `metrics.compute_metrics` with its interval (`eval_<task>_<metric>`, `..._ci95_low`, `..._ci95_high`;
    see `metrics.flatten_metrics`), at each of the Trainer's own evaluations too (`--eval_strategy`), and the final
    evaluation writes `output_dir/metrics.json`, which the model card shows.
    """

    def __init__(
        self,
        trainer: Trainer,
        dataset: ConversationDataset,
        eval_steps: int | None = None,
        max_new_tokens: int | None = None,
        full_metrics: bool = False,
        n_resamples: int = 1000,
    ):
        self.trainer, self.dataset = trainer, dataset
        self.eval_steps, self.max_new_tokens = eval_steps, max_new_tokens
        self.full_metrics, self.n_resamples = full_metrics, n_resamples
        self.evaluated_at: int | None = None  # the global step of the last evaluation

    def evaluate(self, final: bool = False) -> dict[str, float]:
        """Ask the questions now (on every rank), log the metrics and write the report (main process).

        Args:
            final: the evaluation of the model saved in `output_dir`: with `full_metrics`, also write
                `output_dir/metrics.json`.
        """
        from .metrics import compute_metrics, flatten_metrics

        trainer = self.trainer
        report = evaluate_generation(
            trainer.model,
            trainer.processing_class,
            self.dataset,
            batch_size=trainer.args.per_device_eval_batch_size,
            max_new_tokens=self.max_new_tokens,
            device=trainer.args.device,
        )
        metrics = dict(report["metrics"])
        full = None
        if self.full_metrics:
            full = compute_metrics(report["results"], n_resamples=self.n_resamples, seed=trainer.args.seed)
            metrics |= flatten_metrics(full, prefix="eval")
        trainer.log(dict(metrics))
        self.evaluated_at = trainer.state.global_step
        if trainer.args.should_save:
            os.makedirs(trainer.args.output_dir, exist_ok=True)
            written = {
                "global_step": trainer.state.global_step,
                "comparison": "exact match after normalize_answer: NFKC, lower case, punctuation to spaces, "
                "whitespace collapsed",
                **report,
                **({"generation_metrics": full} if full is not None else {}),
            }
            Path(trainer.args.output_dir, GENERATION_REPORT).write_text(json.dumps(written, indent=2))
            if final and full is not None:
                provenance = evaluation_provenance(
                    trainer.args.output_dir,
                    self.dataset.path,
                    {"max_new_tokens": self.max_new_tokens or "longest reference + 16", "do_sample": False},
                    n_resamples=self.n_resamples,
                    seed=trainer.args.seed,
                    skipped=self.dataset.skipped,
                )
                provenance["global_step"] = trainer.state.global_step
                Path(trainer.args.output_dir, METRICS_FILE).write_text(json.dumps({**provenance, **full}, indent=2))
        return metrics

    def on_step_end(self, args, state, control, **kwargs):
        if self.eval_steps and state.global_step % self.eval_steps == 0 and state.global_step < state.max_steps:
            self.evaluate()

    def on_evaluate(self, args, state, control, **kwargs):
        # Beside the eval loss of each of the Trainer's evaluations, unless this step was just evaluated.
        if self.full_metrics and self.evaluated_at != state.global_step:
            self.evaluate()


__all__ = [
    "GENERATION_REPORT",
    "METRICS_FILE",
    "GenerationAccuracyCallback",
    "Question",
    "UNTYPED",
    "accuracy_metrics",
    "evaluate_generation",
    "generation_prompt",
    "generation_questions",
    "normalize_answer",
]
