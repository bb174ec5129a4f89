"""Command-line front ends of conversion, sharing and evaluation: `umbrella-convert`, `umbrella-push` and
`umbrella-evaluate`.

Each parses its flags, calls the library function (`conversion.convert_llava_checkpoint`,
`hub.push_checkpoint_to_hub`) and turns a bad input into argparse's exit status 2 with the message. The console
commands of the installed package and `scripts/convert_llava_checkpoint.py` / `scripts/push_to_hub.py` of a clone run
these same functions; `umbrella-evaluate` loads a model with the Auto classes and runs `evaluation.evaluate_generation`
─▶ `metrics.compute_metrics` ─▶ `report.write_evaluation`. (`umbrella-train` is `training.main`, `umbrella-demo` is
`demo.main`, `umbrella-preview` is `preview.main`.)
"""

import argparse
import json
import sys
from pathlib import Path

from .conversion import CHAT_TEMPLATE_CHOICES, DTYPES, EMBEDDER_INITS, convert_llava_checkpoint
from .hub import DEFAULT_LICENSE, DEFAULT_TEMPLATE, push_checkpoint_to_hub

CONVERT_DESCRIPTION = """\
Convert a stock LLaVA checkpoint (Hub id or folder) into an UmbrellaLlava checkpoint for 3-D volumes.

    umbrella-convert --base llava-hf/llava-interleave-qwen-0.5b-hf \\
        --output_dir checkpoints/umbrella-0.5b --volume_size 96 --patch_size 16
    (in a clone: python scripts/convert_llava_checkpoint.py ...)

The language model, projector, lm_head and vision encoder layers are copied bit-identically; the 3-D patch embedder
is inflated from the tower's 2-D one (default) or initialised randomly (`--embedder_init random`). The output folder
holds the model, processor, tokenizer, chat template and code, and loads with `trust_remote_code=True`. The recipe is
documented in `umbrella_llava/conversion.py`.
"""

PUSH_DESCRIPTION = """\
Share an UmbrellaLlava checkpoint on the Hugging Face Hub, with a model card, in one commit.

    umbrella-push --checkpoint runs/stage2 --repo_id me/umbrella-brain-0.5b --private
    umbrella-push --checkpoint runs/stage2 --repo_id me/umbrella-brain-0.5b --dry_run --output_dir upload
    (in a clone: python scripts/push_to_hub.py ...)

The checkpoint is checked first (config, weights, code, processor, tokenizer, chat template); what is missing is named
and nothing is sent. `--dry_run` writes the exact folder that would be uploaded into `--output_dir` and contacts
nothing. Log in with `hf auth login` or set `HF_TOKEN` before a real upload.
"""


# ---------------------------------------------------------------------------------------------------------------------
# umbrella-convert
# ---------------------------------------------------------------------------------------------------------------------


def build_convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=CONVERT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--base", required=True, help="Hub id or local folder of a stock LLaVA checkpoint.")
    parser.add_argument("--output_dir", required=True, help="Folder to write the UmbrellaLlava checkpoint into.")
    parser.add_argument(
        "--volume_size", required=True, type=int, nargs="+", metavar="N", help="H W D in voxels, or one int (cube)."
    )
    parser.add_argument(
        "--patch_size", required=True, type=int, nargs="+", metavar="N", help="3-D patch H W D, or one int (cube)."
    )
    parser.add_argument("--volume_channels", type=int, default=1, help="Channels per volume (default 1).")
    parser.add_argument(
        "--merge_size",
        type=int,
        nargs="+",
        default=[1],
        metavar="N",
        help="Patch tokens H W D (or one int) averaged into one image token: the token budget (default 1: none).",
    )
    parser.add_argument("--embedder_init", choices=EMBEDDER_INITS, default="inflate")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="auto", help="'auto' keeps the base's dtype.")
    parser.add_argument(
        "--vision_feature_select_strategy",
        choices=("default", "full"),
        default=None,
        help="Override the base's strategy (SigLIP towers need 'full').",
    )
    parser.add_argument(
        "--chat_template",
        default="auto",
        help=f"One of {CHAT_TEMPLATE_CHOICES} or a .jinja file (auto: ChatML for ChatML tokenizers, else the base's).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of --embedder_init random.")
    parser.add_argument("--overwrite", action="store_true", help="Write into a non-empty --output_dir.")
    return parser


