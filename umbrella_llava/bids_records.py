"""`umbrella-build-records`: a BIDS dataset and its phenotype tables → UMBRELLA conversation records, split by subject.

    umbrella-build-records --bids /data/ds000001 --questions questions.yaml --output_dir records \\
        [--split train=0.8,eval=0.1,test=0.1] [--seed 0] [--derivatives fmriprep ...]

The dataset is read with pybids' `BIDSLayout` only (no walking of folders, no parsing of file names): every scan of
a record is the one file a layout query finds for the question's entities, the subject and the session. The
questions, and where their answers are (`participants.tsv`, a subject's `sessions.tsv`, `phenotype/<table>.tsv`),
come from a question file; its schema is documented in `umbrella_llava/bids_questions.py` and in the README
("BIDS datasets → records").

What is written to `--output_dir`:

- `<split>.jsonl` for each split of `--split` (`train.jsonl`, `eval.jsonl`, `test.jsonl` by default): UMBRELLA
  records (`task_id`, `task_type` = the question kind's `task`, `images: [{path, token, modality}]`,
  `conversations`, `metadata` with `subject` / `session`, or `subjects` / `sessions` for a comparison, the `split`
  and the table `values` used). Volume paths are relative to the BIDS root: train with `--image_root` = the root.
- `summary.json`: the subjects of each split, the records per task and split, how the split was stratified, every
  skipped subject, session, question or pair with its reason (and counts per task and reason), and the files that
  pybids' validator rejected as BIDS names, which no query returns.

Rules:

- One record per session with scans (per subject where the subject has no sessions). A record's first user turn
  shows its scans (one image placeholder each, in the order of the kind's `images`; for a comparison, the first
  subject's then the second's) before the question.
- Splits are by subject: every record of a subject, whatever its session or task, is in the split of that subject,
  and a comparison pairs two subjects of one split. The subjects are assigned with scikit-learn's
  `train_test_split`, one split after the other, stratified by the first question with an `answers` mapping (its
  value on the subject's first session; `n/a` is a stratum of its own). A stratum of one subject joins the largest
  one, and where stratifying is still impossible (fewer subjects than strata in a split) that step is drawn without
  it; `summary.json` says which. The same `--seed` gives the same split and the same pairs.
- A missing value (`n/a` or an empty cell, or no row for the subject) skips that question for that subject or
  session, counted; a value that the `answers` mapping does not list is an error naming the column, the value, the
  subject and the table. A scan no file matches, or that several files match (add `run`, `acquisition`, ... to the
  question's `images` to choose), skips the record, counted.
- A folder that is not a BIDS dataset, a `--derivatives` folder that is not a BIDS derivatives dataset, an entity
  pybids does not know, and a column that no table has are errors naming the path, kind or column.

Needs the `bids` extra (pybids, scikit-learn, PyYAML): `pip install 'umbrella_llava[bids]'`.
"""

import argparse
import json
import random
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bids_layout import (
    PhenotypeTables,
    RecordBuildError,
    Scan,
    check_queries,
    find_scans,
    open_layout,
)
from .bids_questions import Column, QuestionFileError, QuestionKind, Turn, read_questions
from .subject_splits import parse_split, split_subjects

DEFAULT_SPLIT = "train=0.8,eval=0.1,test=0.1"
IMAGE_TOKEN = "<image>"


# ---------------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------------


def make_record(
    task_id: str, task_type: str, scans: Sequence[Scan], turns: Sequence[tuple[str, str]], metadata: dict[str, Any]
) -> dict[str, Any]:
    """An UMBRELLA record: the scans as image items before the first question, then question/answer turns."""
    conversations = []
    for index, (question, answer) in enumerate(turns):
        content: list[dict[str, Any]] = []
        if index == 0:
            content = [{"type": "image", "modality": scan.modality, "image_path": scan.path} for scan in scans]
        content.append({"type": "text", "text": question})
        conversations.append({"role": "user", "content": content})
        conversations.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return {
        "task_id": task_id,
        "task_type": task_type,
        "images": [{"path": scan.path, "token": IMAGE_TOKEN, "modality": scan.modality} for scan in scans],
        "conversations": conversations,
        "metadata": metadata,
    }


def _unit_name(subject: str, session: str | None) -> str:
    return f"sub-{subject}" + (f"_ses-{session}" if session is not None else "")


@dataclass
class _Candidate:
    """A subject's session that a kind can use: its scans, and its record (single-subject kinds) or its value
    (comparison kinds)."""

    subject: str
    session: str | None
    scans: list[Scan]
    record: dict[str, Any] | None = None
    value: Any = None
    text: str = ""


@dataclass
class RecordSet:
    """What `build_records` makes: the records of each split and the summary written beside them."""

    records: dict[str, list[dict[str, Any]]]
    summary: dict[str, Any]


