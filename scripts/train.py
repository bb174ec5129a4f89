#!/usr/bin/env python
"""Fine-tune an UmbrellaLlava checkpoint on conversation records with the stock `transformers.Trainer`.

One GPU or CPU:

    python scripts/train.py --model_name_or_path path/to/umbrella-checkpoint \\
        --train_data train.jsonl --eval_data eval.jsonl --image_root /data/mri \\
        --output_dir runs/stage1 --train_mode embedder --num_train_epochs 3 --per_device_train_batch_size 4

Several processes (every Trainer flag works; `--deepspeed ds_configs/zero3.json` for ZeRO-3):

    torchrun --nproc_per_node 8 scripts/train.py ... --bf16
    torchrun --nproc_per_node 2 scripts/train.py ... --use_cpu      # CPUs only: --use_cpu is required

`--train_mode` picks what trains: embedder (the 3-D patch embedder only; the usual first stage),
embedder_projector, full, or lora (LoRA on the language model, `--lora_r/--lora_alpha/--lora_dropout/
--lora_target_modules`, with the embedder and projector fully trained). `--resume_from_checkpoint DIR|last` continues
an interrupted run step for step. With `--eval_data`, generation accuracy per `task_type` is logged and written to
`output_dir/eval_generation.json` after training (and every `--generation_eval_steps` steps). Every checkpoint-N
folder, and the final `output_dir`, loads with `AutoModelForImageTextToText.from_pretrained(..., trust_remote_code=True)`
(with LoRA: checkpoints hold the adapter, the final folder the merged model).

All flags: `python scripts/train.py --help`; see `umbrella_llava/training.py`.
"""

import sys
from pathlib import Path

try:
    import umbrella_llava  # noqa: F401  (registers the model with the Auto classes)
except ImportError:  # a clone that is not pip-installed: use the package next to this script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from umbrella_llava.training import main

if __name__ == "__main__":
    main()
