"""Relevance maps, measured: do `umbrella_llava.explain`'s maps point at what the answer depends on, do they depend on
the trained weights at all, and what does one cost?

The model is the learning benchmark's tiny model and training loop (`benchmarks.learning.train_model`: SigLIP tower
and Qwen2 LM, 2 layers each, widths 48 and 64, 32³ volumes in 8³ patches, batch 8, lr 2e-3, cosine), trained from
scratch, seed 0, on one question about one volume: "Which hemisphere holds the lesion: left or right?" over the real
MNI152 T1 with a dark lesion in one hemisphere (`benchmarks.learning_data`, task "lesion-side": intensity scale,
noise, shifts of up to ±5 voxels, files half RAS and half LAS). Each lesion size of `DIAMETERS_MM` is trained for the
same budget (`MAX_STEPS`, stopping once the held-out accuracy reaches 0.9); the maps are measured on the smallest size
that is learnt, and every method is run again on the model of the Learning speed's 3 cm lesion, which is not.

Measured on held-out volumes made apart from the training data (seed 1), with their lesion and brain masks carried
through the same shift and the package's own preprocessing:

- the pointing game: the share of the map's top 1 % voxels that lie in the lesion, over the volumes the model answers
  correctly, against chance (the lesion's share of the brain: what a map spread evenly over the brain scores) and
  the ceiling (1, or the lesion's size over the top 1 % where the lesion is smaller);
- the randomisation sanity check (Adebayo et al., 2018): the model's weights re-initialised by its own initialisation,
  cumulatively from the top (LM head, LM layers from the last, projector, tower layers from the last, embedder), the
  map recomputed at each stage and compared with the trained model's by Spearman rank correlation over voxels; a
  map that stays the same when the weights it should explain are gone shows the input, not the model;
- time and peak memory of one `explain` call (the answer given, so no generation), medians over the volumes; peak
  memory is the resident-set high-water mark above the memory held before the call (`VmHWM`, reset through
  `/proc/self/clear_refs` after `malloc_trim`), `torch.cuda.max_memory_allocated` on a GPU.

Run: `python -m benchmarks.relevance` (about 3 minutes on one core; `--quick`: two training steps, one model, two
volumes, seconds). Writes `benchmarks/results/relevance.json` and one figure per method,
`benchmarks/results/relevance_<method>.png` (and `relevance_small_lesion_<method>.png` for the 3 cm model).
"""

import argparse
import copy
import ctypes
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy.stats import spearmanr

from umbrella_llava import UmbrellaLlavaForConditionalGeneration, UmbrellaVolumeProcessor
from umbrella_llava.chat import VolumeConversation
from umbrella_llava.explain import METHODS, Explanation, explain
from umbrella_llava.relevance_figure import save_relevance_figure

from .common import write_report
from .learning import TARGET_ACCURACY, Variant, train_model
from .learning_data import LESION_DIAMETER_MM, QUESTIONS, build_learning_data, lesion_volume, load_templates
from .memory import MIB, _proc_status_kib, _reset_peak_rss

TASK = "lesion-side"
QUESTION = QUESTIONS["lesion_side"]
# Lesion diameters (low, high) in mm, smallest first: the Learning speed's 3 cm lesion, then larger ones.
DIAMETERS_MM = (LESION_DIAMETER_MM["local"], (60.0, 80.0), (80.0, 100.0), (100.0, 120.0))
MAX_STEPS = 600
TRAIN_RECORDS = 160
VOLUMES_PER_KIND = 16
HELD_OUT_PER_SIDE = 12
SANITY_VOLUMES = 4
TOP_FRACTION = 0.01
IG_STEPS = 16
RESULTS = Path(__file__).resolve().parent / "results"


def pointing_game(relevance: torch.Tensor, lesion: torch.Tensor, top_fraction: float = TOP_FRACTION) -> float:
    """The share of the `top_fraction` most relevant voxels of `relevance (H, W, D)` that lie in `lesion (H, W, D)`
    (bool). Voxels tied at the threshold count by the lesion's share among them, so a map constant over patches
    (attention rollout) scores what a random choice among its tied voxels would. 1.0: every top voxel in the lesion;
    0.0: none."""
    values, inside = relevance.flatten().float(), lesion.flatten().float()
    count = max(1, round(top_fraction * values.numel()))
    threshold = values.topk(count).values[-1]
    above = values > threshold
    tied = values == threshold
    hits = inside[above].sum() + (count - above.sum()) * inside[tied].mean()
    return float(hits / count)


