#!/usr/bin/env python
"""Share an UmbrellaLlava checkpoint on the Hub with a model card, in one commit: the `umbrella-push` command of a clone.

    python scripts/push_to_hub.py --checkpoint runs/stage2 --repo_id me/umbrella-brain-0.5b --private
    python scripts/push_to_hub.py --checkpoint runs/stage2 --repo_id me/umbrella-brain-0.5b --dry_run --output_dir upload

All flags: `--help`; the program is `umbrella_llava.cli.push_main`.
"""

import sys
from pathlib import Path

try:
    import umbrella_llava  # noqa: F401
except ImportError:  # a clone that is not pip-installed: use the package next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from umbrella_llava.cli import build_push_parser as build_parser  # noqa: F401  (tests read its flags)
from umbrella_llava.cli import push_main as main

if __name__ == "__main__":
    main()
