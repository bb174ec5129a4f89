"""Fine-tuning UmbrellaLlava with the stock `transformers.Trainer`: arguments, what trains, building and running.

`scripts/train.py` and the `umbrella-train` command are thin entry points over [`main`]; everything it does is
importable from here:

    parse_arguments ─▶ check_distributed_launch ─▶ load_model_and_processor ─▶ configure_trainable_parameters
      ─▶ load_datasets ─▶ Trainer(data_collator=UmbrellaCollator) ─▶ check_process_group ─▶ train
      ─▶ save (model, processor, code, card) ─▶ evaluate_generation

Every input is checked before the first step: unknown flags, a checkpoint that is not an UmbrellaLlava, a data file
that does not parse, an empty dataset, a multi-process launch whose processes would not form one group
(`distributed.py`). Generation accuracy is measured by `evaluation.py`.

Distributed runs (`torchrun`, `accelerate launch`, `--deepspeed`): the Trainer does the data sharding and gradient
averaging.
"""

import json
import logging
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    HfArgumentParser,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.integrations.deepspeed import (
    is_deepspeed_zero3_enabled,
    set_hf_deepspeed_config,
    unset_hf_deepspeed_config,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoints import damaged_weight_files, incomplete_checkpoint_reasons, refused_torch_files
from .configuration_umbrella_llava import UmbrellaLlavaConfig
from .data import ConversationDataset, UmbrellaCollator
from .distributed import check_distributed_launch, check_process_group
from .evaluation import GenerationAccuracyCallback, generation_questions
from .hub import render_model_card
from .metrics import require_eval_extra
from .processing_umbrella_llava import UmbrellaLlavaProcessor

logger = logging.getLogger(__name__)

TRAIN_MODES = ("embedder", "embedder_projector", "full", "lora")
# Module paths inside UmbrellaLlavaForConditionalGeneration.
EMBEDDER = "model.vision_tower.embeddings"
PROJECTOR = "model.multi_modal_projector"
LANGUAGE_MODEL = "model.language_model"
VISION_ENCODER_LAYERS = "model.vision_tower.encoder.layers"
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
    preprocess_device: str | None = field(
        default=None,
        metadata={
            "help": "Preprocess volumes on this device ('cuda'): files are decoded on the CPU, resized and normalised "
            "there. Needs --dataloader_num_workers 0; --decode_threads then decodes a batch's files in parallel."
        },
    )
    decode_threads: int = field(
        default=1, metadata={"help": "Threads that decode a batch's volume files in the process that collates it."}
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
    generation_metrics: bool = field(
        default=False,
        metadata={
            "help": "Log umbrella-evaluate's per-task metrics with 95 %% intervals (accuracy, balanced accuracy, macro "
            "F1; MAE, RMSE, r; ROUGE-L) at every generation evaluation and each of the Trainer's evaluations, and "
            "write output_dir/metrics.json after training (shown on the model card). Needs the eval extra."
        },
    )
    generation_bootstrap: int = field(
        default=1000, metadata={"help": "Bootstrap resamples per task of --generation_metrics (0: no intervals)."}
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


def unread_vision_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The vision encoder layers after the last one whose output `config.vision_feature_layer` reads.

    They never change the model's output nor get a gradient. A converted checkpoint has none (the converter leaves
    them out, see `conversion.umbrella_config_from_llava`); a model built from a config at `vision_feature_layer=-2`
    has one.
    """
    layers = model.get_submodule(VISION_ENCODER_LAYERS)
    feature_layers = model.config.vision_feature_layer
    feature_layers = [feature_layers] if isinstance(feature_layers, int) else feature_layers
    # hidden_states[k] is the output of the first k layers (k = 0: the embeddings), len(layers) + 1 in all.
    last_read = max(layer % (len(layers) + 1) for layer in feature_layers)
    return list(layers)[last_read:]


def configure_trainable_parameters(model: PreTrainedModel, model_args: ModelArguments) -> nn.Module:
    """Freeze all but what `model_args.train_mode` trains; for `lora`, wrap the model with PEFT.

    - `embedder`: `model.vision_tower.embeddings` (the 3-D patch embedder) only.
    - `embedder_projector`: the embedder and `model.multi_modal_projector`.
    - `full`: every parameter but those of [`unread_vision_layers`], which could not get a gradient.
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
        for layer in unread_vision_layers(model):
            layer.requires_grad_(False)
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


def match_zero3_dtype(model: nn.Module) -> None:
    """Give the parameters created after loading the dtype ZeRO-3 gave the loaded ones.

    Under ZeRO-3, `from_pretrained` loads inside `deepspeed.zero.Init`, which partitions the weights and casts them to
    the run's bf16 / fp16; the LoRA adapters PEFT adds afterwards stay fp32, and DeepSpeed's stage-3 optimiser refuses
    a parameter group of mixed dtypes (`assert len(set(t.dtype for t in tensors)) == 1`, seen on an H100 with
    deepspeed 0.19.8). DeepSpeed keeps fp32 master copies of every trainable partition, so nothing is lost.
    """
    dtypes = {parameter.ds_tensor.dtype for parameter in model.parameters() if hasattr(parameter, "ds_tensor")}
    if len(dtypes) != 1:
        return
    (dtype,) = dtypes
    for parameter in model.parameters():
        if not hasattr(parameter, "ds_tensor") and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. `num_parameters` counts a ZeRO-3 partition's local placeholder (empty
    on every rank); the full size of such a parameter is its `ds_numel`."""
    trainable = total = 0
    for parameter in model.parameters():
        count = getattr(parameter, "ds_numel", parameter.numel())
        total += count
        trainable += count if parameter.requires_grad else 0
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
            preprocess_device=data_args.preprocess_device,
        )
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{flag} {path}: {error}") from error
    except ValueError as error:
        raise ValueError(f"{flag} {path}: {error}") from error


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
    skipped = []
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
        skipped.append(f"\n  - {folder}: {'; '.join(reasons)}")
    if not os.path.isdir(output_dir):
        looked = f"{output_dir} does not exist"
    elif not skipped:
        looked = f"{output_dir} holds no {PREFIX_CHECKPOINT_DIR}-N folder"
    else:
        looked = f"every {PREFIX_CHECKPOINT_DIR}-N folder in {output_dir} is incomplete:{''.join(skipped)}"
    raise FileNotFoundError(f"--resume_from_checkpoint {value}: no complete checkpoint to resume from; {looked}")


def check_preprocess_device(data_args: DataArguments, training_args: TrainingArguments) -> None:
    """Refuse, before any step, a preprocessing device that worker processes would have to use, or one that is not
    there."""
    if data_args.preprocess_device is None:
        return
    device = torch.device(data_args.preprocess_device)
    if device.type == "cpu":
        return
    if training_args.dataloader_num_workers > 0:
        raise ValueError(
            f"--preprocess_device {data_args.preprocess_device} preprocesses in the process that reads the items, "
            f"which DataLoader workers cannot do on a GPU: pass --dataloader_num_workers 0 (not "
            f"{training_args.dataloader_num_workers}) and --decode_threads N to decode files in parallel."
        )
    if not getattr(torch, device.type).is_available():
        raise ValueError(f"--preprocess_device {data_args.preprocess_device}: no {device.type} device is available.")


def compile_checkpointed_layers_whole() -> None:
    """Let torch.compile trace a checkpointed vision layer in one graph.

    LLaVA reads the tower's hidden states, which transformers records with forward hooks: a side effect inside each
    checkpointed layer, which dynamo refuses by default (a graph break per layer) because the backward's recompute
    would record them again. Recording them once, in the forward, is what LLaVA needs, so the recompute may skip them.
    """
    import torch._dynamo

    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


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
        # volume through the vision path, and vision layers whose output is never read are frozen, see
        # `unread_vision_layers`), so DDP need not search the graph for unused ones.
        training_args.ddp_find_unused_parameters = False
    if not training_args.label_names:
        training_args.label_names = ["labels"]  # the Trainer cannot read them off a PeftModel's signature

    if data_args.generation_metrics:
        if data_args.eval_data is None:
            raise ValueError("--generation_metrics measures generation on --eval_data; pass --eval_data too.")
        require_eval_extra()  # now, not after training
    check_preprocess_device(data_args, training_args)
    if training_args.torch_compile and training_args.gradient_checkpointing:
        compile_checkpointed_layers_whole()
    set_seed(training_args.seed)  # LoRA's random init must be the same in a run and in its resumption
    model, processor = load_model_and_processor(model_args)
    train_dataset = load_dataset(data_args.train_data, processor, data_args, "--train_data")
    eval_dataset = None
    if data_args.eval_data is not None:
        eval_dataset = load_dataset(data_args.eval_data, processor, data_args, "--eval_data")
        for record in eval_dataset.records:  # refuse an unusable eval record now, not after hours of training
            generation_questions(record, processor.image_token)
    model = configure_trainable_parameters(model, model_args)
    if is_deepspeed_zero3_enabled():
        match_zero3_dtype(model)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=UmbrellaCollator(processor, decode_threads=data_args.decode_threads),
        processing_class=processor,
    )
    world_size = check_process_group(trainer.args)
    for flag, dataset in (("--train_data", train_dataset), ("--eval_data", eval_dataset)):
        if dataset is not None and dataset.duplicates:
            first, earlier = dataset.duplicates[0]
            _log_main(
                training_args,
                f"{flag}: {len(dataset.duplicates)} of {len(dataset)} records repeat an earlier record and are kept, "
                f"so each is seen that many more times per epoch (first: {first} repeats {earlier}; "
                "umbrella-check-data lists them all). Remove them from the file to weigh every record once.",
            )
    trainable, total = parameter_counts(model)
    _log_main(
        training_args,
        f"train_mode={model_args.train_mode}: {trainable:,} of {total:,} parameters trainable "
        f"({100 * trainable / total:.2f}%); world_size={world_size}, global batch "
        f"{training_args.per_device_train_batch_size * world_size * training_args.gradient_accumulation_steps}",
    )

    generation_callback = None
    if eval_dataset is not None:
        generation_callback = GenerationAccuracyCallback(
            trainer,
            eval_dataset,
            data_args.generation_eval_steps,
            data_args.generation_max_new_tokens,
            full_metrics=data_args.generation_metrics,
            n_resamples=data_args.generation_bootstrap,
        )
        trainer.add_callback(generation_callback)
    return trainer, generation_callback


def save_final_model(trainer: Trainer, model_args: ModelArguments) -> None:
    """Save the trained model to `output_dir` as a complete trust_remote_code folder (model, code, processor) with
    its model card (`README.md`).

    With LoRA, the adapters are merged into the base weights first, so the folder loads without peft; the adapter
    itself is in every `checkpoint-N` (which is what `--resume_from_checkpoint` reads). Under DeepSpeed the adapters
    live in the engine's partitions: `Trainer.save_model` gathers them into an adapter folder, which is then merged
    into the base on the main process (`merge_saved_adapter`) and kept in `output_dir/adapter`.
    """
    args = trainer.args
    if model_args.train_mode != "lora":
        trainer.save_model()
    elif trainer.is_deepspeed_enabled:
        trainer.save_model()
        if args.should_save:
            # ZeRO-3 makes from_pretrained partition what it loads across the ranks (zero.Init), a collective the
            # other ranks would never join: the base is read as a plain model while the merge runs.
            unset_hf_deepspeed_config()
            try:
                merge_saved_adapter(args.output_dir, model_args)
            finally:
                set_hf_deepspeed_config(args.hf_deepspeed_config)
        trainer.accelerator.wait_for_everyone()
    else:
        trainer.model = trainer.model.merge_and_unload()
        if args.should_save:
            trainer.model.save_pretrained(args.output_dir)
            trainer.processing_class.save_pretrained(args.output_dir)
    if args.should_save and os.path.isfile(os.path.join(args.output_dir, "config.json")):
        render_model_card(args.output_dir).save(os.path.join(args.output_dir, "README.md"))


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def merge_saved_adapter(output_dir: str, model_args: ModelArguments) -> None:
    """Turn an adapter folder written by `Trainer.save_model` into a complete, merged model folder, in place.

    The base is read again from `--model_name_or_path` (in `--dtype`, on the CPU), the saved adapter (LoRA weights
    and the fully trained embedder and projector) is applied and merged, and the merged model is written over the
    folder. The adapter files move to `output_dir/adapter`, so that `from_pretrained(output_dir)` reads the merged
    model and not the adapter.
    """
    from peft import PeftModel

    adapter_dir = os.path.join(output_dir, "adapter")
    os.makedirs(adapter_dir, exist_ok=True)
    for name in ADAPTER_FILES:
        if os.path.isfile(os.path.join(output_dir, name)):
            os.replace(os.path.join(output_dir, name), os.path.join(adapter_dir, name))
    base, _ = load_model_and_processor(model_args)  # reads only the checkpoint, dtype and loading options
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(output_dir)
    print(f"Merged the LoRA adapter into the base: {output_dir} (adapter kept in {adapter_dir}).", flush=True)


class GenerationEvaluationError(RuntimeError):
    """The generation evaluation after training failed; the trained model is already saved in `output_dir`."""


def run_training(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> Trainer:
    """Build, train (resuming if asked), save, then measure generation accuracy.

    Nothing trained is lost: the model, processor, code and card are saved as soon as training ends, before the
    evaluation, which can fail on its own (out of memory in `generate`, a bad eval volume).

    There is no check after training that the ranks hold the same weights: accelerate wraps the model in torch's
    DistributedDataParallel, which broadcasts rank 0's parameters and buffers when it wraps and all-reduces the
    gradients of every step, so the replicas take the same steps by construction; FSDP and DeepSpeed ZeRO keep one
    sharded copy, with nothing to compare. What such a check caught in practice, processes that never formed one
    group, `check_process_group` refuses before the first step.

    Raises:
        GenerationEvaluationError: if the generation evaluation fails (logged with its traceback, so `umbrella-train`
            exits non-zero); the saved folder stays, and the message names it.
    """
    checkpoint = resolve_resume_checkpoint(training_args)
    trainer, generation_callback = build_trainer(model_args, data_args, training_args)
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except pickle.UnpicklingError as error:
        if checkpoint is None:
            raise
        # torch's weights-only load names neither the file nor the folder; find which file it refused.
        refused = refused_torch_files(checkpoint) or {"(a torch state file)": str(error).splitlines()[0]}
        listed = "; ".join(f"{path}: {reason}" for path, reason in refused.items())
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint}: torch's weights-only load refused {listed}. Such a file holds "
            "pickled objects or code, not only tensors; it may be malicious. Resume from another checkpoint, or "
            "delete the file if you do not need its state (optimizer, scheduler, RNG)."
        ) from error
    save_final_model(trainer, model_args)
    trainer.save_state()
    if generation_callback is not None:
        try:
            metrics = generation_callback.evaluate(final=True)
        except Exception as error:
            logger.exception("The generation evaluation after training failed.")
            raise GenerationEvaluationError(
                f"Training finished and the model is saved in {training_args.output_dir}, but the generation "
                f"evaluation on --eval_data failed afterwards: {error!r}"
            ) from error
        _log_main(training_args, f"generation accuracy: {json.dumps(metrics)}")
        trainer.save_state()  # again, so that trainer_state.json holds the evaluation's metrics too
        card_dir = training_args.output_dir
        if data_args.generation_metrics and training_args.should_save and os.path.isfile(f"{card_dir}/config.json"):
            render_model_card(card_dir).save(os.path.join(card_dir, "README.md"))  # now with metrics.json's table
    return trainer


def main(argv: list[str] | None = None) -> Trainer:
    """Entry point of `scripts/train.py`: parse flags and run."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, training_args = parse_arguments(argv)
    try:
        return run_training(model_args, data_args, training_args)
    finally:
        # A process group left to interpreter shutdown can abort a rank on its way out ("terminate called without
        # an active exception", seen with gloo), failing a run that trained, saved and evaluated.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


__all__ = [
    "DataArguments",
    "GenerationEvaluationError",
    "ModelArguments",
    "TRAIN_MODES",
    "build_trainer",
    "configure_trainable_parameters",
    "load_model_and_processor",
    "main",
    "merge_saved_adapter",
    "run_training",
]
