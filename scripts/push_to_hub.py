#!/usr/bin/env python
"""Share an UmbrellaLlava checkpoint on the Hugging Face Hub, with a model card, in one commit.

    python scripts/push_to_hub.py --checkpoint runs/stage2 --repo_id me/umbrella-brain-0.5b --private
    python scripts/push_to_hub.py --checkpoint runs/stage2 --repo_id me/umbrella-brain-0.5b --dry_run --output_dir upload

The checkpoint is checked first (config, weights, code, processor, tokenizer, chat template); what is missing is named
and nothing is sent. `--dry_run` writes the exact folder that would be uploaded into `--output_dir` and contacts
nothing. Log in with `hf auth login` or set `HF_TOKEN` before a real upload.
"""

import argparse
import sys
from pathlib import Path

from umbrella_llava.hub import DEFAULT_LICENSE, DEFAULT_TEMPLATE, push_checkpoint_to_hub


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
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


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
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


if __name__ == "__main__":
    main()