@dataclass
class _Skips:
    entries: list[dict[str, Any]] = field(default_factory=list)

    def add(self, task: str | None, subject: str, session: str | None, reason: str, detail: str) -> None:
        self.entries.append({"task": task, "subject": subject, "session": session, "reason": reason, "detail": detail})

    def counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, Counter] = {}
        for entry in self.entries:
            counts.setdefault(entry["task"] or "(subject)", Counter())[entry["reason"]] += 1
        return {task: dict(counter) for task, counter in counts.items()}


def _answer(
    turn: Turn, kind: QuestionKind, tables: PhenotypeTables, subject: str, session: str | None
) -> tuple[str | None, str]:
    """A turn's answer for a subject's session (for a comparison kind, the value compared), or `None` with the reason
    when a value it needs is missing.

    Raises:
        RecordBuildError: for a value the `answers` mapping does not list, or an `answer` that does not format.
    """
    values = {}
    for column in turn.columns:
        text, source = tables.lookup(column, subject, session)
        if text is None:
            return None, source
        values[column] = (text, source)
    text, source = values[turn.column]
    if kind.compare is not None:  # answered when pairs are drawn; the value itself for now
        return text, source
    if turn.answers is not None:
        if text not in turn.answers:
            raise RecordBuildError(
                f"{source}: column {turn.column.spelled!r} has the value {text!r} for {_unit_name(subject, session)}, "
                f"which the `answers` of kind {kind.task!r} do not list ({sorted(turn.answers)}); add it to the "
                "question file or correct the table."
            )
        return turn.answers[text], source
    try:
        return turn.answer.format_map(tables.row(subject, session)), source
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        shown = {column.spelled: value[0] for column, value in values.items()}
        raise RecordBuildError(
            f"kind {kind.task!r}: the answer {turn.answer!r} does not format for {_unit_name(subject, session)} "
            f"with {shown} ({type(error).__name__}: {error})."
        ) from None


def _comparable(kind: QuestionKind, text: str, source: str, subject: str) -> Any:
    if kind.compare == "same":
        return text
    try:
        return float(text)
    except ValueError:
        raise RecordBuildError(
            f"{source}: column {kind.turns[0].column.spelled!r} has the value {text!r} for sub-{subject}, which is "
            f"not a number; kind {kind.task!r} compares it ({kind.compare})."
        ) from None


def _candidates(
    kind: QuestionKind,
    units: Sequence[tuple[str, str | None]],
    layout: Any,
    tables: PhenotypeTables,
    ignored: set[str],
    skips: _Skips,
) -> list[_Candidate]:
    """Every session of `units` that `kind` can use, with its record or value; the others are counted in `skips`."""
    candidates = []
    for subject, session in units:
        answers = [_answer(turn, kind, tables, subject, session) for turn in kind.turns]
        scans, why = find_scans(layout, kind.images, subject, session, ignored)
        if scans is None:
            skips.add(kind.task, subject, session, "no image" if why.startswith("no file") else "several images", why)
            continue
        turns = []
        for turn, (answer, source) in zip(kind.turns, answers):
            if answer is None:
                detail = f"{source}: question {turn.question!r} skipped"
                skips.add(kind.task, subject, session, "missing value", detail)
            else:
                turns.append((turn.question, answer))
        if not turns:
            continue
        candidate = _Candidate(subject, session, scans)
        if kind.compare is None:
            values = {column.spelled: tables.lookup(column, subject, session)[0] for column in kind.columns}
            metadata = {"subject": subject, "session": session, "values": values}
            candidate.record = make_record(
                f"{kind.task}-{_unit_name(subject, session)}", kind.task, scans, turns, metadata
            )
        else:
            text, source = tables.lookup(kind.turns[0].column, subject, session)
            candidate.text = text
            candidate.value = _comparable(kind, text, source, subject)
        candidates.append(candidate)
    return candidates