def _one_or_three(parser: argparse.ArgumentParser, values: list[int], flag: str) -> int | list[int]:
    if len(values) not in (1, 3):
        parser.error(f"{flag} takes one int (a cube) or three (H W D), got {len(values)}: {values}")
    return values[0] if len(values) == 1 else values


def convert_main(argv: list[str] | None = None) -> None:
    """`umbrella-convert`: flags → `convert_llava_checkpoint`; a bad input exits with status 2 and its message."""
    parser = build_convert_parser()
    args = parser.parse_args(argv)
    try:
        output_dir = convert_llava_checkpoint(
            base=args.base,
            output_dir=args.output_dir,
            volume_size=_one_or_three(parser, args.volume_size, "--volume_size"),
            patch_size=_one_or_three(parser, args.patch_size, "--patch_size"),
            volume_channels=args.volume_channels,
            embedder_init=args.embedder_init,
            dtype=args.dtype,
            vision_feature_select_strategy=args.vision_feature_select_strategy,
            chat_template=args.chat_template,
            seed=args.seed,
            overwrite=args.overwrite,
            merge_size=_one_or_three(parser, args.merge_size, "--merge_size"),
        )
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"Wrote the UmbrellaLlava checkpoint to {output_dir}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------------
# umbrella-push
# ---------------------------------------------------------------------------------------------------------------------


def build_push_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=PUSH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--checkpoint", required=True, help="A complete UmbrellaLlava folder (converted or trained).")
    parser.add_argument("--repo_id", required=True, help="Hub repo to create or update, as user/name.")
    parser.add_argument("--private", action="store_true", help="Create the repo private.")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument(
        "--base_model", default=None, help="Hub id for the card's base_model (default: the converter's record)."
    )
    parser.add_argument(
        "--license", default=DEFAULT_LICENSE, help=f"License id for the card (default {DEFAULT_LICENSE})."
    )
    parser.add_argument(
        "--template", type=Path, default=DEFAULT_TEMPLATE, help="Model card template (Jinja markdown)."
    )
    parser.add_argument(
        "--dry_run", action="store_true", help="Write the upload folder to --output_dir; send nothing."
    )
    parser.add_argument("--output_dir", type=Path, default=None, help="Where --dry_run writes the upload folder.")
    parser.add_argument(
        "--with_app",
        action="store_true",
        help="Add the web page (umbrella-app) as app.py and requirements.txt: it loads the model from its own folder, "
        "or as a Space from --repo_id.",
    )
    parser.add_argument(
        "--app_requirement",
        default=None,
        help="The requirements.txt line a Space installs this package from (default umbrella_llava[app]; e.g. "
        "'umbrella_llava[app] @ git+https://github.com/you/umbrella_llava').",
    )
    return parser


def _default_app_requirement() -> str:
    from .app import APP_REQUIREMENT

    return APP_REQUIREMENT


