"""Share an UmbrellaLlava checkpoint on the Hugging Face Hub: check it, render its model card, upload in one commit.

The upload is a list of `CommitOperationAdd`, built once by `build_upload_operations`: `push_checkpoint_to_hub` sends
it as one commit, and `write_upload_folder` (the dry run) writes the very same files into a folder.

What is uploaded: the weights, `config.json` (with `auto_map`), `generation_config.json`, the remote-code files
(`configuration_*.py`, `modeling_*.py`, `processing_*.py`, `image_processing_*.py`), the processor and tokenizer
files, the chat template, and a `README.md` rendered from `model_cards/README_TEMPLATE.md`. Trainer state in a
checkpoint folder (optimizer, scheduler, RNG state, `training_args.bin`) stays behind.
"""

import fnmatch
import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment
from transformers.dynamic_module_utils import get_relative_imports

from .checkpoints import damaged_weight_files
from .configuration_umbrella_llava import UmbrellaLlavaConfig
from .image_processing_umbrella_llava import DEFAULT_NORMALIZATION
from .report import METRICS_FILE, metrics_table

logger = logging.getLogger(__name__)


def _packaged_template() -> Path:
    """`model_cards/README_TEMPLATE.md`, which an install ships as `umbrella_llava.model_cards` (wheel or editable)."""
    try:
        return Path(str(resources.files(f"{__package__}.model_cards") / "README_TEMPLATE.md"))
    except ModuleNotFoundError:  # a clone run without installing: the folder beside the package
        return Path(__file__).resolve().parents[1] / "model_cards" / "README_TEMPLATE.md"


DEFAULT_TEMPLATE = _packaged_template()
DEFAULT_LICENSE = "apache-2.0"
CARD_TAGS = ["custom_code", "medical", "mri", "3d", "brain", "llava", "umbrella_llava"]