def draw_pairs(
    kind: QuestionKind, candidates: Sequence[_Candidate], split: str, seed: int, skips: _Skips
) -> list[dict[str, Any]]:
    """Comparison records of one split: each candidate is drawn `pairs_per_subject` partners of another subject of
    the split (with a different value for `greater` / `less`; for `same`, an equal or a different value with
    chance 1/2 each where both exist). No pair is drawn twice. For `greater` / `less`, the pairs are ordered so that
    half the answers (rounded at random) are the first scan; for `same`, the order is drawn with chance 1/2.

    Reproducible: the draws depend only on `seed`, the task, the split and the candidates.
    """
    rng = random.Random(f"{seed}/{kind.task}/{split}")
    turn = kind.turns[0]
    used: set[frozenset[tuple[str, str | None]]] = set()
    pairs: list[tuple[_Candidate, _Candidate]] = []
    for anchor in candidates:
        anchor_key = (anchor.subject, anchor.session)
        for _ in range(kind.pairs_per_subject):
            partners = [
                other
                for other in candidates
                if other.subject != anchor.subject
                and frozenset({anchor_key, (other.subject, other.session)}) not in used
                and (kind.compare == "same" or other.value != anchor.value)
            ]
            if kind.compare == "same":
                equal = [other for other in partners if other.value == anchor.value]
                different = [other for other in partners if other.value != anchor.value]
                partners = equal if (equal and (not different or rng.random() < 0.5)) else different
            if not partners:
                skips.add(
                    kind.task,
                    anchor.subject,
                    anchor.session,
                    "no partner",
                    f"no subject of split {split!r} left to pair with"
                    + ("" if kind.compare == "same" else f" a different {turn.column.spelled}"),
                )
                break
            partner = rng.choice(partners)
            used.add(frozenset({anchor_key, (partner.subject, partner.session)}))
            pairs.append((anchor, partner))

    first_answers = [index % 2 == 0 for index in range(len(pairs))]  # balanced answers: no prior to learn
    rng.shuffle(first_answers)
    records = []
    for (anchor, partner), answer_first in zip(pairs, first_answers):
        if kind.compare == "same":
            first, second = (anchor, partner) if rng.random() < 0.5 else (partner, anchor)
            key = "same" if first.value == second.value else "different"
        else:
            anchor_wins = anchor.value > partner.value if kind.compare == "greater" else anchor.value < partner.value
            first, second = (anchor, partner) if anchor_wins == answer_first else (partner, anchor)
            key = "first" if answer_first else "second"
        metadata = {
            "subjects": [first.subject, second.subject],
            "sessions": [first.session, second.session],
            "values": {turn.column.spelled: [first.text, second.text]},
        }
        task_id = (
            f"{kind.task}-{_unit_name(first.subject, first.session)}-vs-{_unit_name(second.subject, second.session)}"
        )
        scans = first.scans + second.scans
        records.append(make_record(task_id, kind.task, scans, [(turn.question, turn.answers[key])], metadata))
    return records


def _stratification_column(kinds: Sequence[QuestionKind]) -> tuple[str, Column] | None:
    """The first categorical question (with an `answers` mapping) of a single-subject kind: `(task, column)`."""
    for kind in kinds:
        if kind.compare is None:
            for turn in kind.turns:
                if turn.answers is not None:
                    return kind.task, turn.column
    return None


def build_records(
    bids_root: str | Path,
    questions: str | Path | Sequence[QuestionKind],
    split: Mapping[str, float] | None = None,
    seed: int = 0,
    derivatives: Sequence[str] = (),
) -> RecordSet:
    """Build the records of every question kind from a BIDS dataset, split by subject.

    Args:
        bids_root: the BIDS dataset's folder (with `dataset_description.json`).
        questions: a question file (`.yaml` / `.json`, see `bids_questions`) or its parsed kinds.
        split: split name → fraction of the subjects (default `train` 0.8, `eval` 0.1, `test` 0.1).
        seed: seeds the split and the comparison pairs.
        derivatives: folder names under `derivatives/` to index, which a question's `scope` can name.

    Returns:
        A [`RecordSet`]: `records[split]` (UMBRELLA records, volume paths relative to `bids_root`) and `summary`.

    Raises:
        RecordBuildError / QuestionFileError (both ValueErrors): naming the path, kind, column, value or subject (see
            the module docstring). ImportError: without pybids (`pip install 'umbrella_llava[bids]'`).
    """
    fractions = dict(split) if split is not None else parse_split(DEFAULT_SPLIT)
    kinds = list(questions) if not isinstance(questions, str | Path) else read_questions(questions)
    layout, ignored_files = open_layout(bids_root, derivatives)
    check_queries(layout, kinds)
    tables = PhenotypeTables(layout, kinds)
    ignored = {entry["path"] for entry in ignored_files}
    skips = _Skips()

    with_files = set(layout.get_subjects(scope="raw"))
    listed = {subject for subject, _ in tables.participants.rows} if tables.participants else set()
    for subject in sorted(listed - with_files):
        skips.add(None, subject, None, "no files", f"sub-{subject} is in participants.tsv but has no files")
    units = [
        (subject, session)
        for subject in sorted(with_files)
        for session in (sorted(layout.get_sessions(subject=subject, scope="raw")) or [None])
    ]

    candidates = {kind.task: _candidates(kind, units, layout, tables, ignored, skips) for kind in kinds}
    subjects = sorted({c.subject for found in candidates.values() for c in found})
    for subject in sorted(with_files - set(subjects)):
        skips.add(None, subject, None, "no records", f"sub-{subject} has no scan and value that any question can use")

    stratify_by = _stratification_column(kinds)
    labels = None
    if stratify_by is not None:
        column = stratify_by[1]
        first_session = {subject: session for subject, session in reversed(units)}
        labels = [str(tables.lookup(column, subject, first_session[subject])[0] or "n/a") for subject in subjects]
    assignment, steps = split_subjects(subjects, labels, fractions, seed) if subjects else ({}, [])

    records: dict[str, list[dict[str, Any]]] = {name: [] for name in fractions}
    for kind in kinds:
        for name in fractions:
            in_split = [c for c in candidates[kind.task] if assignment[c.subject] == name]
            if kind.compare is None:
                made = [c.record for c in in_split]
            else:
                made = draw_pairs(kind, in_split, name, seed, skips)
            for record in made:
                record["metadata"]["split"] = name
            records[name].extend(made)

    summary = {
        "bids_root": str(Path(bids_root)),
        "seed": seed,
        "split": fractions,
        "derivatives": list(derivatives),
        "subjects": {name: sorted(s for s, n in assignment.items() if n == name) for name in fractions},
        "records": {
            kind.task: {name: sum(r["task_type"] == kind.task for r in records[name]) for name in fractions}
            for kind in kinds
        },
        "stratified_by": None if stratify_by is None else {"task": stratify_by[0], "column": stratify_by[1].spelled},
        "stratification": steps,
        "skipped_counts": skips.counts(),
        "skipped": skips.entries,
        "ignored_files": ignored_files,
    }
    return RecordSet(records, summary)


