"""Metrics ─▶ what is published: `predictions.jsonl`, `metrics.json` (with where the numbers come from) and
`report.md`, with a confusion matrix per categorical task and a predicted-against-true scatter plot per numeric task
beside it as PNGs.

[`metrics_table`] is also what the model card shows (`hub.render_model_card`), from a checkpoint's `metrics.json`.
"""

import hashlib
import json
import re
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import OTHER_ANSWER

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
NORMALIZATION = (
    "answers compared after normalize_answer: Unicode NFKC, lower case, punctuation turned into spaces, whitespace "
    "collapsed; a numeric answer is read as the first number in it"
)


# ---------------------------------------------------------------------------------------------------------------------
# Where the numbers come from
# ---------------------------------------------------------------------------------------------------------------------


def data_sha256(path: str | Path) -> str:
    """SHA-256 of a data file's bytes; of a folder, of its `.json` / `.jsonl` files' relative paths and bytes in
    sorted order."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        digest.update(path.read_bytes())
        return digest.hexdigest()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")):
        digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def package_version() -> str:
    """The installed umbrella_llava version, or `"unknown"` for a clone that is not installed."""
    try:
        return metadata.version("umbrella_llava")
    except metadata.PackageNotFoundError:
        return "unknown"


def evaluation_provenance(
    model: str | Path,
    data: str | Path,
    generation: dict[str, Any],
    n_resamples: int,
    seed: int,
    skipped: Sequence[tuple[str, str, str]] = (),
) -> dict[str, Any]:
    """The head of `metrics.json`: the model's name, the data file and its SHA-256, the package version, the
    generation settings, the bootstrap, how answers are compared, and the records skipped (`(where, reason, message)`
    as `ConversationDataset.skipped` lists them)."""
    by_reason: dict[str, int] = {}
    for _, reason, _ in skipped:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    return {
        "model": str(model),
        "data": {"path": str(data), "sha256": data_sha256(data)},
        "package_version": package_version(),
        "generation": generation,
        "bootstrap": {"method": "percentile", "confidence_level": 0.95, "resamples": n_resamples, "seed": seed},
        "normalization": NORMALIZATION,
        "skipped_records": {
            "count": len(skipped),
            "by_reason": dict(sorted(by_reason.items())),
            "records": [{"where": where, "reason": reason} for where, reason, _ in skipped],
        },
    }


# ---------------------------------------------------------------------------------------------------------------------
# Tables and sentences
# ---------------------------------------------------------------------------------------------------------------------


def _score(score: dict[str, Any] | None, spec: str = ".2f") -> str:
    """`value [low, high]` in format `spec`; `–` for an undefined score."""
    if not score or score["value"] is None:
        return "–"
    text = format(score["value"], spec)
    if score["ci95"] is not None:
        low, high = score["ci95"]
        text += f" [{format(low, spec)}, {format(high, spec)}]"
    return text


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *map(_row, rows)]


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown tables of [`metrics.compute_metrics`]'s result: one per kind of task and one overall, each score as
    `value [95 % interval]`, then [`metrics_notes`] as a list."""
    tasks = metrics["tasks"]
    of_kind = {
        kind: {t: m for t, m in tasks.items() if m["kind"] == kind} for kind in ("categorical", "numeric", "free_text")
    }
    lines: list[str] = []
    if of_kind["categorical"]:
        rows = []
        for task, m in of_kind["categorical"].items():
            baseline = m["majority_baseline"]
            majority = f"{baseline['accuracy']:.2f} ('{baseline['answer']}')" if baseline else "–"
            name = task + (" ¹" if m["mixed_references"] else "")
            scores = [_score(m["accuracy"]), _score(m["balanced_accuracy"]), _score(m["macro_f1"])]
            rows.append([name, m["n"], *scores, majority, m["empty"], m["truncated"]])
        header = ["categorical task", "n", "accuracy", "balanced accuracy", "macro F1", "majority answer: accuracy"]
        lines += [*_table([*header, "empty", "cut off"], rows), ""]
    if of_kind["numeric"]:
        rows = []
        for task, m in of_kind["numeric"].items():
            scores = [_score(m["mae"], ".3g"), _score(m["rmse"], ".3g"), _score(m["pearson_r"])]
            rows.append([task, m["n"], *scores, m["unparsed"], m["empty"], m["truncated"]])
        header = ["numeric task", "n", "MAE", "RMSE", "Pearson r", "no number", "empty", "cut off"]
        lines += [*_table(header, rows), ""]
    if of_kind["free_text"]:
        rows = [
            [task, m["n"], _score(m["exact_match"]), _score(m["rouge_l_f1"]), m["empty"], m["truncated"]]
            for task, m in of_kind["free_text"].items()
        ]
        lines += [*_table(["free-text task", "n", "exact match", "ROUGE-L F1", "empty", "cut off"], rows), ""]
    overall = metrics["overall"]
    lines += _table(
        ["overall", "n", "exact match", "empty", "cut off"],
        [["all questions", overall["n"], _score(overall["exact_match"]), overall["empty"], overall["truncated"]]],
    )
    notes = metrics_notes(metrics)
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"


