"""`umbrella-check-data`: read every record and decode every volume of a data set once, and list everything that is
wrong at once, before any GPU hour is spent.

    umbrella-check-data train.jsonl --image_root /data/mri --model_name_or_path checkpoints/umbrella-0.5b
    python -m umbrella_llava.check_data train.jsonl eval.jsonl --image_root /data/mri --voxel_spacing 1 1 1

Each record goes through the same checks as training (`data.scan_records`: JSON, structure, roles, placeholders,
special tokens, paths, truncation) and each distinct volume through the processor that training uses (through the
cache with `--cache_dir`, which it then warms). Every bad file, line and record is printed, one per line, with what
is wrong; the exit status is 1 when there is any, 0 otherwise. `scripts/train.py --check_data` does the same before
its first step.

With `--model_name_or_path`, the checkpoint's processor is used (its tokenizer, special tokens and volume options);
without it, a volume processor with the options given here and the ChatML special tokens.
"""

import argparse
import functools
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from .data import RecordScan, problem_kind, scan_records
from .image_processing_umbrella_llava import FRAME_POLICIES, UmbrellaVolumeProcessor
from .preview import frames_argument
from .processing_umbrella_llava import UmbrellaLlavaProcessor
from .volume_cache import VolumeCache


def check_data(
    path: str | Path,
    processor: UmbrellaLlavaProcessor,
    image_root: str | Path | None = None,
    max_length: int | None = None,
    allow_outside_image_root: bool = False,
    cache_dir: str | Path | None = None,
) -> RecordScan:
    """Validate every record of `path` and decode each of its volumes once (with a progress bar).

    Returns:
        The [`RecordScan`]: `problems` holds every invalid file, line and record with its error, in reading order.

    Raises:
        FileNotFoundError / ValueError: only when `path` itself is missing or not a data file or folder.
    """
    image_processor = processor.image_processor
    load_volume = image_processor.preprocess_volume
    if cache_dir is not None:
        load_volume = functools.partial(VolumeCache(cache_dir).get, image_processor=image_processor)
    return scan_records(
        path,
        processor,
        image_root=image_root,
        max_length=max_length,
        allow_outside_image_root=allow_outside_image_root,
        load_volume=load_volume,
    )


def summarize(scan: RecordScan, path: str | Path) -> str:
    """A report for people: one line per problem, then the counts."""
    lines = [f"INVALID {error}" for _, error in scan.problems]
    lines += [f"DUPLICATE {where} repeats {earlier}" for where, earlier in scan.duplicates]
    kinds = Counter(problem_kind(error) for _, error in scan.problems)
    reasons = f" ({', '.join(f'{kind}: {count}' for kind, count in sorted(kinds.items()))})" if kinds else ""
    lines.append(
        f"{path}: {scan.num_read} records read, {len(scan.records)} valid, {len(scan.problems)} invalid{reasons}, "
        f"{len(scan.duplicates)} duplicates."
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umbrella-check-data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("data", nargs="+", help="Conversation data: .json / .jsonl files or folders of them.")
    parser.add_argument("--image_root", default=None, help="Folder relative volume paths resolve against.")
    parser.add_argument(
        "--allow_outside_image_root", action="store_true", help="Accept volume paths that lead out of --image_root."
    )
    parser.add_argument(
        "--model_name_or_path", default=None, help="Checkpoint whose processor training will use (recommended)."
    )
    parser.add_argument("--max_length", type=int, default=None, help="As train.py's --max_length.")
    parser.add_argument("--cache_dir", default=None, help="Volume cache to check through, and warm.")
    volume = parser.add_argument_group("volume options, without --model_name_or_path")
    volume.add_argument("--volume_size", type=int, nargs=3, default=[96, 96, 96], metavar=("H", "W", "D"))
    volume.add_argument("--voxel_spacing", type=float, nargs=3, default=None, metavar=("H", "W", "D"))
    volume.add_argument("--allow_blank_volumes", action="store_true", help="Accept blank volumes (as zeros).")
    volume.add_argument(
        "--frames",
        type=frames_argument,
        default="error",
        help=f"What a 4-D file's frames become: {', '.join(FRAME_POLICIES)} or a frame index (default error).",
    )
    return parser


def load_processor(args: argparse.Namespace) -> UmbrellaLlavaProcessor:
    if args.model_name_or_path is not None:
        return UmbrellaLlavaProcessor.from_pretrained(args.model_name_or_path)
    from .tokenization import build_chatml_tokenizer

    image_processor = UmbrellaVolumeProcessor(
        volume_size=args.volume_size,
        voxel_spacing=args.voxel_spacing,
        allow_blank_volumes=args.allow_blank_volumes,
        frames=args.frames,
    )
    return UmbrellaLlavaProcessor(
        image_processor=image_processor, tokenizer=build_chatml_tokenizer(), image_seq_length=1
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `umbrella-check-data`; returns (and exits with) 1 when anything is wrong, else 0."""
    parser = build_parser()
    args = parser.parse_args(argv)
    processor = load_processor(args)
    failed = False
    for path in args.data:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the report says all a warning would
                scan = check_data(
                    path,
                    processor,
                    image_root=args.image_root,
                    max_length=args.max_length,
                    allow_outside_image_root=args.allow_outside_image_root,
                    cache_dir=args.cache_dir,
                )
        except (OSError, ValueError) as error:
            print(f"INVALID {path}: {error}", flush=True)
            failed = True
            continue
        print(summarize(scan, path), flush=True)
        failed |= bool(scan.problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
