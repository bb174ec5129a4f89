#!/usr/bin/env python
"""Teach a small UmbrellaLlava to answer questions about real brain volumes, on a CPU, in about a minute.

    python scripts/demo.py [--output_dir outputs/demo] [--max_steps 300]

1. Builds an instruction dataset from real brains shipped inside nilearn (the MNI152 T1, grey-matter and
   white-matter templates), augmented with left/right shifts, intensity changes and noise, written as NIfTI files
   with UMBRELLA conversation records (JSONL):
     - "tissue" (T1): which map is this: T1, grey matter or white matter?          chance 1/3
     - "side"   (T1): is the brain shifted to the left or to the right?           chance 1/2
     - "compare" (T3): two scans: do they show the same kind of map? yes / no    chance 1/2
   No question can be answered from its text: the answer is in the volumes only.
2. Trains an UmbrellaLlava from scratch with the stock `transformers.Trainer` (ConversationDataset +
   UmbrellaCollator, a locally trained tokenizer).
3. Measures held-out accuracy per question type with greedy `generate()`, scored by the package's evaluation (the
   code of `umbrella-evaluate`: accuracy, balanced accuracy and macro F1 with 95 % bootstrap intervals, the majority
   baseline), and writes `DIR/metrics.json` (accuracy with its interval, chance level, counts, and the whole
   evaluation) and `DIR/evaluation/` (predictions.jsonl, metrics.json, report.md, a confusion matrix per question).
4. Saves `DIR/model` (model, processor, code, model card), reloads it in a fresh Python process through
   `AutoModelForImageTextToText` with `trust_remote_code=True`, and answers a question about one held-out volume.
5. Writes `DIR/loss_curve.png` and `DIR/preview.png` (the three mid-planes of a preprocessed volume).
"""

import argparse
import json
import logging
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from transformers import Trainer, TrainingArguments, set_seed

from umbrella_llava import (
    UmbrellaLlavaConfig,
    UmbrellaLlavaForConditionalGeneration,
    UmbrellaLlavaProcessor,
    UmbrellaVolumeProcessor,
)
from umbrella_llava.data import ConversationDataset, UmbrellaCollator
from umbrella_llava.evaluation import evaluate_generation
from umbrella_llava.hub import render_model_card
from umbrella_llava.metrics import compute_metrics, require_eval_extra
from umbrella_llava.model_sizes import ModelSize, umbrella_config
from umbrella_llava.preview import save_preview
from umbrella_llava.report import evaluation_provenance, write_evaluation
from umbrella_llava.tokenization import build_chatml_tokenizer

logger = logging.getLogger("demo")

TISSUES = ("T1", "grey matter", "white matter")
QUESTIONS = {
    "tissue": ("T1", "Which map is this: T1, grey matter or white matter?"),
    "side": ("T1", "Is the brain shifted to the left or to the right?"),
    "compare": ("T3", "Do the first and the second scan show the same kind of map?"),
}
CHANCE = {"tissue": 1 / 3, "side": 1 / 2, "compare": 1 / 2}
SHIFT_MM = 20.0  # how far a brain is moved left or right, before a random jitter of a few mm


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--max_steps", type=int, default=300, help="training steps (batches of --batch_size)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--train_records", type=int, default=2000)
    parser.add_argument("--eval_records", type=int, default=120)
    parser.add_argument("--volumes_per_tissue", type=int, default=40, help="augmented training volumes per map")
    parser.add_argument("--volume_size", type=int, default=32, help="edge of the preprocessed cube, in voxels")
    parser.add_argument("--patch_size", type=int, default=16, help="edge of a 3-D patch, in voxels")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# 1. Data: augmented real brains and UMBRELLA records
# ---------------------------------------------------------------------------------------------------------------------


def require_nilearn() -> None:
    """Stop with the install command if nilearn, where the demo's brains come from, is missing (an optional extra)."""
    try:
        import nilearn  # noqa: F401
    except ImportError:
        sys.exit(
            "The demo reads its brains (the MNI152 templates) from nilearn, which is not installed: "
            "pip install 'umbrella_llava[demo]' (or pip install nilearn)."
        )


