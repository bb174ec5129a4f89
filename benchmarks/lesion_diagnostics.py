"""Why the Learning speed's 3 cm lesion is not learnt: the checks that located the cause, one command each.

`python -m benchmarks.lesion_diagnostics data` (no training, about 20 s): the local task's lesions, regenerated with
their masks by the benchmark's own code, written half RAS and half LAS and read back through `UmbrellaVolumeProcessor`
(32³, z-score): whether the lesion lies on the side the answer names, its contrast against the same voxels of healthy
volumes, its size at 32³, how far its 8³ patch is from the normal patch, and oracle detectors that know the normal
anatomy (AUC of lesion vs healthy volumes). If these separate the classes, the lesion is in the data.

`python -m benchmarks.lesion_diagnostics stages` (no training): at each stage of the untrained model (raw 8³ patches,
embedder, tower, projector), how far the most deviant token of a lesion volume is from the mean healthy token at its
position, over how far healthy tokens are; a ratio that falls from stage to stage is information the stage mixes
away.

`python -m benchmarks.lesion_diagnostics head [--readout attention|hemisphere-max] [--conv-embedding] [--cnn]`: the
benchmark's tower + projector trained from scratch like the benchmark (AdamW, cosine with 10 warm-up steps, batch 8),
read without the language model by a small classifier (one learnt attention query, or the maximum over each
hemisphere's tokens) into three classes (healthy, lesion left, lesion right); `--conv-embedding` puts `SmallCNN`'s
3³ conv features, max-pooled per patch, in place of the patch `Linear`; `--cnn` replaces the whole path by
`SmallCNN`, a reference for what the data allow. Scored on held-out volumes (presence, and side on lesion volumes).

The findings (BENCHMARKS.md, "Learning speed"): the lesion is in the data and survives every stage; it generalises
only with local detectors shared across positions *and* a max readout after the projector. Where the trained model's
relevance maps point is `benchmarks.relevance`.
"""

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from einops import rearrange
from torch import nn
from transformers import set_seed

from umbrella_llava import UmbrellaLlavaForConditionalGeneration, UmbrellaVolumeProcessor

from .learning import LOCAL_DIAGNOSTICS, add_conv_patch_embedding, build_config, build_processor, conv_features
from .learning_data import (
    LESION_DIAMETER_MM,
    MAX_SHIFT,
    MAX_SHIFT_VOXELS,
    _write,
    build_learning_data,
    lesion_volume,
    load_templates,
    local_task_volumes,
)

# --- data: is the lesion in the data, on the side the answer names? ---------------------------------------------


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)