def chance_level(lesion: torch.Tensor, brain: torch.Tensor) -> float:
    """The pointing game of a map spread evenly over the brain: the lesion's share of the brain's voxels."""
    return float((lesion & brain).sum() / brain.sum().clamp_min(1))


def ceiling_level(lesion: torch.Tensor, top_fraction: float = TOP_FRACTION) -> float:
    """The best pointing game a map can reach: 1, or the lesion's voxels over the top voxels when it is smaller."""
    return min(1.0, float(lesion.sum()) / max(1, round(top_fraction * lesion.numel())))


def spearman(first: torch.Tensor, second: torch.Tensor) -> float | None:
    """Spearman rank correlation over voxels; None where a map is constant (no ranking to compare)."""
    value = spearmanr(first.detach().flatten().numpy(), second.detach().flatten().numpy()).statistic
    return None if np.isnan(value) else float(value)


def edge_map(volume: torch.Tensor) -> torch.Tensor:
    """The gradient magnitude of `volume (H, W, D)`: the edges a map that only shows the input would draw."""
    return torch.stack(torch.gradient(volume.float())).norm(dim=0)


def randomisation_stages(model: UmbrellaLlavaForConditionalGeneration) -> list[tuple[str, tuple[str, ...]]]:
    """The cascade of the sanity check, top first: `(stage, parameter-name prefixes re-initialised at it)`."""
    text_layers = model.config.text_config.num_hidden_layers
    vision_layers = model.config.vision_config.num_hidden_layers
    head = ("lm_head.", "model.language_model.embed_tokens.", "model.language_model.norm.")
    stages = [("LM head (tied to the token embeddings) + final norm", head)]
    stages += [
        (f"LM layer {i + 1} of {text_layers}", (f"model.language_model.layers.{i}.",))
        for i in reversed(range(text_layers))
    ]
    stages.append(("projector", ("model.multi_modal_projector.",)))
    stages += [
        (f"tower layer {i + 1} of {vision_layers}", (f"model.vision_tower.encoder.layers.{i}.",))
        for i in reversed(range(vision_layers))
    ]
    embedder = ("model.vision_tower.embeddings.", "model.vision_tower.post_layernorm.")
    stages.append(("embedder (patch Linear + positions)", embedder))
    return stages


def cascading_randomisations(model: UmbrellaLlavaForConditionalGeneration, seed: int = 1):
    """Yield `(stage, model)`: a copy of `model` whose weights are re-initialised, by the model's own initialisation
    (a fresh model of the same config, `seed`), cumulatively stage by stage from the top."""
    torch.manual_seed(seed)
    fresh = dict(UmbrellaLlavaForConditionalGeneration(model.config).named_parameters())
    randomised = copy.deepcopy(model).eval()
    parameters = dict(randomised.named_parameters())
    done = set()
    for stage, prefixes in randomisation_stages(model):
        with torch.no_grad():
            for name, parameter in parameters.items():
                if name.startswith(prefixes):
                    parameter.copy_(fresh[name])
                    done.add(name)
        yield stage, randomised
    missed = set(parameters) - done
    if missed:
        raise RuntimeError(f"The randomisation cascade left parameters trained: {sorted(missed)}")


@dataclasses.dataclass
class HeldOutVolume:
    """A held-out volume and where its lesion and brain are, on the model's grid `(H, W, D)` (RAS+)."""

    image: nib.Nifti1Image
    side: str
    lesion: torch.Tensor  # bool
    brain: torch.Tensor  # bool