REMOTE_CODE_FILES = (
    "configuration_umbrella_llava.py",
    "modeling_umbrella_llava.py",
    "processing_umbrella_llava.py",
    "image_processing_umbrella_llava.py",
    "dicom_series.py",  # imported by image_processing_umbrella_llava.py for DICOM series folders
)
# Files of a checkpoint folder that belong to the shared model; anything else (Trainer state, logs) stays local.
UPLOAD_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "configuration_*.py",
    "modeling_*.py",
    "processing_*.py",
    "image_processing_*.py",
    "dicom_series.py",
    "pipeline_*.py",
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "metrics.json",  # the evaluation the card's table shows (umbrella-train --generation_metrics, umbrella-evaluate)
)
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be shared as it is; the message names every missing or wrong piece."""


# ---------------------------------------------------------------------------------------------------------------------
# Checking the checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def _weight_files(checkpoint: Path) -> tuple[list[str], list[str]]:
    """(weight files present, weight files named by the shard index but absent)."""
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [s for s in shards if (checkpoint / s).is_file()], [s for s in shards if not (checkpoint / s).is_file()]
    if (checkpoint / "model.safetensors").is_file():
        return ["model.safetensors"], []
    return [], ["model.safetensors (or model.safetensors.index.json with its shards)"]


def _missing_code_files(checkpoint: Path) -> list[str]:
    """The files of REMOTE_CODE_FILES that `checkpoint` lacks and needs: all of them but `dicom_series.py`, which only
    an image processor saved since DICOM support imports (checkpoints saved before it load without it)."""
    missing = [name for name in REMOTE_CODE_FILES if not (checkpoint / name).is_file()]
    image_processing = checkpoint / "image_processing_umbrella_llava.py"
    if "dicom_series.py" in missing and image_processing.is_file():
        if "dicom_series" not in get_relative_imports(image_processing):
            missing.remove("dicom_series.py")
    return missing


def validate_checkpoint(checkpoint: str | os.PathLike) -> UmbrellaLlavaConfig:
    """Check that `checkpoint` is a complete UmbrellaLlava folder that loads with `trust_remote_code=True`.

    Complete means: `config.json` of `model_type="umbrella_llava"` with `auto_map`, safetensors weights (every shard,
    each of whose tensors deserializes), the remote-code files, `processor_config.json` (UmbrellaLlavaProcessor with
    its volume processor), `tokenizer_config.json` with a vocabulary file, and a chat template.

    Returns:
        The checkpoint's config.

    Raises:
        CheckpointError: naming every missing file or wrong field at once.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"--checkpoint {checkpoint} is not a folder.")
    problems = []

    config = None
    if not (checkpoint / "config.json").is_file():
        problems.append("config.json")
    else:
        config_dict = json.loads((checkpoint / "config.json").read_text())
        if config_dict.get("model_type") != UmbrellaLlavaConfig.model_type:
            problems.append(
                f"config.json has model_type {config_dict.get('model_type')!r}, not 'umbrella_llava' (convert a "
                "LLaVA checkpoint with scripts/convert_llava_checkpoint.py first)"
            )
        else:
            config = UmbrellaLlavaConfig.from_pretrained(checkpoint)
            if "AutoModelForImageTextToText" not in (config_dict.get("auto_map") or {}):
                problems.append("config.json has no auto_map (save the model with save_pretrained)")
            # Checkpoints saved before the pipeline existed name none, and load without its file.
            for task, entry in (config_dict.get("custom_pipelines") or {}).items():
                code_file = f"{entry['impl'].split('.')[0]}.py"
                if not (checkpoint / code_file).is_file():
                    problems.append(f"{code_file} (config.json names it for the {task!r} pipeline)")

    _, missing_weights = _weight_files(checkpoint)
    if missing_weights and any(checkpoint.glob("adapter_model.*")):
        missing_weights = [f"{name}: this is a LoRA adapter checkpoint; push the final merged output_dir of "
                           "scripts/train.py instead" for name in missing_weights]  # fmt: skip
    problems += missing_weights
    # Before anything is sent: a weights file that exists but was cut short (a killed save) must not be uploaded.
    problems += [f"{name} {reason}" for name, reason in damaged_weight_files(checkpoint, read_tensors=True).items()]
    problems += _missing_code_files(checkpoint)

    if not (checkpoint / "processor_config.json").is_file():
        problems.append("processor_config.json (save the UmbrellaLlavaProcessor with save_pretrained)")
    else:
        processor_config = json.loads((checkpoint / "processor_config.json").read_text())
        if processor_config.get("processor_class") != "UmbrellaLlavaProcessor":
            problems.append(
                f"processor_config.json is a {processor_config.get('processor_class')!r}, not an UmbrellaLlavaProcessor"
            )
        if "AutoProcessor" not in (processor_config.get("auto_map") or {}):
            problems.append("processor_config.json has no auto_map for AutoProcessor")
        if config is not None and processor_config.get("image_seq_length") != config.image_seq_length:
            problems.append(
                f"processor_config.json has image_seq_length {processor_config.get('image_seq_length')}, the model "
                f"{config.image_seq_length}"
            )
    if not (checkpoint / "tokenizer_config.json").is_file():
        problems.append("tokenizer_config.json")
    if not any((checkpoint / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        problems.append(f"a tokenizer vocabulary ({' or '.join(TOKENIZER_VOCAB_FILES)})")
    if not _has_chat_template(checkpoint):
        problems.append("a chat template (chat_template.jinja)")

    if problems:
        raise CheckpointError(
            f"{checkpoint} is not a complete UmbrellaLlava checkpoint; missing or wrong: " + "; ".join(problems) + "."
        )
    return config


def _has_chat_template(checkpoint: Path) -> bool:
    if (checkpoint / "chat_template.jinja").is_file() or (checkpoint / "chat_template.json").is_file():
        return True
    for name in ("processor_config.json", "tokenizer_config.json"):
        if (checkpoint / name).is_file() and json.loads((checkpoint / name).read_text()).get("chat_template"):
            return True
    return False


def select_upload_files(checkpoint: str | os.PathLike) -> list[str]:
    """Names of the files of `checkpoint` that are shared (see `UPLOAD_PATTERNS`), sorted; the rest is logged."""
    checkpoint = Path(checkpoint)
    names = sorted(path.name for path in checkpoint.iterdir() if path.is_file())
    selected = [name for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in UPLOAD_PATTERNS)]
    left = sorted(set(names) - set(selected) - {"README.md"})
    if left:
        logger.info("Not uploading %s (not part of the shared model)", left)
    return selected


# ---------------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------------


def resolve_base_model(config: UmbrellaLlavaConfig, base_model: str | None = None) -> str | None:
    """The card's `base_model`: `base_model` if given, else the Hub id the converter recorded (`converted_from`).

    A recorded local folder is not a Hub id; it is left out (with a warning) unless `--base_model` names one.

    Raises:
        ValueError: if `base_model` is given but is not a valid Hub repo id.
    """
    if base_model is not None:
        try:
            validate_repo_id(base_model)
        except HFValidationError as error:
            raise ValueError(f"--base_model {base_model!r} is not a Hub model id: {error}") from error
        return base_model
    recorded = getattr(config, "converted_from", None)
    if not recorded:
        return None
    try:
        validate_repo_id(recorded)
    except HFValidationError:
        recorded = None
    if recorded is None or Path(config.converted_from).is_absolute() or Path(config.converted_from).exists():
        logger.warning(
            "The checkpoint was converted from the local folder %s; pass --base_model <hub id> to name the base "
            "model on the card.",
            config.converted_from,
        )
        return None
    return recorded


def _evaluation_section(path: Path) -> tuple[str, str] | None:
    """`(where the numbers come from, the tables)` of a checkpoint's `metrics.json` for the card, or `None` without
    one (or with one that is not an evaluation's, with a warning)."""
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        table = metrics_table(metrics)
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("%s is not an evaluation's metrics.json (%r); the card shows no evaluation.", path, error)
        return None
    data = metrics.get("data") or {}
    source = f"{metrics['overall']['n']} held-out questions"
    if data:
        source += f" from `{Path(data['path']).name}` (SHA-256 `{data['sha256'][:16]}…`)"
    if metrics.get("generation"):
        source += f", generation settings `{json.dumps(metrics['generation'])}`"
    if "global_step" in metrics:
        source += f", measured after training step {metrics['global_step']}"
    if "package_version" in metrics:
        source += f", umbrella_llava {metrics['package_version']}"
    return source, table


def _triple(values) -> str:
    return " × ".join(str(v) for v in values)


def render_model_card(
    checkpoint: str | os.PathLike,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str = DEFAULT_LICENSE,
    template: str | os.PathLike = DEFAULT_TEMPLATE,
) -> ModelCard:
    """Render the model card of `checkpoint` from `template` (Jinja, as `ModelCard.from_template` reads it).

    The YAML metadata holds `library_name: transformers`, `pipeline_tag: image-text-to-text`, `CARD_TAGS`,
    `license` and `base_model` (see `resolve_base_model`); the body is filled from the checkpoint's config and
    volume-processor config, and its evaluation table from the checkpoint's `metrics.json` when there is one
    (`report.metrics_table`). Every placeholder must be filled: an unknown one is an error, not an empty string.

    Args:
        repo_id: the id the usage snippet loads; the checkpoint's path when `None`.

    The template renders in Jinja's sandbox, so a template taken from elsewhere cannot reach Python internals
    (`''.__class__.__mro__`, ...) to run code.

    Raises:
        FileNotFoundError: if `template` does not exist.
        jinja2.UndefinedError: if the template names a placeholder this function does not fill.
        ValueError: naming the template, if it does not parse or reaches for what the sandbox forbids.
    """
    checkpoint = Path(checkpoint)
    template = Path(template)
    if not template.is_file():
        raise FileNotFoundError(f"Model card template not found: {template} (pass --template).")
    config = UmbrellaLlavaConfig.from_pretrained(checkpoint)
    base_model = resolve_base_model(config, base_model)
    processor_path = checkpoint / "processor_config.json"
    volume_processor: dict[str, Any] = {}
    if processor_path.is_file():
        volume_processor = json.loads(processor_path.read_text()).get("image_processor", {})
    evaluation = _evaluation_section(checkpoint / METRICS_FILE)

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=list(CARD_TAGS),
        license=license,
        base_model=base_model,
    )
    model_id = repo_id or str(checkpoint)
    values = {
        "model_name": (repo_id or checkpoint.resolve().name).split("/")[-1],
        "model_id": model_id,
        "base_model": base_model,
        "embedder_init": getattr(config, "volume_embedder_init", None),
        "volume_size": _triple(config.volume_size),
        "volume_patch_size": _triple(config.volume_patch_size),
        "volume_grid": _triple(config.volume_grid),
        "volume_merge_size": _triple(config.volume_merge_size),
        "volume_merge_size_flag": " ".join(map(str, config.volume_merge_size)),
        "frames": volume_processor.get("frames", "error"),
        "volume_size_flag": " ".join(map(str, config.volume_size)),
        "volume_patch_size_flag": " ".join(map(str, config.volume_patch_size)),
        "volume_channels": config.volume_channels,
        "image_seq_length": config.image_seq_length,
        "vision_tower": config.vision_config.model_type,
        "vision_layers": config.vision_config.num_hidden_layers,
        "vision_hidden_size": config.vision_config.hidden_size,
        "text_model": config.text_config.model_type,
        "text_layers": config.text_config.num_hidden_layers,
        "text_hidden_size": config.text_config.hidden_size,
        "voxel_spacing": _triple(volume_processor["voxel_spacing"]) if volume_processor.get("voxel_spacing") else None,
        "normalization": volume_processor.get("normalization", DEFAULT_NORMALIZATION),
        "clip_percentiles": "–".join(map(str, volume_processor["clip_percentiles"]))
        if volume_processor.get("clip_percentiles")
        else None,
        "evaluation_source": evaluation[0] if evaluation else None,
        "evaluation_table": evaluation[1] if evaluation else None,
    }
    environment = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        content = environment.from_string(template.read_text(encoding="utf-8")).render(
            card_data=card_data.to_yaml(), **values
        )
    except SecurityError as error:
        raise ValueError(
            f"Model card template {template} does what a template may not ({error}); it renders in a sandbox. Use "
            "only the placeholders render_model_card fills."
        ) from error
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"Model card template {template}, line {error.lineno}: {error.message}") from error
    return ModelCard(content)


