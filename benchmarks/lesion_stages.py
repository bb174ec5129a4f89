"""Where along the volume path is the local task's lesion lost? Probes of the untrained model's features, stage by stage.

The tiny model of `benchmarks.learning` (defaults, seed 0, untrained: what the language model sees at step 0) encodes
the task's volumes; at each stage a small probe is fitted on the training volumes' frozen features and scored on
held-out ones:

- `patches`: the z-scored volume cut into 8³ patches (512 voxels each), what the patch `Linear` reads;
- `embedder`: the patch embeddings with positions added (`UmbrellaVolumeEmbeddings`, width 48);
- `tower`: the SigLIP encoder's output (2 layers of attention and MLP, width 48);
- `projector`: the image-token features the language model receives (width 64).

Probes, all over a volume's 64 tokens: `mean` (a linear read of the mean token), and `attention` (a learnt query
scores every token, the softmax-weighted token is read linearly: what one attention head of the LM can do). Questions:
`presence` (lesion vs healthy volume) and `side` (left vs right, lesion volumes only). Features are standardised per
dimension over the training tokens. If a stage's attention probe reads the lesion, the information reaches the
language model, and what fails is the language model learning to read it (optimisation); if it is lost at a stage,
that stage is the cause.

Run: `python -m benchmarks.lesion_stages [--task local|local-noshift|local-large] [--count N]`.
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch
from einops import rearrange
from torch import nn
from transformers import set_seed

from umbrella_llava import UmbrellaLlavaForConditionalGeneration

from .learning import LOCAL_DIAGNOSTICS, add_conv_stem, build_config, build_processor
from .learning_data import build_learning_data

STEPS = 300
SEEDS = (0, 1)


def volumes_of(folder: Path, split: str, processor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(volumes (M, 1, 32, 32, 32), has_lesion (M,), is_right (M,))` for the files of `split`."""
    paths = sorted(folder.glob(f"{split}-*.nii.gz"))
    volumes = torch.stack([processor.preprocess_volume(path) for path in paths])
    has_lesion = torch.tensor([0.0 if "healthy" in path.name else 1.0 for path in paths])
    is_right = torch.tensor([1.0 if "-right-" in path.name else 0.0 for path in paths])
    return volumes, has_lesion, is_right


@torch.no_grad()
def stages(model, volumes: torch.Tensor) -> dict[str, torch.Tensor]:
    inner = model.model
    features = inner.get_image_features(volumes)
    return {
        "patches": rearrange(volumes[:, 0], "m (h ph) (w pw) (d pd) -> m (h w d) (ph pw pd)", ph=8, pw=8, pd=8),
        "embedder": inner.vision_tower.embeddings(volumes),
        "tower": features.last_hidden_state,
        "projector": features.pooler_output,
    }


class AttentionProbe(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.score, self.read = nn.Linear(width, 1), nn.Linear(width, 1)

    def forward(self, tokens):
        weights = self.score(tokens).softmax(dim=1)
        return self.read((weights * tokens).sum(1)).squeeze(-1)


class MeanProbe(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.read = nn.Linear(width, 1)

    def forward(self, tokens):
        return self.read(tokens.mean(1)).squeeze(-1)


def fit_and_score(probe_type, train, held_out, seed: int) -> tuple[float, float]:
    torch.manual_seed(seed)
    probe = probe_type(train[0].shape[-1])
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(STEPS):
        loss = nn.functional.binary_cross_entropy_with_logits(probe(train[0]), train[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return tuple(float(((probe(x) > 0).float() == y).float().mean()) for x, y in (train, held_out))


def staged_volumes(task: str, count: int, stem: bool = False) -> tuple:
    """The task's training and held-out volumes with their labels, and each set's features at every stage of the
    untrained model (seed 0): `(train, held_out, train_stages, held_out_stages)`."""
    set_seed(0)
    processor = build_processor(32, 64)
    model = UmbrellaLlavaForConditionalGeneration(build_config(LOCAL_DIAGNOSTICS[0], processor.tokenizer)).eval()
    if stem:
        add_conv_stem(model)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        build_learning_data(folder, task, 2, 2, count, seed=0)
        train = volumes_of(folder, "train", processor.image_processor)
        held_out = volumes_of(folder, "eval", processor.image_processor)
    train_stages, held_out_stages = stages(model, train[0]), stages(model, held_out[0])
    return train, held_out, train_stages, held_out_stages


def probe_stages(task: str, count: int, stem: bool = False) -> list[dict]:
    train, held_out, train_stages, held_out_stages = staged_volumes(task, count, stem)
    rows = []
    for stage in train_stages:
        x_train, x_held = train_stages[stage], held_out_stages[stage]
        mean, std = x_train.flatten(0, 1).mean(0), x_train.flatten(0, 1).std(0).clamp_min(1e-6)
        x_train, x_held = (x_train - mean) / std, (x_held - mean) / std
        for question in ("presence", "side"):
            if question == "presence":
                data = ((x_train, train[1]), (x_held, held_out[1]))
            else:
                data = (
                    (x_train[train[1] == 1], train[2][train[1] == 1]),
                    (x_held[held_out[1] == 1], held_out[2][held_out[1] == 1]),
                )
            for name, probe_type in (("mean", MeanProbe), ("attention", AttentionProbe)):
                scores = [fit_and_score(probe_type, *data, seed) for seed in SEEDS]
                rows.append(
                    {
                        "stage": stage, "question": question, "probe": name,
                        "train": [round(a, 2) for a, _ in scores], "held_out": [round(b, 2) for _, b in scores],
                    }
                )  # fmt: skip
    return rows


def token_contrast(task: str, count: int, stem: bool = False) -> dict[str, dict[str, float]]:
    """At each stage of the untrained model: how far the most deviant token of a lesion volume is from the mean healthy
    token at its position, over how far healthy tokens are from it (rms); and the same for held-out healthy volumes
    (what a lesion must beat). A ratio that falls from stage to stage is information the stage mixes away."""
    train, held_out, train_stages, held_out_stages = staged_volumes(task, count, stem)
    result = {}
    for stage, tokens in train_stages.items():
        healthy = tokens[train[1] == 0]
        normal = healthy.mean(0)
        spread = (healthy - normal).norm(dim=-1).square().mean(0).sqrt()  # (64,) rms per position
        ratio = ((held_out_stages[stage] - normal).norm(dim=-1) / spread).amax(1)  # most deviant token per volume
        lesion, clean = ratio[held_out[1] == 1], ratio[held_out[1] == 0]
        result[stage] = {
            "lesion volumes, max token ratio": round(float(lesion.mean()), 2),
            "healthy volumes, max token ratio": round(float(clean.mean()), 2),
            "AUC": round(float((lesion[:, None] > clean[None, :]).float().mean()), 2),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="local")
    parser.add_argument("--count", type=int, default=32, help="training volumes per kind (left, right, healthy)")
    parser.add_argument("--contrast", action="store_true", help="only the token contrast per stage (no probes)")
    args = parser.parse_args()
    if args.contrast:
        print(json.dumps({"task": args.task, **token_contrast(args.task, args.count)}, indent=1))
        return
    for row in probe_stages(args.task, args.count):
        print(json.dumps({"task": args.task, **row}))


if __name__ == "__main__":
    main()
