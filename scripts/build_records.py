#!/usr/bin/env python
"""Build conversation records from a BIDS dataset and its phenotype tables: the `umbrella-build-records` command of
a clone.

    python scripts/build_records.py --bids /data/ds000001 --questions questions.yaml --output_dir records \\
        [--split train=0.8,eval=0.1,test=0.1] [--seed 0] [--derivatives fmriprep ...]

All flags: `--help`; the program is `umbrella_llava.bids_records.main`. Needs `pip install -e ".[bids]"`.
"""

import sys
from pathlib import Path

try:
    import umbrella_llava  # noqa: F401
except ImportError:  # a clone that is not pip-installed: use the package next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from umbrella_llava.bids_records import main

if __name__ == "__main__":
    sys.exit(main())
