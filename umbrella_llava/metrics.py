"""Predictions ─▶ metrics: per task, the scores scikit-learn and scipy define, each with a percentile bootstrap
interval over the questions.

A task is one of three kinds, read off its reference answers ([`task_kind`]):

- **numeric**: every reference is a number (`"42"`, `"-1.5"`, `"3e2."`), or every one is a number followed by the
  same unit (`"42 years"`, `"31 years"`: what `umbrella-build-records` writes with `answer: "{age:.0f} years"`;
  "T1" and "T2" are not numbers, they do not start with one). Scored on the first number of each
  prediction ([`parse_number`]): `mean_absolute_error`, `root_mean_squared_error` (scikit-learn) and
  `scipy.stats.pearsonr`; predictions without a number are left out of them and counted (`unparsed`).
- **categorical**: the references take at most `MAX_CLASSES` distinct answers of at most `MAX_CLASS_WORDS` words each,
  after [`normalize_answer`] (or they mix numbers and words: then categorical, with `mixed_references: true`).
  Scored with `accuracy_score`, `balanced_accuracy_score` and `f1_score(average="macro")` over the answers that occur
  among the references; also the answer counts, the majority-answer baseline and the confusion matrix.
- **free text**: anything else. Exact match after `normalize_answer` (`accuracy_score`) and ROUGE-L F1
  (`rouge-score`, Google's implementation of ROUGE-1.5.5, with its Porter stemmer), the mean over questions.

Every score is `{"value": v, "ci95": [lo, hi]}`: `scipy.stats.bootstrap(method="percentile")` over the questions,
`n_resamples` of them, from a generator seeded with `(seed, crc32(task))`, so each task's interval is reproducible
from the seed whatever the other tasks. A score that is undefined (no question, a constant series for Pearson's r)
is `None`, and so is an interval with fewer than two questions or without resampling.

scikit-learn, scipy and rouge-score are the `eval` extra (`pip install umbrella_llava[eval]`), imported when first
needed.
"""

import math
import re
import string
import unicodedata
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

UNTYPED = "untyped"  # the task of a question whose record has no task_type
MAX_CLASSES = 20  # more distinct reference answers than this: free text
MAX_CLASS_WORDS = 4  # a reference answer longer than this (in words, normalised): free text
CONFIDENCE_LEVEL = 0.95
OTHER_ANSWER = "(other answer)"  # a confusion-matrix column: predictions that are none of the reference answers
KINDS = ("categorical", "numeric", "free_text")
INSTALL_HINT = "pip install umbrella_llava[eval]"

# A decimal number, optionally signed, with an optional exponent: "42", "-1.5", ".5", "3e2".
NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
TRAILING_PUNCTUATION = ".,;:!?"


def require_eval_extra() -> None:
    """Import scikit-learn, scipy and rouge-score, or stop with the install command.

    Raises:
        ImportError: naming the missing package and `pip install umbrella_llava[eval]`.
    """
    for module, package in (("sklearn", "scikit-learn"), ("scipy", "scipy"), ("rouge_score", "rouge-score")):
        try:
            __import__(module)
        except ImportError as error:
            raise ImportError(
                f"The evaluation metrics need {package}, which is not installed: {INSTALL_HINT} "
                "(scikit-learn, scipy and rouge-score)."
            ) from error


# ---------------------------------------------------------------------------------------------------------------------
# Reading answers
# ---------------------------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """The form answers are compared in: Unicode NFKC, lower case, punctuation turned into spaces, runs of whitespace
    collapsed, stripped. `"Yes."` and `" yes"` match; `"T1-weighted"` becomes `"t1 weighted"`."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if ch in string.punctuation or unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def parse_number(text: str) -> float | None:
    """The first number in `text` (after Unicode NFKC), or `None`: `"about 42.5 years"` gives 42.5, `"-3"` gives -3.

    A comma is never a decimal mark: `"1,5"` gives 1.
    """
    match = NUMBER.search(unicodedata.normalize("NFKC", text))
    return float(match[0]) if match else None


def is_number(text: str) -> bool:
    """Whether `text` is one number and nothing else, ignoring surrounding whitespace and trailing punctuation."""
    stripped = unicodedata.normalize("NFKC", text).strip().rstrip(TRAILING_PUNCTUATION).strip()
    return NUMBER.fullmatch(stripped) is not None


NUMBER_WITH_UNIT = re.compile(rf"({NUMBER.pattern})\s*([^\d]*)")


