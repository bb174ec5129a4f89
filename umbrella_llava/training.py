"""Fine-tuning UmbrellaLlava with the stock `transformers.Trainer`: arguments, what trains, checks, generation accuracy.

`scripts/train.py` is a thin entry point over [`main`]; everything it does is importable from here:

    parse_arguments ─▶ check_distributed_launch ─▶ load_model_and_processor ─▶ configure_trainable_parameters
      ─▶ load_datasets ─▶ Trainer(data_collator=UmbrellaCollator) ─▶ check_process_group ─▶ train
      ─▶ check_replicas_in_sync ─▶ save ─▶ evaluate_generation

Every input is checked before the first step: unknown flags, a checkpoint that is not an UmbrellaLlava, a data file
that does not parse, an empty dataset, a multi-process launch whose processes would not form one group.

Distributed runs (`torchrun`, `accelerate launch`, `--deepspeed`): the Trainer does the data sharding and gradient
averaging. On a machine without an accelerator, the processes form one gloo group only with `--use_cpu`; without it
each process would silently train alone on the whole dataset, so [`check_distributed_launch`] refuses such a launch
with an error rather than guessing, and [`check_process_group`] proves the group after setup.
"""

import hashlib
import json
import logging
import math
import os
import re
import string
import sys
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    HfArgumentParser,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoints import damaged_weight_files, incomplete_checkpoint_reasons
from .configuration_umbrella_llava import UmbrellaLlavaConfig
from .data import ConversationDataset, ConversationRecord, UmbrellaCollator
from .image_processing_umbrella_llava import stack_volumes
from .processing_umbrella_llava import UmbrellaLlavaProcessor, drop_volume_inputs_without_volumes

logger = logging.getLogger(__name__)

