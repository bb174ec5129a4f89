"""Data of the learning benchmark: real MNI152 brains (shipped inside nilearn), augmented, as NIfTI files with
UMBRELLA records whose answers only the volumes hold.

Two task families, each with two question kinds:

- global (`"map"`, `"which_gm"`): which map a volume is (T1, grey matter, white matter; chance 1/3), and which of
  two scans is the grey-matter map (first / second; chance 1/2, so the volumes must land in the right blocks in the
  right order).
- local (`"lesion_side"`, `"which_lesion"`): a dark lesion of 2.4-3.2 cm placed in one hemisphere of the T1; which
  hemisphere holds it (chance 1/2), and which of two scans shows one (chance 1/2). Half the files are stored RAS,
  half LAS, so the side must come from the affine, not from the voxel order.

Augmentation, for every volume: an intensity scale of 0.6-1.4, Gaussian noise (4 % of the 99.5th percentile) and a
random shift of up to ±5 voxels along each axis.

"lesion-side" asks the side question only, one volume per record (the relevance benchmark's task).

Diagnostic tasks of the local questions: "local-large" (lesions of 6-8 cm) and "local-noshift" (no random shift, so
the anatomy is always aligned and the lesion is the only difference between volumes but noise and intensity scale).
"""

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

MAPS = ("T1", "grey matter", "white matter")
QUESTIONS = {
    "map": "Which map is this: T1, grey matter or white matter?",
    "which_gm": "Which of the two scans is the grey matter map: the first or the second?",
    "lesion_side": "Which hemisphere holds the lesion: left or right?",
    "which_lesion": "Which of the two scans shows a lesion: the first or the second?",
}
TASKS = {
    "global": ("map", "which_gm"),
    "local": ("lesion_side", "which_lesion"),
    "local-large": ("lesion_side", "which_lesion"),  # a diagnostic: the same questions, lesions 2.5x larger
    "local-noshift": ("lesion_side", "which_lesion"),  # a diagnostic: the same questions, volumes never shifted
    "lesion-side": ("lesion_side",),  # one volume, one question: the relevance benchmark's task
}
CHANCE = {"map": 1 / 3, "which_gm": 1 / 2, "lesion_side": 1 / 2, "which_lesion": 1 / 2}
MAX_SHIFT_VOXELS = 5
LESION_DIAMETER_MM = {
    "local": (24.0, 32.0), "local-large": (60.0, 80.0), "local-noshift": (24.0, 32.0), "lesion-side": (24.0, 32.0)
}  # fmt: skip
# The largest random shift per task (voxels of the 2 mm template, each axis); 0 isolates the anatomy's misalignment.
MAX_SHIFT = {"local-noshift": 0}
# A lesion lies wholly inside the brain of its hemisphere up to this radius; a larger one is cut to the brain.
MAX_INSIDE_RADIUS_MM = 16.0


@dataclass(frozen=True)
class Volume:
    path: str
    kind: str  # a map name, or "lesion" / "healthy"
    side: str | None = None  # the lesion's hemisphere


def load_templates() -> dict[str, nib.Nifti1Image]:
    """The MNI152 T1, grey- and white-matter templates (2 mm) that ship inside nilearn."""
    from nilearn import datasets

    return {
        "T1": datasets.load_mni152_template(resolution=2),
        "grey matter": datasets.load_mni152_gm_template(resolution=2),
        "white matter": datasets.load_mni152_wm_template(resolution=2),
    }


