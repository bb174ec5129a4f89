"""Is a checkpoint folder whole? The files a killed save or a damaged disk leaves behind, named one by one.

Used where a checkpoint is read: `training.resolve_resume_checkpoint` (resume, and `last` skipping an incomplete
checkpoint-N), `training.load_model_and_processor` (a weights file that does not load), and `hub.validate_checkpoint`
(nothing half-written is uploaded).

A `Trainer` writes a checkpoint-N folder in this order: weights, optimizer / scheduler / scaler, RNG state, and
`trainer_state.json` last. So a folder without a readable `trainer_state.json` is a save that did not finish.
"""

import json
import os
import pickle
import zipfile
from pathlib import Path

import torch

try:  # the numpy types the Trainer allows when it loads rng_state.pth; the same context here, so they are not named
    from transformers.trainer_pt_utils import safe_globals
except ImportError:  # pragma: no cover - an older transformers without it
    from contextlib import nullcontext as safe_globals

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


def refused_torch_files(folder: str | os.PathLike) -> dict[str, str]:
    """The torch state files of a checkpoint folder that `torch.load(..., weights_only=True)` refuses, as the
    Trainer loads them on resume (with the numpy types it allows): a pickle that holds code or objects other than tensors and plain containers.

    Each file is loaded in full (on the CPU), so this is for naming the culprit after a refused resume, not for every
    resume. `training_args.bin`, which the Trainer never loads, is not checked.

    Returns:
        `{path: the first line of torch's reason}`, empty when every file loads.
    """
    refused = {}
    for path in sorted(Path(folder).iterdir()):
        if path.suffix not in TORCH_STATE_SUFFIXES or not path.is_file() or path.name == "training_args.bin":
            continue
        try:
            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            # torch's message opens with general advice; its reason is the "WeightsUnpickler error: ..." line.
            refused[str(path)] = next((line for line in lines if "Unpickler error" in line), lines[0] if lines else "")
    return refused


__all__ = ["damaged_weight_files", "incomplete_checkpoint_reasons", "refused_torch_files"]