def push_main(argv: list[str] | None = None) -> None:
    """`umbrella-push`: flags → `push_checkpoint_to_hub`; a bad input exits with status 2 and its message."""
    parser = build_push_parser()
    args = parser.parse_args(argv)
    if args.dry_run != (args.output_dir is not None):
        parser.error("--dry_run and --output_dir go together: the dry run writes the upload folder to --output_dir.")
    if args.app_requirement is not None and not args.with_app:
        parser.error("--app_requirement goes with --with_app.")
    try:
        result = push_checkpoint_to_hub(
            args.checkpoint,
            args.repo_id,
            private=args.private,
            commit_message=args.commit_message,
            base_model=args.base_model,
            license=args.license,
            template=args.template,
            dry_run_dir=args.output_dir if args.dry_run else None,
            app_requirement=(args.app_requirement or _default_app_requirement()) if args.with_app else None,
        )
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if args.dry_run:
        print(f"Dry run: wrote the upload folder to {result}; nothing was sent.", file=sys.stderr)
    else:
        print(
            f"Uploaded {args.checkpoint} to https://huggingface.co/{args.repo_id} ({result.commit_url})",
            file=sys.stderr,
        )


# ---------------------------------------------------------------------------------------------------------------------
# umbrella-evaluate
# ---------------------------------------------------------------------------------------------------------------------

EVALUATE_DESCRIPTION = """\
Evaluate a model on held-out conversations: every assistant turn is asked from the turns before it.

    umbrella-evaluate --model runs/stage2 --data test.jsonl --image_root /data/mri --output_dir eval/stage2
    umbrella-evaluate --model you/umbrella-brain-0.5b --data test.jsonl --output_dir eval/hub \\
        --dtype bfloat16 --device_map auto --generate_kwargs '{"num_beams": 2}'
    (in a clone: python scripts/evaluate.py ...)

Writes OUTPUT_DIR/predictions.jsonl (one line per question), metrics.json (per task and overall, with 95 % bootstrap
intervals) and report.md with a confusion matrix (categorical tasks) or a scatter plot (numeric tasks) per task. Needs
the eval extra: pip install umbrella_llava[eval].
"""


