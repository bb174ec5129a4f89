"""Is the lesion of the local learning task visible to a linear patch reader at all?

The tiny model does not learn the local task (`benchmarks.learning`, "lesion (local)"), not even whether a scan has a
lesion, so the question is whether the information survives the first step of the volume path: cutting the
preprocessed 32³ volume into 8³ patches and reading each patch linearly, as `UmbrellaVolumeEmbeddings` does. Two
readers are fitted with Adam on the training volumes and scored on held-out ones, for "has a lesion":

- mean: one linear score per patch, averaged over the volume's patches (what an attention that has not learnt where
  to look computes);
- max: the same score, the volume taking its highest patch (a reader that already knows to look for one patch).

Both on the raw z-scored patches and on patches minus the mean healthy volume (a normative reference). If neither
generalises, the lesion is not linearly readable from a patch at this size and sample count: the tower has to build a
non-linear detector from few examples, which no change of learning rate or projector fixes.
"""

import tempfile
from pathlib import Path

import torch
from einops import rearrange

from umbrella_llava import UmbrellaVolumeProcessor

from .learning_data import build_learning_data

STEPS = 500
SEEDS = (0, 1)


def patch_vectors(folder: Path, split: str, processor: UmbrellaVolumeProcessor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(volumes (M, 64, 512), has_lesion (M,))` for the files of `split`: 8³ patches in the embedder's layout."""
    paths = sorted(folder.glob(f"{split}-*.nii.gz"))
    volumes = torch.stack([processor.preprocess_volume(path)[0] for path in paths])
    patches = rearrange(volumes, "m (h ph) (w pw) (d pd) -> m (h w d) (ph pw pd)", ph=8, pw=8, pd=8)
    return patches, torch.tensor([0.0 if "healthy" in path.name else 1.0 for path in paths])


def fit_and_score(train, held_out, pool, seed: int) -> tuple[float, float]:
    """Train and held-out accuracy of a linear patch score pooled by `pool` over each volume's patches."""
    torch.manual_seed(seed)
    reader = torch.nn.Linear(train[0].shape[-1], 1)
    optimizer = torch.optim.Adam(reader.parameters(), lr=1e-2)
    for _ in range(STEPS):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(pool(reader(train[0]).squeeze(-1)), train[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return tuple(
            float(((pool(reader(x).squeeze(-1)) > 0).float() == y).float().mean()) for x, y in (train, held_out)
        )


def bench_lesion_probe(quick: bool = False) -> list[dict]:
    volumes_per_kind = 4 if quick else 64
    processor = UmbrellaVolumeProcessor(volume_size=32)
    pools = {"mean": lambda scores: scores.mean(1), "max": lambda scores: scores.amax(1)}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        build_learning_data(folder, "local", 2, 2, volumes_per_kind, seed=0)
        train, held_out = patch_vectors(folder, "train", processor), patch_vectors(folder, "eval", processor)
        majority = max(float(held_out[1].mean()), 1 - float(held_out[1].mean()))
        reference = train[0][train[1] == 0].mean(0)
        for centred in (False, True):
            shift = reference if centred else 0.0
            data = ((train[0] - shift, train[1]), (held_out[0] - shift, held_out[1]))
            for name, pool in pools.items():
                scores = [fit_and_score(*data, pool, seed) for seed in (SEEDS[:1] if quick else SEEDS)]
                rows.append(
                    {
                        "benchmark": "lesion_probe",
                        "case": f"{name} over 8³ patches, {'minus the healthy mean' if centred else 'raw'}",
                        "metric": "held-out accuracy, has a lesion (per seed)",
                        "value": min(held_out_accuracy for _, held_out_accuracy in scores),
                        "goal": None,
                        "met": None,
                        "ours_ms": None,
                        "baseline_ms": None,
                        "note": f"train {[round(a, 2) for a, _ in scores]}, held-out {[round(b, 2) for _, b in scores]}, "
                        f"majority {majority:.2f}; {len(train[1])} training / {len(held_out[1])} held-out volumes",
                    }
                )
    return rows