def load_templates() -> dict[str, nib.Nifti1Image]:
    """The MNI152 T1, grey- and white-matter templates (2 mm) that ship inside nilearn."""
    from nilearn import datasets

    return {
        "T1": datasets.load_mni152_template(resolution=2),
        "grey matter": datasets.load_mni152_gm_template(resolution=2),
        "white matter": datasets.load_mni152_wm_template(resolution=2),
    }


def augment(template: nib.Nifti1Image, side: str, rng: np.random.Generator) -> nib.Nifti1Image:
    """Shift the brain `side`-wards (x axis, RAS+), then change contrast and add noise; keeps the affine."""
    data = np.asarray(template.dataobj, dtype=np.float32)
    x_axis = int(np.argmax(np.abs(template.affine[0, :3])))  # the voxel axis that runs left-right
    voxel_mm = float(np.abs(template.affine[0, x_axis]))
    towards_right = np.sign(template.affine[0, x_axis])  # +1 when increasing the index moves right
    shift_mm = (SHIFT_MM + rng.uniform(-4, 4)) * (1 if side == "right" else -1)
    data = np.roll(data, int(round(shift_mm / voxel_mm * towards_right)), axis=x_axis)
    peak = float(np.percentile(data, 99.5)) or 1.0
    data = (np.clip(data / peak, 0, None) ** rng.uniform(0.7, 1.4)) * rng.uniform(0.5, 2.0) * peak
    data += rng.normal(0, 0.04 * peak, size=data.shape).astype(np.float32)
    return nib.Nifti1Image(data.astype(np.float32), template.affine)


def write_volumes(templates, split: str, count: int, folder: Path, rng) -> list[dict]:
    """Write `count` augmented volumes per map as .nii.gz; returns their descriptions."""
    folder.mkdir(parents=True, exist_ok=True)
    volumes = []
    for tissue, template in templates.items():
        for i in range(count):
            side = ("left", "right")[i % 2]
            path = folder / f"{split}-{tissue.replace(' ', '_')}-{i:03d}.nii.gz"
            augment(template, side, rng).to_filename(path)
            volumes.append({"path": path.name, "tissue": tissue, "side": side})
    return volumes