def metrics_notes(metrics: dict[str, Any]) -> list[str]:
    """Sentences a reader needs next to the numbers: a task scored as categorical because its references mix numbers
    and words, answers that are empty or cut off at `max_new_tokens` (all of them: the scores say nothing about the
    task), numeric answers without a number, records skipped."""
    notes = []
    max_new_tokens = (metrics.get("generation") or {}).get("max_new_tokens")
    limit = f"max_new_tokens={max_new_tokens}" if max_new_tokens else "max_new_tokens"
    for task, m in metrics["tasks"].items():
        n, empty, cut_off = m["n"], m["empty"], m["truncated"]
        if m["mixed_references"]:
            notes.append(
                f"¹ {task}: its reference answers mix numbers and words, so it is scored as categorical (each distinct "
                "answer a class), not as numeric."
            )
        says_nothing = "so its scores measure that, not the task"
        if n and empty == n and cut_off == n:
            notes.append(
                f"{task}: all {n} answers are empty (nothing but whitespace or punctuation) and were cut off at {limit}: "
                f"the model produced no text and never stopped, {says_nothing}."
            )
        elif n and empty == n:
            notes.append(f"{task}: all {n} answers are empty: the model produced no text, {says_nothing}.")
        elif n and cut_off == n:
            notes.append(
                f"{task}: all {n} answers were cut off at {limit} without ending: the model never stopped, "
                f"{says_nothing} (raise --max_new_tokens, or check that the model ends its turns)."
            )
        else:
            if empty:
                notes.append(f"{task}: {empty} of {n} answers are empty.")
            if cut_off:
                notes.append(f"{task}: {cut_off} of {n} answers were cut off at {limit}.")
        if m["kind"] == "numeric" and m["unparsed"]:
            if m["parsed"]:
                notes.append(
                    f"{task}: {m['unparsed']} of {n} answers hold no number; MAE, RMSE and r are over the other "
                    f"{m['parsed']}."
                )
            else:
                notes.append(f"{task}: no answer holds a number, so MAE, RMSE and r are undefined.")
    skipped = metrics.get("skipped_records")
    if skipped and skipped["count"]:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in skipped["by_reason"].items())
        if skipped["count"] == 1:
            notes.append(f"1 record was skipped ({reasons}); it is in no score.")
        else:
            notes.append(f"{skipped['count']} records were skipped ({reasons}); they are in no score.")
    return notes


# ---------------------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------------------


def figure_name(kind: str, task: str) -> str:
    """`confusion_<task>.png` or `scatter_<task>.png`, with characters a file name should not hold replaced."""
    return f"{kind}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', task)}.png"


