"""The BIDS side of `umbrella-build-records`: the dataset opened with pybids' `BIDSLayout`, its tables
(`participants.tsv`, `sessions.tsv`, `phenotype/<table>.tsv`), and the scans a question's entities find.

Needs the `bids` extra (pybids): `pip install 'umbrella_llava[bids]'`.
"""

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from .bids_questions import PARTICIPANTS, Column, ImageQuery, QuestionKind

MISSING_VALUES = ("n/a", "")


class RecordBuildError(ValueError):
    """A dataset or question file that records cannot be built from; the message names the path, kind or subject."""


def require_bids() -> ModuleType:
    """Import pybids (and check scikit-learn, which splits the subjects), or raise an `ImportError` that names the
    extra to install."""
    for name, package in (("bids", "pybids"), ("sklearn.model_selection", "scikit-learn")):
        try:
            __import__(name)
        except ImportError as error:
            raise ImportError(
                f"Building records from a BIDS dataset needs {package}, which is not installed: "
                "`pip install 'umbrella_llava[bids]'`."
            ) from error
    import bids

    return bids


# ---------------------------------------------------------------------------------------------------------------------
# The dataset: layout and tables
# ---------------------------------------------------------------------------------------------------------------------


def open_layout(bids_root: str | Path, derivatives: Sequence[str] = ()) -> tuple[Any, list[dict[str, str]]]:
    """Index `bids_root` (and `derivatives/NAME` for each name) with pybids.

    Returns:
        The `BIDSLayout`, and the raw files that pybids' BIDS validator rejects (`{"path", "reason"}`, relative to
        the root): they are indexed, so that they can be listed, but [`find_scans`] never returns them.

    Raises:
        RecordBuildError: naming the path, with pybids' reason, for a folder that is not a BIDS dataset, or a
            `derivatives/NAME` that is missing or not a BIDS derivatives dataset.
    """
    bids = require_bids()
    from bids.exceptions import BIDSDerivativesValidationError
    from bids_validator import BIDSValidator  # installed with pybids

    root = Path(bids_root)
    if not root.is_dir():
        raise RecordBuildError(f"BIDS dataset not found: {root} is not a folder.")
    derivative_paths = []
    for name in derivatives:
        path = root / "derivatives" / name
        if not (path / "dataset_description.json").is_file():
            raise RecordBuildError(
                f"--derivatives {name}: {path} is not a BIDS derivatives dataset (it needs a "
                "dataset_description.json with DatasetType 'derivative' and GeneratedBy)."
            )
        derivative_paths.append(path)
    # Files are indexed whatever their names (validate=False), and pybids' own validator then names those it would
    # have dropped silently; metadata (JSON sidecars) is not read, so a broken sidecar does not stop the build.
    indexer = bids.BIDSLayoutIndexer(validate=False, index_metadata=False)
    try:
        layout = bids.BIDSLayout(root, validate=True, derivatives=derivative_paths or False, indexer=indexer)
    except BIDSDerivativesValidationError as error:
        raise RecordBuildError(f"--derivatives: a folder under {root / 'derivatives'} is not valid: {error}") from None
    except (ValueError, OSError) as error:  # BIDSValidationError is a ValueError
        raise RecordBuildError(f"{root} is not a valid BIDS dataset: {error}") from None
    missing = [name for name in derivatives if name not in layout.derivatives]
    if missing:
        raise RecordBuildError(
            f"--derivatives {missing[0]}: pybids did not index {root / 'derivatives' / missing[0]}."
        )
    validator = BIDSValidator(index_associated=True)
    ignored = [
        {"path": file.relpath, "reason": "not a BIDS file name (pybids' BIDS validator rejects it)"}
        for file in layout.get(scope="raw")
        if not validator.is_bids("/" + Path(file.relpath).as_posix())
    ]
    return layout, sorted(ignored, key=lambda entry: entry["path"])


