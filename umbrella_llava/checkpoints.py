"""Is a checkpoint folder whole? The files a killed save or a damaged disk leaves behind, named one by one.

Used where a checkpoint is read: `training.resolve_resume_checkpoint` (resume, and `last` skipping an incomplete
checkpoint-N), `training.load_model_and_processor` (a weights file that does not load), and `hub.validate_checkpoint`
(nothing half-written is uploaded).

A `Trainer` writes a checkpoint-N folder in this order: weights, optimizer / scheduler / scaler, RNG state, and
`trainer_state.json` last. So a folder without a readable `trainer_state.json` is a save that did not finish.
"""

import json
import os
import zipfile
from pathlib import Path

from .modeling_umbrella_llava import damaged_weight_files

TRAINER_STATE = "trainer_state.json"
# Files `torch.save` writes in a checkpoint-N folder; each is a zip archive, whose directory sits at its very end.
TORCH_STATE_SUFFIXES = (".pt", ".pth", ".bin")


def incomplete_checkpoint_reasons(folder: str | os.PathLike) -> list[str]:
    """Why a Trainer `checkpoint-N` folder cannot be resumed from, one reason per damaged or missing file.

    Checked: `trainer_state.json` exists and parses (it is written last), every `*.safetensors` file opens, and every
    torch state file (`optimizer.pt`, `scheduler.pt`, `rng_state.pth`, `training_args.bin`, ...) is a complete zip.

    Returns:
        The reasons, each naming its file; empty for a complete checkpoint.
    """
    folder = Path(folder)
    reasons = []
    state = folder / TRAINER_STATE
    if not state.is_file():
        reasons.append(f"{state} is missing (the Trainer writes it last, so the save did not finish)")
    else:
        try:
            json.loads(state.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            reasons.append(f"{state} does not parse ({error})")
    reasons += [f"{folder / name} {reason}" for name, reason in damaged_weight_files(folder).items()]
    for path in sorted(folder.iterdir()):
        if path.suffix in TORCH_STATE_SUFFIXES and path.is_file() and not zipfile.is_zipfile(path):
            reasons.append(f"{path} is not a complete torch file (truncated or damaged?)")
    return reasons


__all__ = ["damaged_weight_files", "incomplete_checkpoint_reasons"]