def held_out_volumes(
    diameter_mm: tuple[float, float], per_side: int, volume_size: int = 32, seed: int = 1
) -> list[HeldOutVolume]:
    """`per_side` lesion volumes per hemisphere, made apart from the training data (`seed`), as NIfTI images on the
    template's affine, with their lesion and brain masks preprocessed like the volume (no intensity normalisation)
    and kept where at least half a voxel of the model's grid holds them."""
    templates = load_templates()
    affine = templates["T1"].affine
    masks = UmbrellaVolumeProcessor(volume_size=volume_size, normalization="none", clip_percentiles=None)
    rng = np.random.default_rng(seed)
    volumes = []
    for side in ("left", "right"):
        for _ in range(per_side):
            data, lesion, brain = lesion_volume(templates, side, diameter_mm, rng)
            on_grid = [
                masks.preprocess_volume(nib.Nifti1Image(mask.astype(np.float32), affine))[0] >= 0.5
                for mask in (lesion, brain)
            ]
            volumes.append(HeldOutVolume(nib.Nifti1Image(data, affine), side, *on_grid))
    return volumes


def release_free_memory() -> None:
    """Hand the C heap's free memory back to the system (glibc's `malloc_trim`), so that a peak measured next counts
    what the next call allocates rather than what it reuses of earlier calls' freed memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then undercount
        pass


def relevance_map(model, processor, volume: HeldOutVolume, method: str, n_steps: int) -> Explanation:
    """The map of the true answer about `volume` by `method` (one of `explain.METHODS`)."""
    return explain(model, processor, [volume.image], QUESTION, answer=volume.side, method=method, n_steps=n_steps)


def timed_explain(model, processor, volume: HeldOutVolume, method: str, n_steps: int):
    """`relevance_map` (`explain` of the true answer), with its wall time (s) and peak memory above what was held
    before (MiB)."""
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        release_free_memory()
        before = (_proc_status_kib("VmRSS") or 0) * 1024
        _reset_peak_rss()
    started = time.perf_counter()
    result = relevance_map(model, processor, volume, method, n_steps)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if cuda else (_proc_status_kib("VmHWM") or 0) * 1024
    return result, seconds, (peak - before) / MIB


def mean_sd(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 3), "sd": round(sd, 3), "n": len(values)}


def train_for_size(diameter_mm, workdir: Path, quick: bool) -> tuple:
    """The benchmark's model trained on lesions of `diameter_mm`: `(model, processor, summary)`."""
    variant = Variant(
        f"lesion side, {diameter_mm[0]:g}-{diameter_mm[1]:g} mm", "side question only", task=TASK,
        train_records=8 if quick else TRAIN_RECORDS, volumes_per_kind=2 if quick else VOLUMES_PER_KIND,
        max_steps=2 if quick else MAX_STEPS,
    )  # fmt: skip
    folder = workdir / f"data-{diameter_mm[0]:g}-{diameter_mm[1]:g}"
    data = build_learning_data(
        folder, TASK, variant.train_records, 4 if quick else 48, variant.volumes_per_kind, 0, diameter_mm
    )
    model, processor, callback, seconds = train_model(variant, data, seed=0, workdir=workdir)
    step, accuracy = callback.history[-1]
    summary = {
        "lesion_diameter_mm": list(diameter_mm),
        "held_out_accuracy": round(accuracy["lesion_side"], 3),
        "last_step": step,
        "steps_to_target": callback.steps_to_target,
        "last_training_loss": callback.losses[-1][1] if callback.losses else None,
        "history": [(s, round(a["lesion_side"], 3)) for s, a in callback.history],
        "training_seconds": round(seconds, 1),
    }
    print(f"[relevance] {variant.name}: held-out {summary['held_out_accuracy']} at step {step}", flush=True)
    return model, processor, summary


