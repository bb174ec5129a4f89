#!/usr/bin/env python
"""Answer a question about scans and write where in each scan the answer came from (`umbrella-explain`):

    python scripts/explain.py --model runs/stage2 --volume sub-01_T1w.nii.gz --question "Is this brain male or female?" \\
        --output_dir explain/sub-01

writes answer.txt, relevance_0.nii.gz (in the scan's own grid and affine) and relevance_0.png. See
`umbrella_llava.explain` for the methods (--method integrated_gradients, gradient_x_input, attention_rollout).
"""

from umbrella_llava.explain_command import main

if __name__ == "__main__":
    raise SystemExit(main())
