"""Splitting subjects for `umbrella-build-records`: `--split` parsed, and subjects assigned to splits with
scikit-learn's `train_test_split`, stratified where the strata allow, reproducible from the seed."""

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from .bids_layout import RecordBuildError


def parse_split(text: str) -> dict[str, float]:
    """`"train=0.8,eval=0.1,test=0.1"` → `{"train": 0.8, "eval": 0.1, "test": 0.1}` (fractions of the subjects).

    Raises:
        ValueError: for a malformed entry, a repeated or unusable name, a fraction outside (0, 1], or fractions
            that do not add up to 1.
    """
    fractions: dict[str, float] = {}
    for entry in text.split(","):
        name, equals, value = entry.strip().partition("=")
        name = name.strip()
        if not equals or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name == "summary":
            raise ValueError(f"--split {text!r}: {entry!r} must be NAME=FRACTION with a file-name-safe NAME.")
        if name in fractions:
            raise ValueError(f"--split {text!r}: split {name!r} is given twice.")
        try:
            fraction = float(value)
        except ValueError:
            raise ValueError(f"--split {text!r}: {value!r} is not a number.") from None
        if not 0 < fraction <= 1:
            raise ValueError(f"--split {text!r}: the fraction of {name!r} must be in (0, 1], got {fraction}.")
        fractions[name] = fraction
    if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise ValueError(f"--split {text!r}: the fractions add up to {sum(fractions.values()):g}, not 1.")
    return fractions


def split_sizes(num_subjects: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Subjects per split: the fractions of `num_subjects` rounded by largest remainder, at least one each.

    Raises:
        RecordBuildError: if there are fewer subjects than splits.
    """
    if num_subjects < len(fractions):
        raise RecordBuildError(
            f"{num_subjects} subjects with records cannot fill {len(fractions)} splits ({', '.join(fractions)}); "
            "give fewer splits with --split."
        )
    exact = {name: fraction * num_subjects for name, fraction in fractions.items()}
    sizes = {name: math.floor(value) for name, value in exact.items()}
    by_remainder = sorted(fractions, key=lambda name: (-(exact[name] - sizes[name]), list(fractions).index(name)))
    for name in by_remainder[: num_subjects - sum(sizes.values())]:
        sizes[name] += 1
    for name in fractions:  # a tiny split takes one subject from the largest
        if sizes[name] == 0:
            sizes[max(sizes, key=sizes.get)] -= 1
            sizes[name] = 1
    return sizes


def _strata(labels: Sequence[str]) -> list[str] | None:
    """Labels fit for `stratify=`: a stratum of one subject joins the largest; `None` if one stratum remains."""
    counts = Counter(labels)
    largest = max(counts, key=lambda label: (counts[label], label))
    merged = [label if counts[label] > 1 else largest for label in labels]
    return merged if len(set(merged)) > 1 else None


def split_subjects(
    subjects: Sequence[str], labels: Sequence[str] | None, fractions: Mapping[str, float], seed: int
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Assign each subject to one split, stratified by `labels` where possible, reproducibly from `seed`.

    The splits are drawn one after the other with scikit-learn's `train_test_split` (the first split's subjects
    from all, the second's from the rest, ...; the last takes what remains).

    Returns:
        `{subject: split}` and, per drawn split, `{"split", "stratified", "reason"?}`.
    """
    from sklearn.model_selection import train_test_split

    sizes = split_sizes(len(subjects), fractions)
    remaining = list(subjects)
    remaining_labels = list(labels) if labels is not None else None
    assignment: dict[str, str] = {}
    steps: list[dict[str, Any]] = []
    names = list(fractions)
    for name in names[:-1]:
        step: dict[str, Any] = {"split": name, "stratified": False}
        strata = _strata(remaining_labels) if remaining_labels is not None else None
        indices = list(range(len(remaining)))
        if sizes[name] == len(remaining):
            chosen = indices
        else:
            chosen = None
            if strata is not None:
                try:
                    chosen, _ = train_test_split(indices, train_size=sizes[name], random_state=seed, stratify=strata)
                    step["stratified"] = True
                except ValueError as error:
                    step["reason"] = str(error)
            elif remaining_labels is not None:
                step["reason"] = "one stratum left"
            if chosen is None:
                chosen, _ = train_test_split(indices, train_size=sizes[name], random_state=seed)
        chosen_set = set(chosen)
        for index in sorted(chosen_set):
            assignment[remaining[index]] = name
        remaining_labels = (
            [label for index, label in enumerate(remaining_labels) if index not in chosen_set]
            if remaining_labels is not None
            else None
        )
        remaining = [subject for index, subject in enumerate(remaining) if index not in chosen_set]
        steps.append(step)
    for subject in remaining:
        assignment[subject] = names[-1]
    return assignment, steps


__all__ = ["parse_split", "split_sizes", "split_subjects"]