def measure_methods(model, processor, volumes: list[HeldOutVolume], quick: bool, figures: Path | None) -> dict:
    """Pointing game, sanity check, time and memory of every method on `volumes` answered correctly (all of them
    when `quick`)."""
    answered = []
    for volume in volumes:
        answer = VolumeConversation(model, processor, [volume.image], max_new_tokens=4).ask(QUESTION)
        if answer == volume.side or quick:
            answered.append(volume)
    n_steps = 2 if quick else IG_STEPS
    sanity_volumes = answered[: 1 if quick else SANITY_VOLUMES]
    results = {"volumes": len(volumes), "answered_correctly": len(answered) if not quick else None}
    for method in METHODS:
        maps, shares, seconds, peaks = [], [], [], []
        for volume in answered:
            result, took, peak = timed_explain(model, processor, volume, method, n_steps)
            maps.append(result)
            shares.append(where_the_top_voxels_are(result.relevance[0], volume))
            seconds.append(took)
            peaks.append(peak)
        cascade: dict[str, list] = {}
        for stage, randomised in cascading_randomisations(model):
            for volume, original in zip(sanity_volumes, maps):
                again = relevance_map(randomised, processor, volume, method, n_steps).relevance[0]
                cascade.setdefault(stage, []).append(spearman(original.relevance[0], again))
        scan = [result.pixel_values[0, 0, 0] for result in maps]
        results[method] = {
            "pointing_game": mean_sd([share["in_lesion"] for share in shares]),
            "pointing_game_per_volume": [round(share["in_lesion"], 3) for share in shares],
            "pointing_game_by_side": {
                side: mean_sd([share["in_lesion"] for share, v in zip(shares, answered) if v.side == side])
                for side in ("left", "right")
            },
            "top_1pc_in_brain": mean_sd([share["in_brain"] for share in shares]),
            "top_1pc_in_lesion_hemisphere": mean_sd([share["in_lesion_hemisphere"] for share in shares]),
            "chance": mean_sd([chance_level(v.lesion, v.brain) for v in answered]),
            "ceiling": mean_sd([ceiling_level(v.lesion) for v in answered]),
            "randomisation_spearman": {stage: mean_sd(values) for stage, values in cascade.items()},
            "spearman_with_the_scans_edges": mean_sd(
                [spearman(r.relevance[0], edge_map(s)) for r, s in zip(maps, scan)]
            ),
            "seconds_per_map": round(statistics.median(seconds), 4) if seconds else None,
            "peak_mib_per_map": round(statistics.median(peaks), 1) if peaks else None,
        }
        if figures is not None and maps:
            path = figures / f"relevance_{method}.png"
            title = (f"{method}: '{maps[0].answer}' ({answered[0].side} lesion), pointing game {shares[0]['in_lesion']:.2f}, "
                     f"chance {chance_level(answered[0].lesion, answered[0].brain):.2f}")  # fmt: skip
            save_relevance_figure(maps[0].pixel_values[0, 0], maps[0].relevance[0], path, title)
            results[method]["figure"] = path.name
    return results


def where_the_top_voxels_are(relevance: torch.Tensor, volume: HeldOutVolume) -> dict[str, float]:
    """The shares of the top 1 % voxels of `relevance (H, W, D)` in the lesion, in the brain, and in the lesion's
    hemisphere (the model's grid is RAS+: the first axis runs left to right)."""
    hemisphere = torch.zeros_like(volume.lesion)
    half = hemisphere.shape[0] // 2
    (hemisphere[:half] if volume.side == "left" else hemisphere[half:]).fill_(True)
    return {
        "in_lesion": pointing_game(relevance, volume.lesion),
        "in_brain": pointing_game(relevance, volume.brain),
        "in_lesion_hemisphere": pointing_game(relevance, hemisphere),
    }


def small_lesion_maps(model, processor, volumes: list[HeldOutVolume], quick: bool, figures: Path | None) -> dict:
    """Every method's maps of the true answer on `volumes`, whatever the model answers: where their top voxels are;
    a figure of the first volume per method (`relevance_small_lesion_<method>.png`)."""
    answers = [VolumeConversation(model, processor, [v.image], max_new_tokens=4).ask(QUESTION) for v in volumes]
    report = {
        "volumes": len(volumes),
        "answered_correctly": sum(a == v.side for a, v in zip(answers, volumes)),
        "chance": mean_sd([chance_level(v.lesion, v.brain) for v in volumes]),
        "ceiling": mean_sd([ceiling_level(v.lesion) for v in volumes]),
    }
    for method in METHODS:
        shares = []
        for volume in volumes:
            result = relevance_map(model, processor, volume, method, 2 if quick else IG_STEPS)
            shares.append(where_the_top_voxels_are(result.relevance[0], volume))
            if figures is not None and len(shares) == 1:
                title = (f"{method}, 3 cm lesion task: '{volume.side}' ({volume.side} lesion), model answered "
                         f"'{answers[0]}', top 1 % in lesion {shares[0]['in_lesion']:.2f}")  # fmt: skip
                save_relevance_figure(
                    result.pixel_values[0, 0], result.relevance[0], figures / f"relevance_small_lesion_{method}.png",
                    title,
                )  # fmt: skip
        report[method] = {f"top_1pc_{key}": mean_sd([share[key] for share in shares]) for key in shares[0]}
    return report


