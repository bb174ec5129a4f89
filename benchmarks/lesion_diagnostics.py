"""How visible is the local task's lesion after the package's own preprocessing, and is it on the side the answer says?

No training: the lesions of `benchmarks.learning_data` are regenerated with the same code (`add_lesion`, `augment`,
`_write`), together with their masks, written as NIfTI files (half RAS, half LAS) and read back through
`UmbrellaVolumeProcessor` (32³, z-score, the benchmark's defaults). Reported:

- side: the lesion mask's centre of mass along the first (RAS: left → right) axis of the preprocessed volume, for
  RAS- and LAS-stored files, against the side the record's answer gives;
- contrast: the lesion's mean z in its core (voxels at least half lesion at 32³) against the same voxels of held-out
  healthy volumes (other augmentations of the same brain), in units of the healthy voxels' spread there (between
  volumes: noise + shift + intensity scale), per voxel and averaged over the core (a contrast-to-noise ratio);
- the lesion's size at 32³ (core voxels, and voxels touched at all) and how many 8³ patches it touches;
- patch level: the distance of the lesion's 8³ patch (the one holding most of it) to the mean healthy patch at that
  position, over the rms distance of healthy patches to it (what a reader of whole patches must beat);
- oracle detectors that know the healthy brain (a normative map: mean and spread of healthy volumes per voxel):
  the most negative voxel z-deviation, and the same after a 3³ box filter (the matched filter of a lesion this size),
  as an AUC of lesion vs healthy volumes. If these separate the classes, the lesion is in the data; if only these do,
  a detector must compare against learnt normal anatomy at every position.

Run: `python -m benchmarks.lesion_diagnostics [--task local|local-large|local-noshift] [--count N]` (about 20 s).
"""

import argparse
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from umbrella_llava import UmbrellaVolumeProcessor

from .learning_data import (
    LESION_DIAMETER_MM,
    MAX_SHIFT,
    MAX_SHIFT_VOXELS,
    _write,
    add_lesion,
    augment_and_shift,
    load_templates,
)


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)


