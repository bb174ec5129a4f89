#!/usr/bin/env python
"""Evaluate an UmbrellaLlava model on held-out conversations: predictions, metrics with intervals, a report.

    python scripts/evaluate.py --model runs/stage2 --data test.jsonl --image_root /data/mri --output_dir eval/stage2

The same program as the `umbrella-evaluate` command; all flags: `python scripts/evaluate.py --help`, see
`umbrella_llava/cli.py` (`evaluate_main`).
"""

import sys
from pathlib import Path

try:
    import umbrella_llava  # noqa: F401  (registers the model with the Auto classes)
except ImportError:  # a clone that is not pip-installed: use the package next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from umbrella_llava.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