def recommended_method(methods: dict) -> str:
    """The method with the highest pointing game among those whose maps decorrelate once every weight is
    re-initialised (last stage's Spearman below 0.5); the highest pointing game if none does."""

    def last_stage(method):
        return list(methods[method]["randomisation_spearman"].values())[-1]["mean"]

    passing = [m for m in METHODS if last_stage(m) is not None and abs(last_stage(m)) < 0.5] or list(METHODS)
    return max(passing, key=lambda m: methods[m]["pointing_game"]["mean"] or 0.0)


def run_benchmark(quick: bool = False, figures: Path | None = RESULTS) -> dict:
    """Train one model per lesion size, measure every method on the smallest learnt one, and the recommended method
    on the 3 cm one. Returns the report."""
    started = time.perf_counter()
    diameters = DIAMETERS_MM[-1:] if quick else DIAMETERS_MM  # quick: one model serves both parts
    per_side = 1 if quick else HELD_OUT_PER_SIDE
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
    report: dict = {"quick": quick, "question": QUESTION, "top_fraction": TOP_FRACTION, "ig_steps": IG_STEPS,
                    "training": []}  # fmt: skip
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for diameter in diameters:
            model, processor, summary = train_for_size(diameter, Path(tmp), quick)
            report["training"].append(summary)
            models[diameter] = (model, processor)
    learnt = [s for s in report["training"] if s["held_out_accuracy"] >= TARGET_ACCURACY]
    chosen = tuple(learnt[0]["lesion_diameter_mm"]) if learnt else diameters[-1]
    report["measured_on_diameter_mm"] = list(chosen)
    model, processor = models[chosen]
    volumes = held_out_volumes(chosen, per_side)
    report["methods"] = measure_methods(model, processor, volumes, quick, figures)
    report["recommended"] = recommended_method(report["methods"])
    small = diameters[0]
    model, processor = models[small]
    report["small_lesion"] = {
        "lesion_diameter_mm": list(small),
        **small_lesion_maps(model, processor, held_out_volumes(small, per_side), quick, figures),
    }  # fmt: skip
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def bench_relevance(quick: bool = False) -> list[dict]:
    """`run_benchmark` as rows of `benchmarks.run`'s table (one per method); writes no files."""
    report = run_benchmark(quick, figures=None)
    rows = []
    for method in METHODS:
        measured = report["methods"][method]
        cascade = measured["randomisation_spearman"]
        rows.append(
            {
                "benchmark": "relevance",
                "case": method,
                "metric": "pointing game: top 1 % voxels in the lesion (mean over correctly answered volumes)",
                "value": measured["pointing_game"]["mean"],
                "goal": "report",
                "met": None,
                "ours_ms": None if measured["seconds_per_map"] is None else 1000 * measured["seconds_per_map"],
                "baseline_ms": None,
                "note": f"chance {measured['chance']['mean']}; Spearman with the trained map after re-initialising "
                + ", ".join(f"{stage} {value['mean']}" for stage, value in cascade.items())
                + f"; peak {measured['peak_mib_per_map']} MiB; lesion {report['measured_on_diameter_mm']} mm",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes, a few seconds: a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS / "relevance.json", help="where the JSON report goes")
    parser.add_argument("--figures", type=Path, default=RESULTS, help="folder of the relevance_<method>.png figures")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: per core)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from .run import machine_description

    report = {"machine": machine_description(), **run_benchmark(args.quick, args.figures)}
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