TRAIN_MODES = ("embedder", "embedder_projector", "full", "lora")
# Module paths inside UmbrellaLlavaForConditionalGeneration.
EMBEDDER = "model.vision_tower.embeddings"
PROJECTOR = "model.multi_modal_projector"
LANGUAGE_MODEL = "model.language_model"
GENERATION_REPORT = "eval_generation.json"
DISTRIBUTED_REPORT = "distributed_check.json"
CONVERT_SCRIPT = "scripts/convert_llava_checkpoint.py"


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Which checkpoint to start from and which of its parameters train."""

    model_name_or_path: str = field(
        metadata={"help": "An UmbrellaLlava checkpoint: a Hub id or a local folder (model + processor)."}
    )
    train_mode: str = field(
        default="embedder",
        metadata={
            "help": "What trains: 'embedder' (only the 3-D patch embedder; the usual first stage), "
            "'embedder_projector', 'full' (every parameter), or 'lora' (LoRA on the language model's linear "
            "layers, with the embedder and projector fully trained).",
            "choices": list(TRAIN_MODES),
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (train_mode=lora)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (train_mode=lora)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input (train_mode=lora)."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names of the language model's linear layers that get LoRA (e.g. q_proj v_proj); default: every "
            "linear layer of the language model. The vision tower and lm_head never get LoRA."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype the weights are loaded in. float32 keeps fp32 master weights (use --bf16 for mixed "
            "precision); 'auto' takes the checkpoint's dtype.",
            "choices": ["float32", "bfloat16", "float16", "auto"],
        },
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention implementation (eager, sdpa, flash_attention_2, ...)."}
    )
    trust_remote_code: bool = field(
        default=True,
        metadata={
            "help": "Passed to from_pretrained. The installed umbrella_llava classes take precedence over a "
            "checkpoint's own code, so checkpoints written by this script carry the package's code."
        },
    )


@dataclass
class DataArguments:
    """Where the conversations and volumes are, and how generation accuracy is measured."""

    train_data: str = field(
        metadata={"help": "Training conversations: a .json / .jsonl file or a folder of them (UMBRELLA or LLaVA)."}
    )
    eval_data: str | None = field(
        default=None,
        metadata={"help": "Held-out conversations: eval loss (with --eval_strategy) and generation accuracy."},
    )
    image_root: str | None = field(
        default=None, metadata={"help": "Folder relative volume paths resolve against (default: each file's folder)."}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Truncate token sequences to this length (never through an image block)."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Folder for preprocessed volumes, so later epochs skip NIfTI decoding."}
    )
    on_invalid: str = field(
        default="error",
        metadata={
            "help": "An invalid record stops the run ('error') or is skipped with a warning.",
            "choices": ["error", "skip"],
        },
    )
    check_data: bool = field(
        default=False,
        metadata={
            "help": "Decode every volume once before the first step (as umbrella-check-data does), so that a bad file "
            "is reported with all the others now, or skipped with --on_invalid skip, instead of failing hours in."
        },
    )
    allow_outside_image_root: bool = field(
        default=False,
        metadata={"help": "Accept volume paths that lead out of --image_root (../ or absolute elsewhere)."},
    )
    generation_eval_steps: int | None = field(
        default=None,
        metadata={
            "help": "Also measure generation accuracy on --eval_data every N steps (it is always measured after "
            "training)."
        },
    )
    generation_max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Longest generated answer; default: the longest reference answer in tokens + 16."},
    )


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse command-line flags, or a single `.json` / `.yaml` file holding them, into the three argument groups.

    Flags must be spelled in full: abbreviations are refused like unknown flags.

    Raises:
        SystemExit: for a missing required flag or a bad choice (argparse's message).
        ValueError: for a flag no group knows, naming it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    # argparse would otherwise take a typo such as --learning_rat for the flag it abbreviates.
    parser.allow_abbrev = False
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        path = os.path.abspath(argv[0])
        parse = parser.parse_json_file if path.endswith(".json") else parser.parse_yaml_file
        return parse(path, allow_extra_keys=False)
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


# ---------------------------------------------------------------------------------------------------------------------
# Distributed launch checks
# ---------------------------------------------------------------------------------------------------------------------


def _accelerator_available() -> bool:
    if torch.cuda.is_available():
        return True
    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator is not None and accelerator.is_available())


def check_distributed_launch(training_args: TrainingArguments, environ: dict[str, str] | None = None) -> None:
    """Refuse a multi-process launch whose processes would not form one process group.

    Under `torchrun` / `accelerate launch` on a machine without an accelerator, the Trainer joins the processes into
    one gloo group only with `use_cpu=True`; otherwise each process trains alone on the whole dataset and nothing
    says so. We raise instead of setting `use_cpu` ourselves: on a GPU machine, a missing accelerator usually means
    a broken driver or `CUDA_VISIBLE_DEVICES`, which should not silently become a CPU run.

    Raises:
        ValueError: if `WORLD_SIZE > 1`, no accelerator is visible and `use_cpu` is False.
    """
    environ = os.environ if environ is None else environ
    world_size = int(environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not training_args.use_cpu and not _accelerator_available():
        raise ValueError(
            f"Launched with WORLD_SIZE={world_size} but no GPU or other accelerator is visible and --use_cpu is not "
            "set: each process would train alone on the whole dataset instead of forming one group. Pass --use_cpu "
            "to train on CPUs (gloo), or make the GPUs visible (check the driver and CUDA_VISIBLE_DEVICES)."
        )


def check_process_group(training_args: TrainingArguments, environ: dict[str, str] | None = None) -> int:
    """After the Trainer is set up, prove that all launched processes are in one process group.

    Returns:
        The world size.

    Raises:
        RuntimeError: if the Trainer's world size, the process group's size and `WORLD_SIZE` disagree, or an
            all-reduce across the group does not see every rank.
    """
    environ = os.environ if environ is None else environ
    launched = int(environ.get("WORLD_SIZE", "1"))
    if launched == 1:
        return 1
    group_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    if training_args.world_size != launched or group_size != launched:
        raise RuntimeError(
            f"WORLD_SIZE={launched} processes were launched, but the Trainer sees world_size="
            f"{training_args.world_size} and the process group has {group_size} members; the processes did not "
            "form one group."
        )
    ranks = torch.zeros(launched, dtype=torch.float64, device=training_args.device)
    ranks[dist.get_rank()] = 1
    dist.all_reduce(ranks)
    if not bool((ranks == 1).all()):
        raise RuntimeError(f"An all-reduce over the process group saw ranks {ranks.tolist()}; expected one of each.")
    return launched


def parameter_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every trainable parameter's bytes, in name order: equal across ranks iff the replicas agree."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_replicas_in_sync(trainer: Trainer) -> dict[str, Any]:
    """After training, check that every rank holds the same trainable weights, and record the check.

    Writes `output_dir/distributed_check.json` (main process) with the world size, the backend and each rank's
    parameter fingerprint. Skipped under DeepSpeed, whose ZeRO stages shard the parameters.

    Raises:
        RuntimeError: if the ranks' trainable parameters differ.
    """
    args = trainer.args
    report: dict[str, Any] = {"world_size": args.world_size, "process_index": args.process_index}
    if args.world_size > 1 and not trainer.is_deepspeed_enabled:
        fingerprints: list[str | None] = [None] * args.world_size
        dist.all_gather_object(fingerprints, parameter_fingerprint(trainer.model))
        report.update(backend=dist.get_backend(), fingerprints=fingerprints, in_sync=len(set(fingerprints)) == 1)
    elif args.world_size == 1:
        report.update(fingerprints=[parameter_fingerprint(trainer.model)], in_sync=True)
    if args.should_save:
        os.makedirs(args.output_dir, exist_ok=True)
        Path(args.output_dir, DISTRIBUTED_REPORT).write_text(json.dumps(report, indent=2))
    if report.get("in_sync") is False:
        raise RuntimeError(f"The ranks' trainable parameters differ after training: {report['fingerprints']}.")
    return report


# ---------------------------------------------------------------------------------------------------------------------
# Model, processor and what trains
# ---------------------------------------------------------------------------------------------------------------------


def load_model_and_processor(model_args: ModelArguments) -> tuple[PreTrainedModel, UmbrellaLlavaProcessor]:
    """Load an UmbrellaLlava model and its processor from a Hub id or a folder.

    Importing umbrella_llava registers its classes with the Auto classes, so they take precedence over a checkpoint's
    own code, and registers them for `auto_map`, so every folder the Trainer saves carries the code (model and
    processor) and loads with `trust_remote_code=True` without the package.

    Raises:
        ValueError: if the checkpoint cannot be read, is a stock LLaVA (pointing at the conversion script) or another
            model, or if its processor is not an UmbrellaLlavaProcessor matching the model's `image_seq_length`.
    """
    source = model_args.model_name_or_path
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(f"--model_name_or_path {source}: cannot read a model config there ({error}).") from error
    if config.model_type != UmbrellaLlavaConfig.model_type:
        hint = (
            f" It is a stock LLaVA checkpoint: convert it first with `python {CONVERT_SCRIPT} --base {source} "
            "--output_dir ...`, then train the converted folder."
            if config.model_type.startswith("llava")
            else ""
        )
        raise ValueError(
            f"--model_name_or_path {source} is a '{config.model_type}' checkpoint, not an UmbrellaLlava one "
            f"(model_type '{UmbrellaLlavaConfig.model_type}').{hint}"
        )

    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    load_kwargs: dict[str, Any] = {"trust_remote_code": model_args.trust_remote_code, "dtype": dtype}
    if model_args.attn_implementation is not None:
        load_kwargs["attn_implementation"] = model_args.attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, **load_kwargs)
    except Exception as error:
        damaged = damaged_weight_files(source) if os.path.isdir(source) else {}
        if not damaged:
            raise
        named = "; ".join(f"{os.path.join(source, name)} {reason}" for name, reason in damaged.items())
        raise ValueError(f"--model_name_or_path {source}: {named}.") from error

    try:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ValueError(f"--model_name_or_path {source}: cannot load its processor ({error}).") from error
    if type(processor).__name__ != UmbrellaLlavaProcessor.__name__:
        raise ValueError(
            f"--model_name_or_path {source} holds no UmbrellaLlavaProcessor (AutoProcessor gave a "
            f"{type(processor).__name__}); save the processor next to the model (processor.save_pretrained)."
        )
    if processor.image_seq_length != model.config.image_seq_length:
        raise ValueError(
            f"--model_name_or_path {source}: the processor expands each volume into {processor.image_seq_length} "
            f"image tokens, the model expects {model.config.image_seq_length}."
        )
    return model, processor


def language_model_linear_names(model: nn.Module) -> list[str]:
    """Leaf names (`q_proj`, `down_proj`, ...) of the `nn.Linear` layers inside the language model, sorted."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if name.startswith(LANGUAGE_MODEL + ".") and isinstance(module, nn.Linear)
        }
    )