def plot_confusion_matrix(task: str, task_metrics: dict[str, Any], path: str | Path) -> None:
    """The confusion matrix of a categorical task (rows: reference answers, columns: predicted answers), counts in the
    cells, with scikit-learn's `ConfusionMatrixDisplay`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    labels = task_metrics["confusion_matrix"]["labels"]
    matrix = np.array(task_metrics["confusion_matrix"]["matrix"])
    side = min(3.5 + 0.45 * len(labels), 14)
    figure, axis = plt.subplots(figsize=(side + 1, side))
    shown = [label if len(label) <= 24 else label[:22] + "…" for label in labels]
    ConfusionMatrixDisplay(matrix, display_labels=shown).plot(
        ax=axis, cmap="Blues", colorbar=False, xticks_rotation=45 if len(labels) > 3 else "horizontal"
    )
    if OTHER_ANSWER in labels:
        axis.get_yticklabels()[-1].set_color("grey")
    accuracy = task_metrics["accuracy"]["value"]
    axis.set(xlabel="predicted answer", ylabel="reference answer")
    axis.set_title(f"{task}: accuracy {accuracy:.2f}, n = {task_metrics['n']}", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_scatter(task: str, task_metrics: dict[str, Any], path: str | Path) -> None:
    """Predicted against reference numbers of a numeric task, with the identity line; answers without a number are
    counted in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = np.array([pair for pair in task_metrics["pairs"] if pair[1] is not None], dtype=float).reshape(-1, 2)
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.scatter(pairs[:, 0], pairs[:, 1], s=18, alpha=0.7)
    if len(pairs):
        low, high = float(pairs.min()), float(pairs.max())
        margin = 0.05 * (high - low or 1.0)
        axis.plot(
            [low - margin, high + margin], [low - margin, high + margin], "--", color="grey", lw=1, label="y = x"
        )
        axis.set(xlim=(low - margin, high + margin), ylim=(low - margin, high + margin))
        axis.legend(loc="upper left")
    axis.set_aspect("equal")
    mae, r = task_metrics["mae"]["value"], task_metrics["pearson_r"]["value"]
    title = f"{task}: MAE {mae:.3g}" if mae is not None else f"{task}"
    title += f", r {r:.2f}" if r is not None else ""
    title += f"\n{task_metrics['parsed']} of {task_metrics['n']} answers hold a number"
    axis.set(xlabel="reference", ylabel="prediction (first number of the answer)")
    axis.set_title(title, fontsize=11)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------------------------
# The files
# ---------------------------------------------------------------------------------------------------------------------


def write_report(output_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write `report.md` and its PNGs into `output_dir` from `metrics.json`'s content; returns the report's path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# Evaluation of {metrics.get('model', 'the model')}", ""]
    if "data" in metrics:
        lines.append(
            f"Data: `{metrics['data']['path']}` (SHA-256 `{metrics['data']['sha256'][:16]}…`), "
            f"{metrics['overall']['n']} questions (one per assistant turn). Generation: "
            f"`{json.dumps(metrics['generation'])}`. {metrics['normalization'][:1].upper()}{metrics['normalization'][1:]}. Intervals: 95 % "
            f"percentile bootstrap over questions ({metrics['bootstrap']['resamples']} resamples, seed "
            f"{metrics['bootstrap']['seed']}). umbrella_llava {metrics['package_version']}."
        )
        lines.append("")
    lines += [metrics_table(metrics)]
    for task, m in metrics["tasks"].items():
        if m["kind"] == "categorical" and m["n"]:
            name = figure_name("confusion", task)
            plot_confusion_matrix(task, m, output_dir / name)
            counts = ", ".join(f"'{answer}' {count}" for answer, count in m["reference_counts"].items())
            lines += [
                f"## {task}",
                "",
                f"Reference answers: {counts}.",
                "",
                f"![{task}: confusion matrix]({name})",
                "",
            ]
        elif m["kind"] == "numeric" and m["parsed"]:
            name = figure_name("scatter", task)
            plot_scatter(task, m, output_dir / name)
            lines += [f"## {task}", "", f"![{task}: predicted against reference]({name})", ""]
    path = output_dir / REPORT_FILE
    path.write_text("\n".join(lines))
    return path


def write_evaluation(output_dir: str | Path, predictions: list[dict[str, Any]], metrics: dict[str, Any]) -> Path:
    """Write `predictions.jsonl` (one line per question), `metrics.json` and `report.md` with its PNGs into
    `output_dir`; returns the folder."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / PREDICTIONS_FILE).open("w", encoding="utf-8") as file:
        for prediction in predictions:
            file.write(json.dumps(prediction, ensure_ascii=False) + "\n")
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    write_report(output_dir, metrics)
    return output_dir


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a `predictions.jsonl`."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


__all__ = [
    "METRICS_FILE",
    "PREDICTIONS_FILE",
    "REPORT_FILE",
    "data_sha256",
    "evaluation_provenance",
    "figure_name",
    "metrics_notes",
    "metrics_table",
    "package_version",
    "plot_confusion_matrix",
    "plot_scatter",
    "read_predictions",
    "write_evaluation",
    "write_report",
]
