#!/usr/bin/env python
"""Teach a small UmbrellaLlava to answer questions about real brain volumes, on a CPU, in about a minute.

    python scripts/demo.py [--output_dir outputs/demo] [--max_steps 300]      # or: umbrella-demo ...

The same program as the `umbrella-demo` command; see `umbrella_llava/demo.py`. Needs nilearn (`pip install -e ".[demo]"`).
"""

import sys
from pathlib import Path

try:
    import umbrella_llava  # noqa: F401
except ImportError:  # a clone that is not pip-installed: use the package next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from umbrella_llava.demo import main

if __name__ == "__main__":
    main()