# ---------------------------------------------------------------------------------------------------------------------
# Upload
# ---------------------------------------------------------------------------------------------------------------------


def build_upload_operations(
    checkpoint: str | os.PathLike,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str = DEFAULT_LICENSE,
    template: str | os.PathLike = DEFAULT_TEMPLATE,
    app_requirement: str | None = None,
) -> list[CommitOperationAdd]:
    """Check `checkpoint` and list everything one commit uploads: its shared files and the rendered `README.md`, and
    with `app_requirement` the web page over the model, `app.py` and `requirements.txt` (see `app.space_files`).

    Raises:
        CheckpointError: see `validate_checkpoint`.
    """
    checkpoint = Path(checkpoint)
    validate_checkpoint(checkpoint)
    card = render_model_card(checkpoint, repo_id, base_model=base_model, license=license, template=template)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(checkpoint / name))
        for name in select_upload_files(checkpoint)
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
    if app_requirement is not None:
        from .app import space_files

        operations += [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=content)
            for name, content in space_files(repo_id, app_requirement).items()
        ]
    return operations


def write_upload_folder(operations: list[CommitOperationAdd], output_dir: str | os.PathLike) -> Path:
    """Write `operations` into `output_dir` exactly as the Hub repo would hold them (the dry run)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for operation in operations:
        target = output_dir / operation.path_in_repo
        with operation.as_file() as source:
            target.write_bytes(source.read())
    return output_dir


def push_checkpoint_to_hub(
    checkpoint: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    commit_message: str | None = None,
    base_model: str | None = None,
    license: str = DEFAULT_LICENSE,
    template: str | os.PathLike = DEFAULT_TEMPLATE,
    dry_run_dir: str | os.PathLike | None = None,
    token: str | None = None,
    app_requirement: str | None = None,
) -> Any:
    """Upload `checkpoint` with its model card to `repo_id` in one commit, or write it to `dry_run_dir` instead.

    Args:
        checkpoint: a complete UmbrellaLlava folder (see `validate_checkpoint`).
        repo_id: `user/name` or `org/name` on the Hub; created if absent.
        private: create the repo private (an existing repo keeps its visibility).
        commit_message: defaults to "Upload UmbrellaLlava model".
        base_model, license, template: see `render_model_card`.
        dry_run_dir: if set, write the files that would be uploaded there and contact nothing.
        token: Hub token; the cached login (`hf auth login`) or `HF_TOKEN` when `None`.
        app_requirement: if set, add the web page (`app.py`, and `requirements.txt` holding this requirement).

    Returns:
        The `CommitInfo` of the upload, or the dry-run folder.

    Raises:
        CheckpointError: before anything is sent, if the checkpoint is incomplete.
        ValueError: if `repo_id` is not a valid Hub id.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"--repo_id {repo_id!r} is not a valid Hub id (user/name): {error}") from error
    operations = build_upload_operations(
        checkpoint, repo_id, base_model=base_model, license=license, template=template, app_requirement=app_requirement
    )
    if dry_run_dir is not None:
        return write_upload_folder(operations, dry_run_dir)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message or "Upload UmbrellaLlava model",
        repo_type="model",
    )


__all__ = [
    "CARD_TAGS",
    "CheckpointError",
    "DEFAULT_TEMPLATE",
    "REMOTE_CODE_FILES",
    "build_upload_operations",
    "push_checkpoint_to_hub",
    "render_model_card",
    "resolve_base_model",
    "select_upload_files",
    "validate_checkpoint",
    "write_upload_folder",
]
