#!/usr/bin/env python
"""Convert a stock LLaVA checkpoint (Hub id or folder) into an UmbrellaLlava checkpoint for 3-D volumes.

    python scripts/convert_llava_checkpoint.py --base llava-hf/llava-interleave-qwen-0.5b-hf \\
        --output_dir checkpoints/umbrella-0.5b --volume_size 96 --patch_size 16

The language model, projector, lm_head and vision encoder layers are copied bit-identically; the 3-D patch embedder
is inflated from the tower's 2-D one (default) or initialised randomly (`--embedder_init random`). The output folder
holds the model, processor, tokenizer, chat template and code, and loads with `trust_remote_code=True`. The recipe is
documented in `umbrella_llava/conversion.py`.
"""

import argparse
import sys

from umbrella_llava.conversion import CHAT_TEMPLATE_CHOICES, DTYPES, EMBEDDER_INITS, convert_llava_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
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


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
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
        )
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"Wrote the UmbrellaLlava checkpoint to {output_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