def configure_trainable_parameters(model: PreTrainedModel, model_args: ModelArguments) -> nn.Module:
    """Freeze all but what `model_args.train_mode` trains; for `lora`, wrap the model with PEFT.

    - `embedder`: `model.vision_tower.embeddings` (the 3-D patch embedder) only.
    - `embedder_projector`: the embedder and `model.multi_modal_projector`.
    - `full`: every parameter.
    - `lora`: LoRA adapters on the language model's linear layers (`lora_target_modules`, default all of them; the
      vision tower and `lm_head` never), with the embedder and projector fully trained as PEFT `modules_to_save`.

    Returns:
        The model to train: the same module, or a `PeftModel` for `lora`.

    Raises:
        ValueError: for an unknown mode, or LoRA target names that are not linear layers of the language model.
        ImportError: for `lora` without peft installed.
    """
    mode = model_args.train_mode
    if mode not in TRAIN_MODES:
        raise ValueError(f"--train_mode must be one of {TRAIN_MODES}, got {mode!r}.")
    if mode == "full":
        model.requires_grad_(True)
        return model
    if mode in ("embedder", "embedder_projector"):
        trained = (EMBEDDER,) if mode == "embedder" else (EMBEDDER, PROJECTOR)
        model.requires_grad_(False)
        for prefix in trained:
            model.get_submodule(prefix).requires_grad_(True)
        return model

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("--train_mode lora needs peft: `pip install peft` (or `pip install .[lora]`).") from error
    available = language_model_linear_names(model)
    targets = model_args.lora_target_modules or available
    unknown = sorted(set(targets) - set(available))
    if unknown:
        raise ValueError(
            f"--lora_target_modules {unknown} are not linear layers of the language model; it has {available}."
        )
    lora_config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        # A regex, so that the vision tower's q_proj/k_proj/v_proj (same names as the LM's) are left alone.
        target_modules=rf"{re.escape(LANGUAGE_MODEL)}\..*\.({'|'.join(map(re.escape, targets))})",
        modules_to_save=["vision_tower.embeddings", "multi_modal_projector"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts; a tied weight counts once."""
    seen, trainable, total = set(), 0, 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable, total


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def load_dataset(
    path: str, processor: UmbrellaLlavaProcessor, data_args: DataArguments, flag: str
) -> ConversationDataset:
    """A [`ConversationDataset`] for `--train_data` / `--eval_data`; errors name the flag and the file.

    Raises:
        ValueError / FileNotFoundError: for a missing path, a file that does not parse (file and line for JSONL), an
            invalid record (with `on_invalid=error`) or a dataset with no valid record.
    """
    try:
        return ConversationDataset(
            path,
            processor,
            image_root=data_args.image_root,
            max_length=data_args.max_length,
            on_invalid=data_args.on_invalid,
            cache_dir=data_args.cache_dir,
            allow_outside_image_root=data_args.allow_outside_image_root,
            check_volumes=data_args.check_data,
        )
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{flag} {path}: {error}") from error
    except ValueError as error:
        raise ValueError(f"{flag} {path}: {error}") from error


# ---------------------------------------------------------------------------------------------------------------------
# Generation accuracy
# ---------------------------------------------------------------------------------------------------------------------

UNTYPED = "untyped"


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


def _count_placeholders(content: str | list[dict[str, Any]], image_token: str) -> int:
    if isinstance(content, str):
        return content.count(image_token)
    return sum(1 if item["type"] == "image" else item["text"].count(image_token) for item in content)


def generation_prompt(record: ConversationRecord, image_token: str = "<image>") -> tuple[list[dict[str, Any]], str]:
    """Split a record into the prompt (every turn before the last assistant turn) and the reference answer.

    Raises:
        ValueError: naming the record, if its last assistant turn holds an image placeholder (its volume would be
            missing from the prompt).
    """
    last = max(i for i, message in enumerate(record.messages) if message["role"] == "assistant")
    answer = record.messages[last]["content"]
    if _count_placeholders(answer, image_token):
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


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


def _log_main(training_args: TrainingArguments, message: str) -> None:
    if training_args.process_index == 0:
        print(message, flush=True)


def resolve_resume_checkpoint(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint` as a folder: a path as given, or `last` / `true` for the newest complete
    checkpoint-N in `output_dir`. An incomplete one (a save that was killed, a damaged file; see
    `checkpoints.incomplete_checkpoint_reasons`) is skipped by `last` with a warning naming it and why, and refused
    when named.

    Raises:
        FileNotFoundError: if the folder does not exist, or `last` finds no complete checkpoint.
        ValueError: if the named folder is incomplete, naming each damaged or missing file.
    """
    value = training_args.resume_from_checkpoint
    if value is None or value.lower() == "false":
        return None
    if value.lower() not in ("last", "true"):
        if not os.path.isdir(value):
            raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such folder.")
        reasons = incomplete_checkpoint_reasons(value)
        if reasons:
            raise ValueError(f"--resume_from_checkpoint {value} is incomplete: {'; '.join(reasons)}.")
        return value
    output_dir = training_args.output_dir
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    for _, name in sorted(((int(match[1]), name) for name in names if (match := pattern.match(name))), reverse=True):
        folder = os.path.join(output_dir, name)
        if not os.path.isdir(folder):
            continue
        reasons = incomplete_checkpoint_reasons(folder)
        if not reasons:
            return folder
        logger.warning(
            "--resume_from_checkpoint %s: skipping %s, which is incomplete: %s.", value, folder, "; ".join(reasons)
        )
    raise FileNotFoundError(f"--resume_from_checkpoint {value}: no complete checkpoint-N folder in {output_dir}.")


def build_trainer(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> tuple[Trainer, GenerationAccuracyCallback | None]:
    """Everything up to the first step: checks, model, what trains, datasets, the stock Trainer.

    Raises:
        ValueError / FileNotFoundError / RuntimeError: for every bad input listed in the module docstring, before any
            training step.
    """
    check_distributed_launch(training_args)
    if training_args.ddp_find_unused_parameters is None:
        # Every trainable parameter gets a gradient in every step in every mode (text-only batches run a blank
        # volume through the vision path), so DDP need not search the graph for unused ones.
        training_args.ddp_find_unused_parameters = False
    if not training_args.label_names:
        training_args.label_names = ["labels"]  # the Trainer cannot read them off a PeftModel's signature

    set_seed(training_args.seed)  # LoRA's random init must be the same in a run and in its resumption
    model, processor = load_model_and_processor(model_args)
    train_dataset = load_dataset(data_args.train_data, processor, data_args, "--train_data")
    eval_dataset = None
    if data_args.eval_data is not None:
        eval_dataset = load_dataset(data_args.eval_data, processor, data_args, "--eval_data")
        for record in eval_dataset.records:  # refuse an unusable eval record now, not after hours of training
            generation_prompt(record, processor.image_token)
    model = configure_trainable_parameters(model, model_args)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=UmbrellaCollator(processor),
        processing_class=processor,
    )
    world_size = check_process_group(trainer.args)
    trainable, total = count_parameters(model)
    _log_main(
        training_args,
        f"train_mode={model_args.train_mode}: {trainable:,} of {total:,} parameters trainable "
        f"({100 * trainable / total:.2f}%); world_size={world_size}, global batch "
        f"{training_args.per_device_train_batch_size * world_size * training_args.gradient_accumulation_steps}",
    )

    generation_callback = None
    if eval_dataset is not None:
        generation_callback = GenerationAccuracyCallback(
            trainer, eval_dataset, data_args.generation_eval_steps, data_args.generation_max_new_tokens
        )
        trainer.add_callback(generation_callback)
    return trainer, generation_callback


def save_final_model(trainer: Trainer, train_mode: str) -> None:
    """Save the trained model to `output_dir` as a complete trust_remote_code folder (model, code, processor).

    With LoRA, the adapters are merged into the base weights first, so the folder loads without peft; the adapter
    itself is in every `checkpoint-N` (which is what `--resume_from_checkpoint` reads).
    """
    args = trainer.args
    if train_mode != "lora" or trainer.is_deepspeed_enabled:
        trainer.save_model()
        return
    merged = trainer.model.merge_and_unload()
    trainer.model = merged
    if args.should_save:
        merged.save_pretrained(args.output_dir)
        trainer.processing_class.save_pretrained(args.output_dir)


def run_training(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> Trainer:
    """Build, train (resuming if asked), check the replicas, save, and measure generation accuracy."""
    checkpoint = resolve_resume_checkpoint(training_args)
    trainer, generation_callback = build_trainer(model_args, data_args, training_args)
    trainer.train(resume_from_checkpoint=checkpoint)
    check_replicas_in_sync(trainer)
    if generation_callback is not None:
        metrics = generation_callback.evaluate()
        _log_main(training_args, f"generation accuracy: {json.dumps(metrics)}")
    save_final_model(trainer, model_args.train_mode)
    trainer.save_state()  # after the evaluation, so that trainer_state.json holds its metrics too
    return trainer


def main(argv: list[str] | None = None) -> Trainer:
    """Entry point of `scripts/train.py`: parse flags and run."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, training_args = parse_arguments(argv)
    return run_training(model_args, data_args, training_args)


__all__ = [
    "DataArguments",
    "GenerationAccuracyCallback",
    "ModelArguments",
    "TRAIN_MODES",
    "accuracy_metrics",
    "build_trainer",
    "check_distributed_launch",
    "check_process_group",
    "check_replicas_in_sync",
    "configure_trainable_parameters",
    "count_parameters",
    "evaluate_generation",
    "generation_prompt",
    "load_model_and_processor",
    "main",
    "normalize_answer",
    "parameter_fingerprint",
    "run_training",
]