def augment_and_shift(
    data: np.ndarray, rng: np.random.Generator, max_shift: int = MAX_SHIFT_VOXELS
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Intensity scale 0.6-1.4, Gaussian noise and a shift of up to ±`max_shift` voxels per axis; returns the
    augmented volume and the shift (voxels per axis), so that a mask can be moved alike."""
    peak = float(np.percentile(data, 99.5)) or 1.0
    shift = tuple(int(s) for s in rng.integers(-max_shift, max_shift + 1, size=3))
    data = np.roll(data, shift, axis=(0, 1, 2)) * rng.uniform(0.6, 1.4)
    return (data + rng.normal(0, 0.04 * peak, size=data.shape)).astype(np.float32), shift


def augment(data: np.ndarray, rng: np.random.Generator, max_shift: int = MAX_SHIFT_VOXELS) -> np.ndarray:
    """`augment_and_shift` without the shift."""
    return augment_and_shift(data, rng, max_shift)[0]


def add_lesion(
    t1: nib.Nifti1Image, brain: np.ndarray, side: str, diameter_mm: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """The T1 voxels with a dark sphere of `diameter_mm` (low, high) in the brain of hemisphere `side`."""
    data = np.asarray(t1.dataobj, dtype=np.float32).copy()
    voxel_mm = nib.affines.voxel_sizes(t1.affine)
    radius_mm = rng.uniform(*diameter_mm) / 2
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), axis=-1)
    x_mm = nib.affines.apply_affine(t1.affine, grid)[..., 0]
    in_side = (x_mm > 8) if side == "right" else (x_mm < -8)
    # The centre lies deep enough in that hemisphere's brain for the whole sphere (up to MAX_INSIDE_RADIUS_MM) to be
    # brain; what a larger sphere has outside the hemisphere's brain is left as it is.
    inner = brain & in_side
    for axis in range(3):
        margin = int(np.ceil(min(radius_mm, MAX_INSIDE_RADIUS_MM) / voxel_mm[axis]))
        inner &= np.roll(brain, margin, axis) & np.roll(brain, -margin, axis)
    centre = grid[inner][rng.integers(inner.sum())]
    distance_mm = np.sqrt((((grid - centre) * voxel_mm) ** 2).sum(-1))
    data[(distance_mm <= radius_mm) & brain & in_side] = 0.15 * float(np.percentile(data[brain], 50))
    return data


def _write(data: np.ndarray, affine: np.ndarray, path: Path, store_las: bool) -> None:
    """Write `data` with `affine`, flipped to LAS voxel order on disk when `store_las` (same brain, same mm)."""
    if store_las:
        flip = np.diag([-1.0, 1.0, 1.0, 1.0])
        flip[0, 3] = data.shape[0] - 1
        data, affine = data[::-1].copy(), affine @ flip
    nib.Nifti1Image(data, affine).to_filename(path)


def brain_mask(templates: dict[str, nib.Nifti1Image]) -> np.ndarray:
    """Where the template brain is: grey + white matter probability above 0.5, on the T1's grid."""
    return np.asarray(templates["grey matter"].dataobj) + np.asarray(templates["white matter"].dataobj) > 0.5


def lesion_volume(
    templates: dict[str, nib.Nifti1Image],
    side: str | None,
    diameter_mm: tuple[float, float],
    rng: np.random.Generator,
    max_shift: int = MAX_SHIFT_VOXELS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One augmented T1 (RAS voxels of the template's grid) with a lesion in hemisphere `side` (none when `side` is
    None), and where its lesion and its brain are, moved by the same shift: `(voxels, lesion mask, brain mask)`."""
    t1 = templates["T1"]
    brain = brain_mask(templates)
    base = np.asarray(t1.dataobj, dtype=np.float32)
    data = add_lesion(t1, brain, side, diameter_mm, rng) if side else base
    lesion = data != base
    data, shift = augment_and_shift(data, rng, max_shift)
    return data, np.roll(lesion, shift, axis=(0, 1, 2)), np.roll(brain, shift, axis=(0, 1, 2))


def local_task_volumes(
    task: str,
    count: int,
    rng: np.random.Generator,
    templates: dict[str, nib.Nifti1Image] | None = None,
    diameter_mm: tuple[float, float] | None = None,
) -> Iterator[tuple[str, str | None, int, np.ndarray]]:
    """`(kind, side, index, augmented RAS voxels)` of a local task: `count` volumes each of lesion left, lesion
    right and healthy T1, in that order, drawn from `rng`; lesions of `diameter_mm` (default: the task's)."""
    templates = templates or load_templates()
    max_shift = MAX_SHIFT.get(task, MAX_SHIFT_VOXELS)
    for kind, side in (("lesion", "left"), ("lesion", "right"), ("healthy", None)):
        for i in range(count):
            data, _, _ = lesion_volume(templates, side, diameter_mm or LESION_DIAMETER_MM[task], rng, max_shift)
            yield kind, side, i, data


def write_volumes(
    task: str,
    split: str,
    count: int,
    folder: Path,
    rng: np.random.Generator,
    diameter_mm: tuple[float, float] | None = None,
) -> list[Volume]:
    """`count` augmented volumes per kind (maps for "global"; lesion left / right / healthy T1 for a local task, the
    lesions of `diameter_mm`, default the task's)."""
    templates = load_templates()
    folder.mkdir(parents=True, exist_ok=True)
    volumes = []
    if task == "global":
        for kind, template in templates.items():
            base = np.asarray(template.dataobj, dtype=np.float32)
            for i in range(count):
                path = folder / f"{split}-{kind.replace(' ', '_')}-{i:03d}.nii.gz"
                _write(augment(base, rng), template.affine, path, store_las=bool(i % 2))
                volumes.append(Volume(path.name, kind))
        return volumes
    for kind, side, i, data in local_task_volumes(task, count, rng, templates, diameter_mm):
        path = folder / f"{split}-{kind}-{side or 'none'}-{i:03d}.nii.gz"
        _write(data, templates["T1"].affine, path, store_las=bool(i % 2))
        volumes.append(Volume(path.name, kind, side))
    return volumes


def make_record(record_id: str, question: str, volumes: list[Volume], answer: str) -> dict:
    """One UMBRELLA record; its `task_type` is the question kind, so accuracy is reported per kind."""
    images = [{"type": "image", "modality": "MRI", "image_path": v.path} for v in volumes]
    return {
        "task_id": record_id,
        "task_type": question,
        "images": [{"path": v.path, "token": "<image>", "modality": "MRI"} for v in volumes],
        "conversations": [
            {"role": "user", "content": [*images, {"type": "text", "text": QUESTIONS[question]}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
    }


def sample_record(record_id: str, question: str, volumes: list[Volume], pick: random.Random) -> dict:
    """A record of `question` over volumes drawn so that every answer is equally likely."""
    by_kind: dict[str, list[Volume]] = {}
    for volume in volumes:
        by_kind.setdefault(volume.kind if volume.kind != "lesion" else f"lesion-{volume.side}", []).append(volume)
    if question == "map":
        kind = pick.choice(MAPS)
        return make_record(record_id, question, [pick.choice(by_kind[kind])], kind)
    if question == "lesion_side":
        side = pick.choice(("left", "right"))
        return make_record(record_id, question, [pick.choice(by_kind[f"lesion-{side}"])], side)
    if question == "which_gm":
        target, other = pick.choice(by_kind["grey matter"]), pick.choice(by_kind[pick.choice(MAPS[::2])])
    else:
        target = pick.choice(by_kind[f"lesion-{pick.choice(('left', 'right'))}"])
        other = pick.choice(by_kind["healthy"])
    answer = pick.choice(("first", "second"))
    pair = [target, other] if answer == "first" else [other, target]
    return make_record(record_id, question, pair, answer)


def build_learning_data(
    folder: Path,
    task: str,
    train_records: int,
    eval_records: int,
    volumes_per_kind: int,
    seed: int = 0,
    diameter_mm: tuple[float, float] | None = None,
) -> tuple[Path, Path]:
    """Write the volumes and `train.jsonl` / `eval.jsonl` of `task` (a key of `TASKS`) into `folder`; a local
    task's lesions are of `diameter_mm` (default: the task's).

    Records alternate between the task's question kinds; held-out records use held-out volumes.
    """
    rng, pick = np.random.default_rng(seed), random.Random(seed)
    paths = {}
    for split, count, per_kind in (
        ("train", train_records, volumes_per_kind),
        ("eval", eval_records, max(2, volumes_per_kind // 2)),
    ):
        volumes = write_volumes(task, split, per_kind, folder, rng, diameter_mm)
        paths[split] = folder / f"{split}.jsonl"
        with paths[split].open("w") as f:
            for i in range(count):
                question = TASKS[task][i % len(TASKS[task])]
                f.write(json.dumps(sample_record(f"{split}-{i:04d}", question, volumes, pick)) + "\n")
    return paths["train"], paths["eval"]