def box3(volume: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool3d(volume[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]


def diagnose(task: str, count: int, seed: int = 0) -> dict:
    """The data checks of the module's docstring, over `count` volumes per kind (left, right, healthy) of `task`."""
    rng = np.random.default_rng(seed)
    templates = load_templates()
    t1 = templates["T1"]
    brain = np.asarray(templates["grey matter"].dataobj) + np.asarray(templates["white matter"].dataobj) > 0.5
    processor = UmbrellaVolumeProcessor(volume_size=32)
    mask_processor = UmbrellaVolumeProcessor(volume_size=32, normalization="none", clip_percentiles=None)
    lesions, healthy = [], []
    with tempfile.TemporaryDirectory() as folder:
        for i in range(count):
            store_las = bool(i % 2)
            for side in ("left", "right", None):
                max_shift = MAX_SHIFT.get(task, MAX_SHIFT_VOXELS)
                data, mask, _ = lesion_volume(templates, side, LESION_DIAMETER_MM[task], rng, max_shift)
                path = Path(folder) / f"{side}-{i}.nii.gz"
                _write(data, t1.affine, path, store_las)
                volume = processor.preprocess_volume(path)[0]
                if side is None:
                    healthy.append(volume)
                    continue
                mask_path = Path(folder) / f"{side}-{i}-mask.nii.gz"
                _write(mask.astype(np.float32), t1.affine, mask_path, store_las)
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


# --- stages: does any stage of the untrained model lose it? -------------------------------------------------------


def volumes_of(folder: Path, split: str, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(volumes (M, 1, 32, 32, 32), class (M,))` of the files of `split`: class 0 healthy, 1 lesion left, 2 right."""
    paths = sorted(folder.glob(f"{split}-*.nii.gz"))
    volumes = torch.stack([processor.preprocess_volume(path) for path in paths])
    labels = torch.tensor([0 if "healthy" in p.name else 1 if "-left-" in p.name else 2 for p in paths])
    return volumes, labels


def untrained_model() -> UmbrellaLlavaForConditionalGeneration:
    """The learning benchmark's tiny model (the local task's configuration), seed 0, untrained."""
    set_seed(0)
    processor = build_processor(32, 64)
    return UmbrellaLlavaForConditionalGeneration(build_config(LOCAL_DIAGNOSTICS[0], processor.tokenizer))


def task_volumes(task: str, count: int) -> tuple[tuple, tuple]:
    """The task's training and held-out volumes and classes (`volumes_of`), `count` training volumes per kind."""
    processor = build_processor(32, 64).image_processor
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        build_learning_data(folder, task, 2, 2, count, seed=0)
        return volumes_of(folder, "train", processor), volumes_of(folder, "eval", processor)


@torch.no_grad()
def stages(model, volumes: torch.Tensor) -> dict[str, torch.Tensor]:
    """A volume's 64 tokens at each stage of the path: raw 8³ patches, embedder, tower, projector."""
    inner = model.model
    features = inner.get_image_features(volumes)
    return {
        "patches": rearrange(volumes[:, 0], "m (h ph) (w pw) (d pd) -> m (h w d) (ph pw pd)", ph=8, pw=8, pd=8),
        "embedder": inner.vision_tower.embeddings(volumes),
        "tower": features.last_hidden_state,
        "projector": features.pooler_output,
    }


def token_contrast(task: str, count: int) -> dict[str, dict[str, float]]:
    """At each stage of the untrained model: how far the most deviant token of a lesion volume is from the mean healthy
    token at its position, over how far healthy tokens are from it (rms); and the same for held-out healthy volumes
    (what a lesion must beat)."""
    model = untrained_model().eval()
    train, held_out = task_volumes(task, count)
    train_stages, held_out_stages = stages(model, train[0]), stages(model, held_out[0])
    result = {}
    for stage, tokens in train_stages.items():
        healthy = tokens[train[1] == 0]
        normal = healthy.mean(0)
        spread = (healthy - normal).norm(dim=-1).square().mean(0).sqrt()  # (64,) rms per position
        ratio = ((held_out_stages[stage] - normal).norm(dim=-1) / spread).amax(1)  # most deviant token per volume
        lesion, clean = ratio[held_out[1] > 0], ratio[held_out[1] == 0]
        result[stage] = {
            "lesion volumes, max token ratio": round(float(lesion.mean()), 2),
            "healthy volumes, max token ratio": round(float(clean.mean()), 2),
            "AUC": auc(lesion.numpy(), clean.numpy()),
        }
    return result


# --- head: can the vision path learn it without the language model? ----------------------------------------------


class VolumeClassifier(nn.Module):
    def __init__(self, model, width: int):
        super().__init__()
        self.inner = model.model
        self.query = nn.Linear(width, 1)
        self.read = nn.Linear(width, 3)

    def forward(self, volumes):
        tokens = self.inner.get_image_features(volumes).pooler_output  # (M, 64, text width)
        weights = self.query(tokens).softmax(dim=1)
        return self.read((weights * tokens).sum(1))


class HemisphereMaxClassifier(nn.Module):
    """The tower + projector output read by its maximum over each hemisphere's image tokens (the patch grid's first
    axis is RAS left -> right), then a linear layer: `SmallCNN`'s readout on the model's tokens."""

    def __init__(self, model, width: int):
        super().__init__()
        self.inner = model.model
        self.grid = tuple(model.config.volume_grid)
        self.read = nn.Linear(2 * width, 3)

    def forward(self, volumes):
        tokens = self.inner.get_image_features(volumes).pooler_output
        tokens = tokens.view(tokens.shape[0], *self.grid, tokens.shape[-1])
        half = self.grid[0] // 2
        left, right = tokens[:, :half].amax((1, 2, 3)), tokens[:, half:].amax((1, 2, 3))
        return self.read(torch.cat([left, right], dim=1))


class SmallCNN(nn.Module):
    """A reference with the inductive bias the patch path lacks: translation-invariant 3³ detectors, max-pooled over
    each hemisphere (the first axis is RAS left -> right), three classes. No transformer, no language model."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.features = conv_features(1, channels)
        self.read = nn.Linear(2 * channels, 3)

    def forward(self, volumes):
        maps = self.features(volumes)
        half = maps.shape[2] // 2
        left, right = maps[:, :, :half].amax((2, 3, 4)), maps[:, :, half:].amax((2, 3, 4))
        return self.read(torch.cat([left, right], dim=1))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    predicted = logits.argmax(-1)
    lesion = labels > 0
    presence = ((predicted > 0) == lesion).float().mean()
    side = (predicted[lesion] == labels[lesion]).float().mean()
    return {"presence": round(float(presence), 2), "side": round(float(side), 2)}


def volumes_in_memory(task: str, count: int, rng: np.random.Generator, processor) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` volumes per kind made like `learning_data.write_volumes` (`local_task_volumes`: same lesions and
    augmentation), but kept in memory as RAS arrays (no files: many volumes fit), preprocessed by the same processor."""
    volumes, labels = [], []
    for _, side, _, data in local_task_volumes(task, count, rng):
        volumes.append(processor.preprocess_volume(data))
        labels.append({"left": 1, "right": 2, None: 0}[side])
    return torch.stack(volumes), torch.tensor(labels)


def train_head(
    task: str = "local",
    count: int = 16,
    steps: int = 600,
    seed: int = 0,
    lr: float = 2e-3,
    readout: str = "attention",
    conv_embedding: bool = False,
    cnn: bool = False,
    in_memory: bool = False,
) -> dict:
    """Train the tower + projector (or `SmallCNN` when `cnn`) and a `readout` head on `count` training volumes per
    kind; returns the accuracy history (every 100 steps and at the end) on the training and held-out volumes."""
    set_seed(seed)
    processor = build_processor(32, 64)
    model = UmbrellaLlavaForConditionalGeneration(build_config(LOCAL_DIAGNOSTICS[0], processor.tokenizer))
    if conv_embedding:
        add_conv_patch_embedding(model)
    if in_memory:
        rng = np.random.default_rng(0)
        train = volumes_in_memory(task, count, rng, processor.image_processor)
        held_out = volumes_in_memory(task, max(2, count // 2), rng, processor.image_processor)
    else:
        train, held_out = task_volumes(task, count)
    readers = {"attention": VolumeClassifier, "hemisphere-max": HemisphereMaxClassifier}
    classifier = SmallCNN() if cnn else readers[readout](model, model.config.text_config.hidden_size)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    history, started = [], time.perf_counter()
    for step in range(1, steps + 1):
        batch = torch.randint(len(train[1]), (8,), generator=generator)
        loss = nn.functional.cross_entropy(classifier(train[0][batch]), train[1][batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            with torch.no_grad():
                classifier.eval()
                history.append(
                    {"step": step, "train": accuracy(classifier(train[0]), train[1]),
                     "held_out": accuracy(classifier(held_out[0]), held_out[1])}
                )  # fmt: skip
                classifier.train()
    return {
        "task": task, "volumes per kind": count, "in memory": in_memory, "conv embedding": conv_embedding,
        "seed": seed, "steps": steps, "lr": lr, "reader": "small CNN" if cnn else f"tower + projector + {readout} head",
        "minutes": round((time.perf_counter() - started) / 60, 1), "history": history,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    checks = parser.add_subparsers(dest="check", required=True)
    data = checks.add_parser("data", help="is the lesion in the data, on the answer's side (no training)")
    data.add_argument("--task", default="local", choices=sorted(LESION_DIAMETER_MM))
    data.add_argument("--count", type=int, default=16, help="volumes per kind (left, right, healthy)")
    contrast = checks.add_parser("stages", help="the lesion token's contrast at each stage of the untrained model")
    contrast.add_argument("--task", default="local", choices=sorted(LESION_DIAMETER_MM))
    contrast.add_argument("--count", type=int, default=32, help="training volumes per kind")
    head = checks.add_parser("head", help="the vision path trained with a small classifier instead of the LM")
    head.add_argument("--task", default="local", choices=sorted(LESION_DIAMETER_MM))
    head.add_argument("--count", type=int, default=16, help="training volumes per kind (left, right, healthy)")
    head.add_argument("--steps", type=int, default=600)
    head.add_argument("--seed", type=int, default=0)
    head.add_argument("--lr", type=float, default=2e-3)
    head.add_argument("--readout", choices=("attention", "hemisphere-max"), default="attention",
                      help="one learnt attention query, or the maximum over each hemisphere's tokens")  # fmt: skip
    head.add_argument("--conv-embedding", action="store_true", help="SmallCNN's features as the patch embedding")
    head.add_argument("--cnn", action="store_true", help="the SmallCNN reference instead of the model's vision path")
    head.add_argument("--in-memory", action="store_true", help="volumes made in memory (for counts beyond disk)")
    args = parser.parse_args(argv)
    if args.check == "data":
        print(json.dumps(diagnose(args.task, args.count), indent=1))
    elif args.check == "stages":
        print(json.dumps({"task": args.task, **token_contrast(args.task, args.count)}, indent=1))
    else:
        print(json.dumps(train_head(
            args.task, args.count, args.steps, args.seed, args.lr, args.readout, args.conv_embedding, args.cnn,
            args.in_memory,
        )))  # fmt: skip


if __name__ == "__main__":
    main()