def box3(volume: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool3d(volume[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]


def diagnose(task: str, count: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    templates = load_templates()
    t1 = templates["T1"]
    brain = np.asarray(templates["grey matter"].dataobj) + np.asarray(templates["white matter"].dataobj) > 0.5
    base = np.asarray(t1.dataobj, dtype=np.float32)
    processor = UmbrellaVolumeProcessor(volume_size=32)
    mask_processor = UmbrellaVolumeProcessor(volume_size=32, normalization="none", clip_percentiles=None)
    lesions, healthy = [], []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(count):
            store_las = bool(i % 2)
            for side in ("left", "right", None):
                data = add_lesion(t1, brain, side, LESION_DIAMETER_MM[task], rng) if side else base
                mask = (data != base).astype(np.float32) if side else None
                data, shift = augment_and_shift(data, rng, MAX_SHIFT.get(task, MAX_SHIFT_VOXELS))
                path = Path(folder) / f"{side}-{i}.nii.gz"
                _write(data, t1.affine, path, store_las)
                volume = processor.preprocess_volume(path)[0]
                if side is None:
                    healthy.append(volume)
                    continue
                mask_path = Path(folder) / f"{side}-{i}-mask.nii.gz"
                _write(np.roll(mask, shift, axis=(0, 1, 2)), t1.affine, mask_path, store_las)
                lesions.append((side, store_las, volume, mask_processor.preprocess_volume(mask_path)[0]))
    healthy_stack = torch.stack(healthy)
    normal_mean, normal_std = healthy_stack.mean(0), healthy_stack.std(0).clamp_min(1e-3)
    # Side: centre of mass of the mask along the first axis; the volume's centre is 15.5.
    side_rows = {"RAS": [0, 0], "LAS": [0, 0]}
    contrast, voxel_cnr, core_sizes, touched_sizes, patches_touched = [], [], [], [], []
    healthy_core_z, patch_ratio = [], []
    patch = lambda v: v.reshape(-1, 4, 8, 4, 8, 4, 8).permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, 64, 512)  # noqa: E731
    healthy_patches = patch(healthy_stack)
    normal_patches = healthy_patches.mean(0)
    # Each patch's variation between healthy volumes (shift + noise): the rms distance to the mean healthy patch.
    patch_spread = (healthy_patches - normal_patches).norm(dim=-1).square().mean(0).sqrt()
    for side, store_las, volume, mask in lesions:
        weight = mask.clamp_min(0)
        x_centre = float((weight.sum((1, 2)) * torch.arange(32)).sum() / weight.sum())
        found = "right" if x_centre > 15.5 else "left"
        side_rows["LAS" if store_las else "RAS"][0] += found == side
        side_rows["LAS" if store_las else "RAS"][1] += 1
        core = mask >= 0.5
        if not core.any():  # a lesion that no 32³ voxel holds by half: take its strongest voxel
            core = mask == mask.max()
        core_sizes.append(int(core.sum()))
        touched_sizes.append(int((mask > 0.05).sum()))
        patch_mass = mask.reshape(4, 8, 4, 8, 4, 8).sum((1, 3, 5))
        patches_touched.append(int((patch_mass > 0.05 * patch_mass.sum()).sum()))
        lesion_mean = float(volume[core].mean())
        healthy_core_z.append(float(normal_mean[core].mean()))
        # The patch holding most of the lesion: its distance to the mean healthy patch against a healthy patch's.
        where = int(patch_mass.flatten().argmax())
        distance = float((patch(volume[None])[0, where] - normal_patches[where]).norm())
        patch_ratio.append(distance / float(patch_spread[where]))
        # The same voxels in every held-out healthy volume: their spread is what augmentation does there.
        healthy_means = healthy_stack[:, core].mean(1)
        contrast.append((float(healthy_means.mean()) - lesion_mean) / float(healthy_means.std()))
        voxel_cnr.append(float(((normal_mean[core] - volume[core]) / normal_std[core]).mean()))

    # Oracle detectors (leave-one-out is not needed for the lesion volumes; for healthy ones the normative map
    # includes the volume itself, which only makes healthy look more normal by ~1/count).
    def min_deviation(volume, smooth):
        deviation = (volume - normal_mean) / normal_std
        return float(-(box3(deviation) if smooth else deviation).min())

    # Where the brain is at 32³ (the unshifted template's grey + white matter; shifts move it by up to 1.7 voxels).
    brain_32 = mask_processor.preprocess_volume(nib.Nifti1Image(brain.astype(np.float32), t1.affine))[0] > 0.5

    def min_deviation_in_brain(volume):
        return float(-box3((volume - normal_mean) / normal_std)[brain_32].min())

    def darkest_blob(volume):  # no normative map: the darkest 3³ average inside the brain
        return float(-box3(volume)[brain_32].min())

    scores = {}
    for name, score in (
        ("min voxel z-deviation", lambda v: min_deviation(v, False)),
        ("min 3³-box z-deviation", lambda v: min_deviation(v, True)),
        ("min 3³-box z-deviation in brain", min_deviation_in_brain),
        ("darkest 3³ box in brain (no normative map)", darkest_blob),
    ):
        pos = np.array([score(v) for _, _, v, _ in lesions])
        neg = np.array([score(v) for v in healthy])
        scores[name] = round(auc(pos, neg), 3)

    def stats(values):
        values = np.asarray(values, dtype=float)
        return {"mean": round(float(values.mean()), 2), "min": round(float(values.min()), 2),
                "max": round(float(values.max()), 2)}  # fmt: skip

    core_z = [float(v[m >= 0.5].mean()) for *_, v, m in lesions if (m >= 0.5).any()]
    return {
        "task": task,
        "lesion volumes": len(lesions),
        "healthy volumes": len(healthy),
        "side correct (RAS files, LAS files)": {key: f"{ok}/{n}" for key, (ok, n) in side_rows.items()},
        "lesion core voxels at 32³ (mask >= 0.5)": stats(core_sizes),
        "voxels touched at 32³ (mask > 0.05)": stats(touched_sizes),
        "8³ patches holding >5% of the lesion": stats(patches_touched),
        "healthy mean z at the lesion core": stats(healthy_core_z),
        "lesion core mean z": round(float(np.mean(core_z)), 2),
        "CNR, core mean vs same voxels in healthy volumes (sd units)": stats(contrast),
        "CNR per voxel vs normative map (sd units)": stats(voxel_cnr),
        "lesion's 8³ patch: distance to mean healthy patch / healthy patches' rms distance": stats(patch_ratio),
        "oracle AUC, lesion vs healthy": scores,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="local", choices=sorted(LESION_DIAMETER_MM))
    parser.add_argument("--count", type=int, default=16, help="volumes per kind (left, right, healthy)")
    args = parser.parse_args()
    print(json.dumps(diagnose(args.task, args.count), indent=1))


if __name__ == "__main__":
    main()
