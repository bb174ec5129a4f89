"""`umbrella-explain`: answer a question about scans and show where in each scan the answer came from.

```
umbrella-explain --model DIR --volume SCAN [--volume SCAN2 ...] --question TEXT [--answer TEXT] --output_dir OUT
```

Writes `OUT/answer.txt`, and for the i-th volume (counting from 0) `OUT/relevance_<i>.nii.gz`, the map in the scan's
own grid and affine (it overlays the original file in FSLeyes, ITK-SNAP or nilearn), and `OUT/relevance_<i>.png`, the
three planes through the map's maximum over the scan, on the model's grid.
"""

import argparse
import json
import os
from collections.abc import Sequence

from .chat import add_model_arguments, load_for_answering
from .explain import DEFAULT_METHOD, METHODS, explain
from .relevance_figure import quoted_for_title, save_relevance_figure
from .scan_space import to_scan_space


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="umbrella-explain",
        description="Answer a question about one or more scans and write a relevance map per scan: where in the "
        "scan the answer came from.",
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--volume",
        action="append",
        required=True,
        help="a NIfTI file or a DICOM series folder; repeat for several scans, in the order the question names them",
    )
    parser.add_argument("--question", required=True)
    parser.add_argument("--answer", default=None, help="the answer to explain (default: the model's own, greedy)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help=f"default: {DEFAULT_METHOD}")
    parser.add_argument("--n_steps", type=int, default=16, help="integration steps of integrated gradients")
    parser.add_argument(
        "--internal_batch_size", type=int, default=None, help="integration steps per forward (bounds memory)"
    )
    parser.add_argument("--max_new_tokens", type=int, default=32)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    args = parse_args(argv)
    model, processor = load_for_answering(args.model, args.dtype, args.device)

    result = explain(
        model,
        processor,
        args.volume,
        args.question,
        answer=args.answer,
        method=args.method,
        n_steps=args.n_steps,
        internal_batch_size=args.internal_batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "answer.txt"), "w", encoding="utf-8") as file:
        file.write(result.answer + "\n")
    written = []
    for index, (scan, relevance) in enumerate(zip(args.volume, result.relevance)):
        nifti = os.path.join(args.output_dir, f"relevance_{index}.nii.gz")
        to_scan_space(relevance, scan, processor.image_processor).to_filename(nifti)
        png = os.path.join(args.output_dir, f"relevance_{index}.png")
        title = f"{os.path.basename(os.path.normpath(scan))}: {quoted_for_title(args.question)} → {quoted_for_title(result.answer)}"
        title += f" ({result.method.replace('_', ' ')})"
        save_relevance_figure(result.pixel_values[0, index], relevance, png, title=title)
        written += [nifti, png]
    summary = {
        "question": result.question,
        "answer": result.answer,
        "method": result.method,
        "answer_log_likelihood": result.answer_log_likelihood,
        "volumes": args.volume,
    }
    with open(os.path.join(args.output_dir, "explanation.json"), "w", encoding="utf-8") as file:
        json.dump(summary, file, indent=2)
    print(f"Answer: {result.answer}")
    print("Wrote " + ", ".join(written))
    return 0


__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    raise SystemExit(main())