def number_unit(text: str) -> str | None:
    """The unit after a reference that is one number and a unit (`"42 years"` gives `"years"`, `"42"` gives `""`),
    normalised as answers are; `None` when `text` does not start with a number or holds a second one."""
    stripped = unicodedata.normalize("NFKC", text).strip().rstrip(TRAILING_PUNCTUATION).strip()
    match = NUMBER_WITH_UNIT.fullmatch(stripped)
    return None if match is None else normalize_answer(match[2])


def task_kind(references: Sequence[str]) -> tuple[str, bool]:
    """`(kind, mixed)`: which of `KINDS` a task with these reference answers is (see the module docstring), and whether
    its references mix numbers and words (such a task is categorical).

    An empty task is categorical.
    """
    units = [number_unit(reference) for reference in references]
    if units and None not in units and len(set(units)) == 1:
        return "numeric", False
    if any(unit is not None for unit in units):
        return "categorical", True
    classes = {normalize_answer(reference) for reference in references}
    if len(classes) <= MAX_CLASSES and all(len(answer.split()) <= MAX_CLASS_WORDS for answer in classes):
        return "categorical", False
    return "free_text", False


# ---------------------------------------------------------------------------------------------------------------------
# The bootstrap
# ---------------------------------------------------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def bootstrap_scores(
    statistic: Callable[[np.ndarray], Sequence[float]],
    n: int,
    names: Sequence[str],
    n_resamples: int = 1000,
    rng: np.random.Generator | None = None,
) -> dict[str, dict[str, Any]]:
    """Scores with percentile bootstrap intervals over `n` questions.

    Args:
        statistic: maps question indices `(k,)` (a resample, with repeats) to one value per name.
        n: the number of questions; `statistic(np.arange(n))` is the value reported.
        names: the scores' names, in the order `statistic` returns them.
        n_resamples: resamples of the `n` questions (with replacement); 0 gives no interval.
        rng: the generator the resamples are drawn from.

    Returns:
        `{name: {"value": v, "ci95": [lo, hi]}}`; `None` for an undefined value or interval (no question, fewer than
        two for an interval, a non-finite bound).
    """
    if n == 0:
        return {name: {"value": None, "ci95": None} for name in names}
    values = [_finite(v) for v in statistic(np.arange(n))]
    intervals: list[list[float | None] | None] = [None] * len(names)
    if n >= 2 and n_resamples > 0:
        from scipy.stats import bootstrap

        with warnings.catch_warnings():
            # A resample of one class (balanced accuracy, F1) or of constant values (Pearson's r) warns.
            warnings.simplefilter("ignore")
            result = bootstrap(
                (np.arange(n),),
                lambda indices: np.asarray(statistic(indices.astype(int)), dtype=float),
                n_resamples=n_resamples,
                vectorized=False,
                confidence_level=CONFIDENCE_LEVEL,
                method="percentile",
                rng=rng,
            )
        low, high = np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)
        intervals = [
            None if value is None or _finite(lo) is None or _finite(hi) is None else [float(lo), float(hi)]
            for value, lo, hi in zip(values, low, high)
        ]
    return {name: {"value": value, "ci95": interval} for name, value, interval in zip(names, values, intervals)}


def task_rng(seed: int, task: str) -> np.random.Generator:
    """The bootstrap generator of `task`: seeded with `(seed, crc32(task))`, so independent of the other tasks."""
    return np.random.default_rng([seed, zlib.crc32(task.encode("utf-8"))])


# ---------------------------------------------------------------------------------------------------------------------
# One task of each kind
# ---------------------------------------------------------------------------------------------------------------------