def make_record(task_id: str, question: str, volumes: list[dict]) -> dict:
    """One UMBRELLA record: the volumes, the question, and the answer that only the volumes give."""
    if question == "tissue":
        answer = volumes[0]["tissue"]
    elif question == "side":
        answer = volumes[0]["side"]
    else:
        answer = "yes" if volumes[0]["tissue"] == volumes[1]["tissue"] else "no"
    task_type, text = QUESTIONS[question]
    user = [{"type": "image", "modality": "MRI", "image_path": v["path"]} for v in volumes]
    return {
        "task_id": task_id,
        "task_type": task_type,
        "images": [{"path": v["path"], "token": "<image>", "modality": "MRI"} for v in volumes],
        "conversations": [
            {"role": "user", "content": [*user, {"type": "text", "text": text}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "metadata": {"question": question},
    }


def write_records(path: Path, split: str, count: int, volumes: list[dict], rng: random.Random) -> None:
    """Balanced records: each question type a third, each answer equally likely within it."""
    by_tissue = {t: [v for v in volumes if v["tissue"] == t] for t in TISSUES}
    with path.open("w") as f:
        for i in range(count):
            question = list(QUESTIONS)[i % 3]
            if question == "compare":
                first = rng.choice(TISSUES)
                second = first if rng.random() < 0.5 else rng.choice([t for t in TISSUES if t != first])
                chosen = [rng.choice(by_tissue[first]), rng.choice(by_tissue[second])]
            else:
                chosen = [rng.choice(by_tissue[rng.choice(TISSUES)])]
            f.write(json.dumps(make_record(f"{split}-{i:05d}", question, chosen)) + "\n")


def build_dataset(folder: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    rng, pick = np.random.default_rng(args.seed), random.Random(args.seed)
    templates = load_templates()
    train_volumes = write_volumes(templates, "train", args.volumes_per_tissue, folder, rng)
    eval_volumes = write_volumes(templates, "eval", max(2, args.volumes_per_tissue // 3), folder, rng)
    train_path, eval_path = folder / "train.jsonl", folder / "eval.jsonl"
    write_records(train_path, "train", args.train_records, train_volumes, pick)
    write_records(eval_path, "eval", args.eval_records, eval_volumes, pick)
    return train_path, eval_path


# ---------------------------------------------------------------------------------------------------------------------
# 2. Model and training
# ---------------------------------------------------------------------------------------------------------------------


def build_processor(args: argparse.Namespace, image_seq_length: int) -> UmbrellaLlavaProcessor:
    corpus = [text for _, text in QUESTIONS.values()] + [", ".join(TISSUES), "left right yes no"]
    tokenizer = build_chatml_tokenizer(corpus * 4, vocab_size=320)
    return UmbrellaLlavaProcessor(
        image_processor=UmbrellaVolumeProcessor(volume_size=args.volume_size),
        tokenizer=tokenizer,
        image_seq_length=image_seq_length,
    )


def build_config(args: argparse.Namespace, tokenizer) -> UmbrellaLlavaConfig:
    """A small SigLIP tower + Qwen2 LM, the llava-interleave architecture at toy width (`model_sizes.umbrella_config`:
    the same config builder as the tests and the benchmarks)."""
    size = ModelSize(
        "demo", 96, 192, 2, 4, 128, 256, 2, 4, 2, len(tokenizer), args.volume_size, args.patch_size,
        tie_word_embeddings=True,
    )  # fmt: skip
    return umbrella_config(size, tokenizer, max_position_embeddings=1024)


def train(args, model, processor, train_dataset, output_dir: Path) -> Trainer:
    training_args = TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=min(20, args.max_steps // 10),
        lr_scheduler_type="linear",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=max(1, args.max_steps // 30),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=UmbrellaCollator(processor),
        processing_class=processor,
    )
    trainer.train()
    return trainer


# ---------------------------------------------------------------------------------------------------------------------
# 3-5. Evaluation, saving, reloading, pictures
# ---------------------------------------------------------------------------------------------------------------------


def evaluate_by_question(model, processor, eval_dataset, folder: Path, seed: int) -> tuple[dict, dict]:
    """Greedy answers to the held-out questions, scored per question type (not per `task_type`: "tissue" and "side"
    are both T1) by the package's evaluation (`metrics.compute_metrics`, with bootstrap intervals); writes
    `folder/` as `umbrella-evaluate` does (predictions.jsonl, metrics.json, report.md, a confusion matrix per type).

    Returns:
        `(accuracy, evaluation)`: `{question: {"accuracy", "ci95", "balanced_accuracy", "chance", "correct",
        "total"}}`, and the whole of `metrics.json`.
    """
    report = evaluate_generation(model, processor, eval_dataset, batch_size=16)
    records = eval_dataset.records
    predictions = [
        {
            **{key: value for key, value in row.items() if key != "index"},
            "task": records[row["index"]].metadata["question"],
        }
        for row in report["results"]
    ]
    evaluation = evaluation_provenance("the demo's model", eval_dataset.path, {"do_sample": False}, 1000, seed)
    evaluation |= compute_metrics(predictions, n_resamples=1000, seed=seed)
    write_evaluation(folder, predictions, evaluation)
    accuracy = {}
    for question in QUESTIONS:
        scores = evaluation["tasks"].get(question)
        accuracy[question] = {
            "accuracy": scores["accuracy"]["value"] if scores else None,
            "ci95": scores["accuracy"]["ci95"] if scores else None,
            "balanced_accuracy": scores["balanced_accuracy"]["value"] if scores else None,
            "chance": CHANCE[question],
            "correct": sum(row["correct"] for row in predictions if row["task"] == question),
            "total": scores["n"] if scores else 0,
        }
    return accuracy, evaluation


def save_model(model, processor, folder: Path) -> None:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    render_model_card(folder).save(folder / "README.md")


def answer_in_fresh_process(model_dir: Path, volume_path: Path, question: str) -> str:
    """Load `model_dir` with trust_remote_code in a new Python process and answer `question` about one volume."""
    code = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
        messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": {question!r}}}]}}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[prompt], images=[[{str(volume_path)!r}]], return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        answer = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        print("ANSWER:" + answer)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=model_dir.parent, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"Reloading {model_dir} in a fresh process failed:\n{result.stderr}")
    answers = [line for line in result.stdout.splitlines() if line.startswith("ANSWER:")]
    if not answers:
        raise RuntimeError(f"Reloading {model_dir} in a fresh process printed no answer:\n{result.stdout}")
    return answers[-1].removeprefix("ANSWER:")


def plot_loss_curve(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(*zip(*points), marker="o", markersize=3)
    axis.set(xlabel="step", ylabel="training loss (assistant tokens)", yscale="log", title="UmbrellaLlava demo")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    require_nilearn()
    try:
        require_eval_extra()  # the held-out evaluation's metrics
    except ImportError as error:
        sys.exit(str(error))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    set_seed(args.seed)
    started = time.time()
    output_dir = args.output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)

    logger.info("1/5 Writing augmented MNI152 volumes and UMBRELLA records to %s", output_dir / "data")
    train_path, eval_path = build_dataset(output_dir / "data", args)
    grid = args.volume_size // args.patch_size
    processor = build_processor(args, image_seq_length=grid**3)
    tokenizer = processor.tokenizer
    config = build_config(args, tokenizer)
    cache = output_dir / "volume_cache"
    train_dataset = ConversationDataset(train_path, processor, cache_dir=cache)
    eval_dataset = ConversationDataset(eval_path, processor, cache_dir=cache)

    logger.info("2/5 Training from scratch: %d steps of %d records", args.max_steps, args.batch_size)
    model = UmbrellaLlavaForConditionalGeneration(config)
    trainer = train(args, model, processor, train_dataset, output_dir)

    logger.info("3/5 Held-out accuracy per question type")
    accuracy, evaluation = evaluate_by_question(
        trainer.model, processor, eval_dataset, output_dir / "evaluation", args.seed
    )
    for question, row in accuracy.items():
        low, high = row["ci95"] or (float("nan"), float("nan"))
        logger.info(
            "   %-8s accuracy %.2f [95 %% interval %.2f, %.2f] (chance %.2f, %d records)",
            question, row["accuracy"], low, high, row["chance"], row["total"],
        )  # fmt: skip

    logger.info("4/5 Saving %s and reloading it in a fresh process with trust_remote_code", output_dir / "model")
    save_model(trainer.model, processor, output_dir / "model")
    volume = eval_dataset.records[0].volume_paths[0]
    question = QUESTIONS["tissue"][1]
    answer = answer_in_fresh_process(output_dir / "model", volume, question)
    logger.info("   Q: %s  A: %s", question, answer)

    logger.info("5/5 Loss curve and preview")
    plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png")
    save_preview(
        volume, output_dir / "preview.png", image_processor=processor.image_processor, title=Path(volume).name
    )

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics = {
        "accuracy": accuracy,
        "evaluation": evaluation,
        "train": {
            "steps": args.max_steps,
            "batch_size": args.batch_size,
            "first_loss": losses[0],
            "last_loss": losses[-1],
        },
        "reload": {"volume": str(volume), "question": question, "answer": answer},
        "seconds": round(time.time() - started, 1),
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    logger.info("Done in %.0f s: %s", metrics["seconds"], output_dir / "metrics.json")
    return metrics


if __name__ == "__main__":
    main()