def build_evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=EVALUATE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--model", required=True, help="An UmbrellaLlava checkpoint: a local folder or a Hub id.")
    parser.add_argument("--data", required=True, help="Conversations: a .json / .jsonl file or a folder of them.")
    parser.add_argument("--output_dir", required=True, type=Path, help="Where the predictions, metrics and report go.")
    parser.add_argument("--image_root", default=None, help="Folder relative volume paths resolve against.")
    parser.add_argument("--batch_size", type=int, default=8, help="Questions per generate() call (default 8).")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="Longest answer in tokens (default 32).")
    parser.add_argument(
        "--generate_kwargs",
        default="{}",
        help="Further generate() arguments as a JSON object, e.g. '{\"num_beams\": 2}' (default: greedy).",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples per task (0: no intervals).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap (and of sampling, if enabled).")
    parser.add_argument(
        "--task_kind",
        action="append",
        default=[],
        metavar="TASK=KIND",
        help="Score TASK as KIND (categorical, numeric or free_text) instead of the kind read off its references.",
    )
    parser.add_argument("--dtype", default=None, help="dtype to load the weights in (float32, bfloat16, auto, ...).")
    parser.add_argument("--device_map", default=None, help="Passed to from_pretrained (auto, cuda:0, cpu, ...).")
    parser.add_argument("--cache_dir", default=None, help="Folder for preprocessed volumes (see umbrella-train).")
    parser.add_argument(
        "--on_invalid",
        choices=("error", "skip"),
        default="error",
        help="An invalid record stops the evaluation, or is skipped and counted. A record without an assistant "
        "turn is always skipped and counted.",
    )
    parser.add_argument(
        "--trust_remote_code",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Passed to from_pretrained (default on; the installed package's classes take precedence).",
    )
    return parser


def _generate_kwargs(parser: argparse.ArgumentParser, text: str, max_new_tokens: int) -> dict:
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as error:
        parser.error(f"--generate_kwargs is not valid JSON ({error}): {text}")
    if not isinstance(kwargs, dict):
        parser.error(f"--generate_kwargs must be a JSON object, got {text}")
    if "max_new_tokens" in kwargs:
        parser.error("--generate_kwargs: give max_new_tokens as --max_new_tokens.")
    return {"max_new_tokens": max_new_tokens, "do_sample": False, **kwargs}


def _task_kinds(parser: argparse.ArgumentParser, values: list[str]) -> dict[str, str]:
    from .metrics import KINDS

    kinds = {}
    for value in values:
        task, _, kind = value.rpartition("=")
        if not task or kind not in KINDS:
            parser.error(f"--task_kind takes TASK=KIND with KIND one of {KINDS}, got {value!r}.")
        kinds[task] = kind
    return kinds


def evaluate_main(argv: list[str] | None = None) -> Path:
    """`umbrella-evaluate`: load the model and processor (Auto classes), ask every question of `--data`, write the
    predictions, metrics and report; a bad input exits with status 2 and its message. Returns the output folder."""
    import warnings

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, set_seed

    from .data import ConversationDataset
    from .evaluation import evaluate_generation
    from .metrics import compute_metrics, require_eval_extra
    from .report import evaluation_provenance, write_evaluation

    parser = build_evaluate_parser()
    args = parser.parse_args(argv)
    generation = _generate_kwargs(parser, args.generate_kwargs, args.max_new_tokens)
    task_kinds = _task_kinds(parser, args.task_kind)
    try:
        require_eval_extra()  # before the model is loaded, not after the answers
    except ImportError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    set_seed(args.seed)

    # The processor and the data first: a bad record is reported before a large model is loaded.
    try:
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: --model {args.model}: cannot load its processor ({error})\n")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the skipped records are counted in metrics.json
            dataset = ConversationDataset(
                args.data, processor, image_root=args.image_root, on_invalid="skip", cache_dir=args.cache_dir
            )
    except (OSError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: --data {args.data}: {error}\n")
    problems = [(where, kind, message) for where, kind, message in dataset.skipped if kind != "no assistant turn"]
    if problems and args.on_invalid == "error":
        listed = "".join(f"\n  - {message}" for _, _, message in problems[:20])
        parser.exit(2, f"{parser.prog}: error: --data {args.data}: {len(problems)} invalid records:{listed}\n")

    load_kwargs: dict = {"trust_remote_code": args.trust_remote_code}
    if args.dtype is not None:
        load_kwargs["dtype"] = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype, None)
        if not isinstance(load_kwargs["dtype"], (str, torch.dtype)):
            parser.error(f"--dtype {args.dtype} is not a torch dtype (float32, bfloat16, float16, auto).")
    if args.device_map is not None:
        load_kwargs["device_map"] = args.device_map
    try:
        model = AutoModelForImageTextToText.from_pretrained(args.model, **load_kwargs).eval()
    except (OSError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: --model {args.model}: cannot load it ({error})\n")
    if args.device_map is None and torch.cuda.is_available():
        model.to("cuda")

    try:
        report = evaluate_generation(
            model,
            processor,
            dataset,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            generate_kwargs={key: value for key, value in generation.items() if key != "max_new_tokens"},
            progress=True,
        )
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: --data {args.data}: {error}\n")
    predictions = [{k: v for k, v in row.items() if k != "index"} for row in report["results"]]
    provenance = evaluation_provenance(
        args.model, args.data, generation, n_resamples=args.bootstrap, seed=args.seed, skipped=dataset.skipped
    )
    metrics = compute_metrics(predictions, n_resamples=args.bootstrap, seed=args.seed, task_kinds=task_kinds)
    output_dir = write_evaluation(args.output_dir, predictions, {**provenance, **metrics})
    overall = metrics["overall"]
    print(
        f"{overall['n']} questions, exact match {overall['exact_match']['value']:.3f}; wrote "
        f"{output_dir / 'report.md'}, metrics.json and predictions.jsonl",
        file=sys.stderr,
    )
    return output_dir


__all__ = [
    "build_convert_parser",
    "build_evaluate_parser",
    "build_push_parser",
    "convert_main",
    "evaluate_main",
    "push_main",
]