def categorical_metrics(
    references: Sequence[str],
    predictions: Sequence[str],
    n_resamples: int = 1000,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy and macro F1 of `predictions` against `references`, compared after
    [`normalize_answer`], with bootstrap intervals; the answer counts, the majority baseline and the confusion matrix.

    Macro F1 averages over the answers that occur among the references (`labels=` those), so an answer the model
    invents counts against the class it replaced and adds no class of its own; a class never predicted has F1 0
    (`zero_division=0`). With one reference class, balanced accuracy and macro F1 are that class's recall and F1.
    With no question, every score is `None`.

    Returns:
        `{"kind": "categorical", "n", "accuracy", "balanced_accuracy", "macro_f1", "reference_counts",
        "prediction_counts", "majority_baseline": {"answer", "accuracy", "balanced_accuracy", "macro_f1"},
        "confusion_matrix": {"labels", "matrix"}}`: rows are references, columns predictions, over the reference
        answers and then `OTHER_ANSWER` if a prediction is none of them (its row is zeros; the matrix is square).
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

    truth = np.array([normalize_answer(text) for text in references], dtype=object)
    guess = np.array([normalize_answer(text) for text in predictions], dtype=object)

    def scores(y_true: np.ndarray, y_pred: np.ndarray) -> list[float]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
            return [
                accuracy_score(y_true, y_pred),
                balanced_accuracy_score(y_true, y_pred),
                f1_score(y_true, y_pred, labels=sorted(set(y_true)), average="macro", zero_division=0),
            ]

    names = ("accuracy", "balanced_accuracy", "macro_f1")
    metrics: dict[str, Any] = {"kind": "categorical", "n": len(truth)}
    metrics |= bootstrap_scores(lambda i: scores(truth[i], guess[i]), len(truth), names, n_resamples, rng)
    reference_counts = Counter(truth.tolist())
    metrics["reference_counts"] = dict(reference_counts.most_common())
    metrics["prediction_counts"] = dict(Counter(guess.tolist()).most_common())
    if len(truth):
        majority = reference_counts.most_common(1)[0][0]
        baseline = scores(truth, np.array([majority] * len(truth), dtype=object))
        metrics["majority_baseline"] = {"answer": majority, **dict(zip(names, map(float, baseline)))}
        labels = sorted(reference_counts)
        columns = labels + ([OTHER_ANSWER] if set(guess) - set(labels) else [])
        shown = np.array([answer if answer in reference_counts else OTHER_ANSWER for answer in guess], dtype=object)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a 1 × 1 matrix warns, though its labels are given
            matrix = confusion_matrix(truth, shown, labels=columns)
        metrics["confusion_matrix"] = {"labels": columns, "matrix": matrix.tolist()}
    else:
        metrics["majority_baseline"] = None
        metrics["confusion_matrix"] = {"labels": [], "matrix": []}
    return metrics


def numeric_metrics(
    references: Sequence[str],
    predictions: Sequence[str],
    n_resamples: int = 1000,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """MAE, RMSE and Pearson's r of the first number of each prediction against the reference numbers, with
    bootstrap intervals over the questions whose prediction holds a number.

    Predictions without a number are left out of the scores and counted in `unparsed`. Pearson's r is `None` with
    fewer than two such questions or a constant series (scipy's `ConstantInputWarning` case).

    Returns:
        `{"kind": "numeric", "n", "parsed", "unparsed", "mae", "rmse", "pearson_r", "pairs": [[true, predicted], ...]}`
        (`pairs` in question order, for the scatter plot; `None` for an unparsed prediction).
    """
    from scipy.stats import pearsonr
    from sklearn.metrics import mean_absolute_error, root_mean_squared_error

    truth = [parse_number(text) for text in references]
    guess = [parse_number(text) for text in predictions]
    kept = [(t, p) for t, p in zip(truth, guess) if p is not None]
    y_true = np.array([t for t, _ in kept], dtype=float)
    y_pred = np.array([p for _, p in kept], dtype=float)

    def scores(i: np.ndarray) -> list[float]:
        t, p = y_true[i], y_pred[i]
        r = math.nan
        if len(t) >= 2 and np.ptp(t) > 0 and np.ptp(p) > 0:
            r = pearsonr(t, p).statistic
        return [mean_absolute_error(t, p), root_mean_squared_error(t, p), r]

    metrics: dict[str, Any] = {
        "kind": "numeric",
        "n": len(truth),
        "parsed": len(kept),
        "unparsed": len(truth) - len(kept),
    }
    metrics |= bootstrap_scores(scores, len(kept), ("mae", "rmse", "pearson_r"), n_resamples, rng)
    metrics["pairs"] = [[t, p] for t, p in zip(truth, guess)]
    return metrics


def free_text_metrics(
    references: Sequence[str],
    predictions: Sequence[str],
    n_resamples: int = 1000,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Exact match after [`normalize_answer`] and ROUGE-L F1 (rouge-score, stemmed), each the mean over questions,
    with bootstrap intervals.

    Returns:
        `{"kind": "free_text", "n", "exact_match", "rouge_l_f1"}`.
    """
    from rouge_score.rouge_scorer import RougeScorer
    from sklearn.metrics import accuracy_score

    truth = np.array([normalize_answer(text) for text in references], dtype=object)
    guess = np.array([normalize_answer(text) for text in predictions], dtype=object)
    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    rouge = np.array([scorer.score(t, p)["rougeL"].fmeasure for t, p in zip(references, predictions)], dtype=float)

    def scores(i: np.ndarray) -> list[float]:
        return [accuracy_score(truth[i], guess[i]), float(rouge[i].mean())]

    metrics: dict[str, Any] = {"kind": "free_text", "n": len(truth)}
    return metrics | bootstrap_scores(scores, len(truth), ("exact_match", "rouge_l_f1"), n_resamples, rng)


KIND_METRICS = {"categorical": categorical_metrics, "numeric": numeric_metrics, "free_text": free_text_metrics}


# ---------------------------------------------------------------------------------------------------------------------
# Every task
# ---------------------------------------------------------------------------------------------------------------------


def compute_metrics(
    predictions: Iterable[dict[str, Any]],
    n_resamples: int = 1000,
    seed: int = 0,
    task_kinds: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Per-task and overall metrics of predictions such as `predictions.jsonl` holds.

    Args:
        predictions: dicts with `task` (`None` counts as `"untyped"`), `reference` and `prediction`, and optionally
            `truncated` (the answer was cut off at `max_new_tokens`).
        n_resamples: bootstrap resamples per task (0: no intervals).
        seed: seeds every task's bootstrap (see [`task_rng`]).
        task_kinds: a kind from `KINDS` for some tasks, instead of the one [`task_kind`] reads off the references.

    Returns:
        `{"tasks": {task: {...the kind's metrics, "mixed_references", "empty", "truncated"}}, "overall": {"n",
        "exact_match", "empty", "truncated"}}`: `empty` counts the predictions that are empty after
        `normalize_answer`, `truncated` those cut off; the overall exact match is over every question, whatever its
        task's kind.

    Raises:
        ImportError: without the `eval` extra, naming `pip install umbrella_llava[eval]`.
        ValueError: for an unknown kind in `task_kinds`.
    """
    require_eval_extra()
    predictions = list(predictions)
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for prediction in predictions:
        by_task[prediction.get("task") or UNTYPED].append(prediction)
    tasks = {}
    for task, rows in sorted(by_task.items()):
        references = [row["reference"] for row in rows]
        answers = [row["prediction"] for row in rows]
        kind, mixed = task_kind(references)
        if task_kinds and task in task_kinds:
            kind = task_kinds[task]
            if kind not in KINDS:
                raise ValueError(f"Task {task!r}: kind {kind!r} is not one of {KINDS}.")
        metrics = KIND_METRICS[kind](references, answers, n_resamples, task_rng(seed, task))
        metrics["mixed_references"] = mixed
        metrics |= _failed_answers(rows)
        tasks[task] = metrics
    overall: dict[str, Any] = {"n": len(predictions)}
    references, answers = [p["reference"] for p in predictions], [p["prediction"] for p in predictions]
    overall |= exact_match_score(references, answers, n_resamples, task_rng(seed, "overall"))
    overall |= _failed_answers(predictions)
    return {"tasks": tasks, "overall": overall}


def exact_match_score(
    references: Sequence[str],
    predictions: Sequence[str],
    n_resamples: int = 1000,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """`{"exact_match": {"value", "ci95"}}`: `accuracy_score` of the answers after [`normalize_answer`]."""
    from sklearn.metrics import accuracy_score

    truth = np.array([normalize_answer(text) for text in references], dtype=object)
    guess = np.array([normalize_answer(text) for text in predictions], dtype=object)
    return bootstrap_scores(
        lambda i: [accuracy_score(truth[i], guess[i])], len(truth), ("exact_match",), n_resamples, rng
    )


def flatten_metrics(metrics: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """The scalars of [`compute_metrics`]'s result, for `Trainer.log` (TensorBoard, W&B, `trainer_state.json`):
    `{prefix}_{task}_{score}` with `..._ci95_low` / `..._ci95_high`, and the counts `{prefix}_{task}_empty`,
    `_truncated`, `_unparsed`; the overall ones under the task name `overall`. Undefined scores are left out."""
    flat: dict[str, float] = {}
    for task, scores in [*metrics["tasks"].items(), ("overall", metrics["overall"])]:
        for name, score in scores.items():
            key = f"{prefix}_{task}_{name}"
            if isinstance(score, dict) and "ci95" in score:
                if score["value"] is not None:
                    flat[key] = score["value"]
                if score["ci95"] is not None:
                    flat[f"{key}_ci95_low"], flat[f"{key}_ci95_high"] = score["ci95"]
            elif name in ("empty", "truncated", "unparsed"):
                flat[key] = score
    return flat


def _failed_answers(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    return {
        "empty": sum(not normalize_answer(row["prediction"]) for row in rows),
        "truncated": sum(bool(row.get("truncated")) for row in rows),
    }


__all__ = [
    "KINDS",
    "MAX_CLASSES",
    "MAX_CLASS_WORDS",
    "OTHER_ANSWER",
    "UNTYPED",
    "bootstrap_scores",
    "categorical_metrics",
    "compute_metrics",
    "exact_match_score",
    "flatten_metrics",
    "free_text_metrics",
    "is_number",
    "normalize_answer",
    "numeric_metrics",
    "parse_number",
    "require_eval_extra",
    "task_kind",
    "task_rng",
]
