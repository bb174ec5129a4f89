"""Command-line front ends of conversion and sharing: `umbrella-convert` and `umbrella-push`.

Each parses its flags, calls the library function (`conversion.convert_llava_checkpoint`,
`hub.push_checkpoint_to_hub`) and turns a bad input into argparse's exit status 2 with the message. The console
commands of the installed package and `scripts/convert_llava_checkpoint.py` / `scripts/push_to_hub.py` of a clone run
these same functions. (`umbrella-train` is `training.main`, `umbrella-demo` is `demo.main`, `umbrella-preview` is
`preview.main`.)
"""

import argparse
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
    return parser


def push_main(argv: list[str] | None = None) -> None:
    """`umbrella-push`: flags → `push_checkpoint_to_hub`; a bad input exits with status 2 and its message."""
    parser = build_push_parser()
    args = parser.parse_args(argv)
    if args.dry_run != (args.output_dir is not None):
        parser.error("--dry_run and --output_dir go together: the dry run writes the upload folder to --output_dir.")
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


__all__ = ["build_convert_parser", "build_push_parser", "convert_main", "push_main"]