def _read_tsv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """A BIDS TSV as its header and rows of text (no quoting; `n/a` is kept as written)."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = [row for row in reader if row]
    if not rows:
        raise RecordBuildError(f"{path} is empty; a BIDS table needs a header line.")
    header = [name.strip() for name in rows[0]]
    records = []
    for line_number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise RecordBuildError(
                f"{path}, line {line_number}: {len(row)} tab-separated cells, but the header has {len(header)}."
            )
        records.append({name: cell.strip() for name, cell in zip(header, row)})
    return header, records


@dataclass
class Table:
    """One TSV of values keyed by subject (and session, where it has `session_id`): `rows[(subject, session)]`."""

    path: str  # relative to the BIDS root, as errors and skips name it
    columns: list[str]
    rows: dict[tuple[str, str | None], dict[str, str]]


def _read_table(file: Any, subject: str | None = None) -> Table:
    """`participants.tsv`, a `phenotype/<table>.tsv` (keyed by `participant_id`) or a subject's `sessions.tsv`."""
    path = Path(file.path)
    columns, records = _read_tsv(path)
    rows: dict[tuple[str, str | None], dict[str, str]] = {}
    for line_number, row in enumerate(records, start=2):
        if subject is None:
            if "participant_id" not in row:
                raise RecordBuildError(f"{path} has no participant_id column; its columns are {columns}.")
            row_subject = row["participant_id"].removeprefix("sub-")
        else:
            row_subject = subject
        session = row.get("session_id")
        key = (row_subject, session.removeprefix("ses-") if session else None)
        if key in rows:
            raise RecordBuildError(
                f"{path}, line {line_number}: a second row for sub-{key[0]}" + (f" ses-{key[1]}." if key[1] else ".")
            )
        rows[key] = row
    return Table(file.relpath, columns, rows)


class PhenotypeTables:
    """The values questions are answered from: `participants.tsv`, each subject's `sessions.tsv` (whose columns
    override `participants.tsv` for their session) and the `phenotype/<table>.tsv` files that the kinds name.

    Raises (at construction):
        RecordBuildError: naming the kind and column, for a column that no table has, or a phenotype table that
            the dataset does not have.
    """

    def __init__(self, layout: Any, kinds: Sequence[QuestionKind]):
        participants = layout.get(suffix="participants", extension=".tsv", scope="raw")
        self.participants = _read_table(participants[0]) if participants else None
        self.sessions: dict[str, Table] = {}
        for file in layout.get(suffix="sessions", extension=".tsv", scope="raw"):
            subject = file.entities.get("subject")
            if subject is not None:
                self.sessions[subject] = _read_table(file, subject)
        self.phenotype: dict[str, Table] = {}
        for kind in kinds:
            for column in kind.columns:
                self._check_column(layout, kind, column)

    def _check_column(self, layout: Any, kind: QuestionKind, column: Column) -> None:
        where = f"kind {kind.task!r}: column {column.spelled!r}"
        if column.table == PARTICIPANTS:
            known = set(self.participants.columns) if self.participants else set()
            for table in self.sessions.values():
                known |= set(table.columns)
            if column.name not in known - {"participant_id", "session_id"}:
                source = "participants.tsv" if self.participants else "participants.tsv (which the dataset lacks)"
                raise RecordBuildError(
                    f"{where} is not a column of {source} or of any sessions.tsv; the columns are {sorted(known)}. "
                    "A phenotype column is written table.column."
                )
            return
        if column.table not in self.phenotype:
            file = layout.get_file(f"phenotype/{column.table}.tsv", scope="raw")
            if file is None:
                raise RecordBuildError(f"{where}: the dataset has no phenotype/{column.table}.tsv (in {layout.root}).")
            self.phenotype[column.table] = _read_table(file)
        table = self.phenotype[column.table]
        if column.name not in table.columns:
            raise RecordBuildError(f"{where} is not a column of {table.path}; its columns are {table.columns}.")

    def lookup(self, column: Column, subject: str, session: str | None) -> tuple[str | None, str]:
        """The text of `column` for the subject (and session), or `None` when it is missing, with where it was read
        (`participants.tsv`, `sub-01/sub-01_sessions.tsv`, ...) or why it is missing."""
        if column.table == PARTICIPANTS:
            sessions = self.sessions.get(subject)
            if session is not None and sessions is not None and column.name in sessions.columns:
                row = sessions.rows.get((subject, session))
                if row is not None:
                    return _present(row[column.name], column, sessions.path)
            if self.participants is None or column.name not in self.participants.columns:
                return None, f"{column.spelled} has no value for this session (no participants.tsv column)"
            table = self.participants
            row = table.rows.get((subject, None))
        else:
            table = self.phenotype[column.table]
            row = table.rows.get((subject, session)) or table.rows.get((subject, None))
        if row is None:
            return None, f"sub-{subject} has no row in {table.path}"
        return _present(row[column.name], column, table.path)

    def row(self, subject: str, session: str | None) -> dict[str, Any]:
        """The values an `answer` format string reads: participants columns by name, tables as namespaces
        (`{age}`, `{cognition.score}`); numbers as numbers, missing values as `None`."""
        values: dict[str, Any] = {}
        for table in [self.participants, self.sessions.get(subject)]:
            if table is not None:
                row = table.rows.get((subject, session)) or table.rows.get((subject, None)) or {}
                values.update({name: _typed(text) for name, text in row.items()})
        for name, table in self.phenotype.items():
            row = table.rows.get((subject, session)) or table.rows.get((subject, None)) or {}
            values[name] = SimpleNamespace(**{column: _typed(row.get(column, "n/a")) for column in table.columns})
        return values


