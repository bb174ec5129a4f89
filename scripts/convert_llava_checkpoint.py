#!/usr/bin/env python
"""Convert a stock LLaVA checkpoint into an UmbrellaLlava checkpoint: the `umbrella-convert` command of a clone.

    python scripts/convert_llava_checkpoint.py --base llava-hf/llava-interleave-qwen-0.5b-hf \\
        --output_dir checkpoints/umbrella-0.5b --volume_size 96 --patch_size 16

All flags: `--help`; the program is `umbrella_llava.cli.convert_main`.
"""

import sys
from pathlib import Path

try:
    import umbrella_llava  # noqa: F401
except ImportError:  # a clone that is not pip-installed: use the package next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from umbrella_llava.cli import build_convert_parser as build_parser  # noqa: F401  (tests read its flags)
from umbrella_llava.cli import convert_main as main

if __name__ == "__main__":
    main()