def write_records(record_set: RecordSet, output_dir: str | Path) -> dict[str, Path]:
    """Write `<split>.jsonl` for each split and `summary.json` into `output_dir`; returns the paths by name."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, records in record_set.records.items():
        paths[name] = output_dir / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    paths["summary"] = output_dir / "summary.json"
    paths["summary"].write_text(json.dumps(record_set.summary, indent=2, ensure_ascii=False) + "\n")
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umbrella-build-records",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--bids", required=True, help="The BIDS dataset's folder (with dataset_description.json).")
    parser.add_argument("--questions", required=True, help="The question file, .yaml or .json.")
    parser.add_argument("--output_dir", required=True, help="Where <split>.jsonl and summary.json are written.")
    parser.add_argument(
        "--split",
        default=DEFAULT_SPLIT,
        help=f"NAME=FRACTION of the subjects, comma-separated (default {DEFAULT_SPLIT}).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seeds the split and the comparison pairs (default 0).")
    parser.add_argument(
        "--derivatives",
        nargs="+",
        default=[],
        metavar="NAME",
        help="Folders under derivatives/ to index; a question's images take scope: NAME to read from one.",
    )
    parser.add_argument(
        "--push_to_hub",
        default=None,
        metavar="REPO",
        help="Also share the splits as a Hugging Face dataset with a Nifti column (the volumes' bytes embedded); "
        "needs the datasets extra and a login (huggingface-cli login).",
    )
    parser.add_argument("--private", action="store_true", help="With --push_to_hub: a private dataset repository.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `umbrella-build-records`; a bad input exits with status 2 and its message, and a run that built
    no record returns 1 (after writing the summary that says why)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        fractions = parse_split(args.split)
        record_set = build_records(args.bids, args.questions, fractions, args.seed, args.derivatives)
        paths = write_records(record_set, args.output_dir)
    except (ValueError, FileNotFoundError, ImportError) as error:  # RecordBuildError, QuestionFileError
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    summary = record_set.summary
    for name in record_set.records:
        print(
            f"{paths[name]}: {len(record_set.records[name])} records of {len(summary['subjects'][name])} subjects",
            file=sys.stderr,
        )
    print(
        f"{paths['summary']}: {len(summary['skipped'])} skipped, {len(summary['ignored_files'])} files ignored",
        file=sys.stderr,
    )
    if not any(record_set.records.values()):
        print(f"{parser.prog}: no records were built; {paths['summary']} lists why.", file=sys.stderr)
        return 1
    if args.push_to_hub:
        from .data.hf_datasets import push_records_to_hub

        splits = {name: paths[name] for name, records in record_set.records.items() if records}
        try:
            push_records_to_hub(splits, args.push_to_hub, image_root=args.bids, private=args.private)
        except ImportError as error:
            parser.exit(2, f"{parser.prog}: error: {error}\n")
        print(f"Pushed the splits {sorted(splits)} to the dataset repository {args.push_to_hub}", file=sys.stderr)
    return 0


__all__ = [
    "QuestionFileError",
    "RecordBuildError",
    "RecordSet",
    "build_parser",
    "build_records",
    "draw_pairs",
    "find_scans",
    "main",
    "make_record",
    "open_layout",
    "parse_split",
    "split_subjects",
    "write_records",
]


if __name__ == "__main__":
    sys.exit(main())