def _present(text: str, column: Column, source: str) -> tuple[str | None, str]:
    if text in MISSING_VALUES:
        return None, f"{column.spelled} is {text or 'an empty cell'!r} in {source}"
    return text, source


def _typed(text: str) -> int | float | str | None:
    """A cell as a number where it is one, so that `{age:.0f}` formats it; a missing value as `None`."""
    if text in MISSING_VALUES:
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


# ---------------------------------------------------------------------------------------------------------------------
# Scans
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scan:
    """One volume of a record: its path relative to the BIDS root (POSIX) and its modality label."""

    path: str
    modality: str


def _query_layout(layout: Any, query: ImageQuery) -> Any:
    """The layout a query searches: the raw dataset, or the derivatives dataset named by its `scope`."""
    return layout if query.scope == "raw" else layout.derivatives[query.scope]


def check_queries(layout: Any, kinds: Sequence[QuestionKind]) -> None:
    """Run every image query once, so that an unknown scope or entity is an error naming the kind now.

    Raises:
        RecordBuildError: naming the kind, for a `scope` that is neither 'raw' nor a `--derivatives` name, or an
            entity that pybids refuses (with pybids' reason).
    """
    for kind in kinds:
        for position, query in enumerate(kind.images):
            where = f"kind {kind.task!r}, images[{position}]"
            if query.scope != "raw" and query.scope not in layout.derivatives:
                raise RecordBuildError(
                    f"{where}: scope {query.scope!r} is neither 'raw' nor a folder given with --derivatives "
                    f"(given: {sorted(layout.derivatives) or 'none'})."
                )
            try:
                _query_layout(layout, query).get(scope="self", **query.entities)
            except (ValueError, AttributeError) as error:
                raise RecordBuildError(f"{where}: pybids refuses the query {query.entities}: {error}") from None


def find_scans(
    layout: Any, queries: Sequence[ImageQuery], subject: str, session: str | None, ignored: set[str]
) -> tuple[list[Scan] | None, str]:
    """The one file of each query for a subject (and session), or `None` with the reason (none or several match)."""
    scans = []
    root = Path(layout.root)
    for query in queries:
        filters = dict(query.entities, subject=subject)
        if session is not None:
            filters["session"] = session
        searched = _query_layout(layout, query)
        files = [
            f
            for f in searched.get(scope="self", **filters)
            if Path(f.path).relative_to(root).as_posix() not in ignored
        ]
        described = ", ".join(f"{key}={value}" for key, value in query.entities.items())
        if query.scope != "raw":
            described += f" in derivatives/{query.scope}"
        if not files:
            return None, f"no file matches {described}"
        if len(files) > 1:
            names = ", ".join(sorted(Path(f.path).relative_to(root).as_posix() for f in files))
            return None, (
                f"{len(files)} files match {described} ({names}); add an entity (run, acquisition, ...) to the "
                "question's images to choose one"
            )
        scans.append(Scan(Path(files[0].path).relative_to(root).as_posix(), query.modality))
    return scans, ""


__all__ = [
    "MISSING_VALUES",
    "PhenotypeTables",
    "RecordBuildError",
    "Scan",
    "check_queries",
    "find_scans",
    "open_layout",
    "require_bids",
]
