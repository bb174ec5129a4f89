"""The question file of `umbrella-build-records`: which questions to ask about which scans, and where the answers are.

A `questions.yaml` (or `.json`) is a list of question kinds. Each kind becomes one `task_type` of the records:

```yaml
- task: sex                              # the records' task_type (unique)
  images: {suffix: T1w}                  # BIDS entities of the layout's query: one scan per record
  column: sex                            # a column of participants.tsv ...
  question: Is this brain male or female?
  answers: {M: male, F: female}          # ... whose value picks the answer (a value not listed is an error)

- task: age
  images: {suffix: T1w}
  column: age
  question: How old is this person, in years?
  answer: "{age:.0f}"                    # or a format string over the subject's row

- task: t1_flair                         # several scans of one session in one record, one placeholder each
  images: [{suffix: T1w}, {suffix: FLAIR}]
  turns:                                 # several questions: one multi-turn conversation
    - {question: "Male or female?", column: sex, answers: {M: male, F: female}}
    - {question: "Memory score?", column: cognition.score, answer: "{cognition.score}"}

- task: older                            # two subjects' scans; the answer says which one
  images: {suffix: T1w}
  column: age
  compare: greater                       # greater | less: which has the larger (smaller) value; same: equal or not
  question: Which of the two is older?
  answers: {first: first, second: second}    # optional; for `same`: {same: "yes", different: "no"}

- task: sex_preproc                      # a scan from a derivatives folder given with --derivatives prep
  images: {scope: prep, desc: preproc, suffix: T1w}
  column: sex
  question: Male or female?
  answers: {M: male, F: female}
```

Keys of a kind: `task` and `images` always; then either `question` + `column` + one of `answers` / `answer`, or
`turns` (a list of such `question` / `column` / `answers` / `answer` entries); optionally `compare` (`greater`,
`less` or `same`; one turn, no `answer` format) and `pairs_per_subject` (compare kinds; default 1).

- `images`: one mapping or a list. Each is passed to pybids' `BIDSLayout.get` as entities (`suffix`, `datatype`,
  `acquisition`, `run`, `desc`, `space`, ...; `extension` defaults to `[.nii.gz, .nii]`), plus two keys of ours:
  `scope` (`raw`, the default, or the name of a folder given with `--derivatives`) and `modality` (the record's
  modality label; default the `suffix`). `subject` and `session` are set by the builder and may not be given.
- `column`: a column of `participants.tsv` (a column of a subject's `sub-<label>_sessions.tsv`, where it has one,
  overrides it for that session), or `table.column` for a column of `phenotype/<table>.tsv`.
- `answers`: column value → answer text. Keys are compared as text, so `1` matches a cell `1`; an unquoted YAML
  `yes` / `no` / `on` / `off` (which YAML reads as true / false) is refused: quote it.
- `answer`: a Python format string over the row: participants columns by name (`{age:.0f}`), phenotype tables as
  `{table.column}`. Numbers in cells are formatted as numbers.

A missing or unknown key, or a value of the wrong kind, is a [`QuestionFileError`] naming the file, the kind and the
key. Whether the columns and entities exist is checked against the dataset by `bids_records`.
"""

import json
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMPARISONS = ("greater", "less", "same")
# The answer keys of a comparison kind, and their default texts.
COMPARISON_ANSWERS = {
    "greater": {"first": "first", "second": "second"},
    "less": {"first": "first", "second": "second"},
    "same": {"same": "yes", "different": "no"},
}
DEFAULT_EXTENSIONS = (".nii.gz", ".nii")
PARTICIPANTS = "participants"

_KIND_KEYS = frozenset(
    {"task", "images", "question", "column", "answers", "answer", "turns", "compare", "pairs_per_subject"}
)
_TURN_KEYS = frozenset({"question", "column", "answers", "answer"})
_OUR_IMAGE_KEYS = frozenset({"scope", "modality"})
# Query arguments of BIDSLayout.get that are not entities, and the entities the builder sets itself.
_FORBIDDEN_IMAGE_KEYS = frozenset(
    {"subject", "session", "return_type", "target", "regex_search", "invalid_filters", "absolute_paths"}
)


class QuestionFileError(ValueError):
    """A question file that cannot be used; the message names the file, the kind and the key."""


@dataclass(frozen=True)
class Column:
    """A column of `participants.tsv` (`table` is `"participants"`) or of `phenotype/<table>.tsv`."""

    table: str
    name: str

    @property
    def spelled(self) -> str:
        """As the question file writes it: `age` or `cognition.score`."""
        return self.name if self.table == PARTICIPANTS else f"{self.table}.{self.name}"


@dataclass(frozen=True)
class ImageQuery:
    """One scan of a record: the BIDS entities of the query, the layout it searches, and its modality label."""

    entities: dict[str, Any]
    scope: str
    modality: str


@dataclass(frozen=True)
class Turn:
    """One question and how its answer is made: from `answers` (value → text) or from the `answer` format string.

    `columns` are the columns whose values the answer needs (`column`, and every field of `answer`): a turn whose
    subject has a missing value in any of them is skipped.
    """

    question: str
    column: Column
    answers: dict[str, str] | None
    answer: str | None
    columns: tuple[Column, ...]


@dataclass(frozen=True)
class QuestionKind:
    """One kind of question: becomes one `task_type`. `compare` is `None` for single-subject kinds."""

    task: str
    images: tuple[ImageQuery, ...]
    turns: tuple[Turn, ...]
    compare: str | None = None
    pairs_per_subject: int = 1

    @property
    def columns(self) -> tuple[Column, ...]:
        """Every column the kind reads, in order, without repeats."""
        return tuple(dict.fromkeys(column for turn in self.turns for column in turn.columns))


def parse_column(spelled: str, where: str) -> Column:
    """`age` → participants.tsv's `age`; `cognition.score` → `phenotype/cognition.tsv`'s `score`."""
    if not isinstance(spelled, str) or not spelled.strip():
        raise QuestionFileError(f"{where}: `column` must be a column name, got {spelled!r}.")
    table, dot, name = spelled.partition(".")
    if not dot:
        return Column(PARTICIPANTS, spelled)
    if not table or not name or "." in name:
        raise QuestionFileError(
            f"{where}: `column` {spelled!r} must be a participants.tsv column or `table.column` of phenotype/table.tsv."
        )
    return Column(table, name)


def read_questions(path: str | Path) -> list[QuestionKind]:
    """Read and check a question file (`.yaml` / `.yml` / `.json`) into its kinds, in file order.

    Raises:
        FileNotFoundError: if `path` does not exist.
        QuestionFileError: naming the file, the kind and the key, for a missing or unknown key, a value of the wrong
            type, a repeated task name, or a file that does not parse.
        ImportError: for a YAML file without PyYAML (`pip install 'umbrella_llava[bids]'`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Question file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise QuestionFileError(f"{path}: not valid JSON ({error}).") from None
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as error:
            raise ImportError(
                f"Reading {path} needs PyYAML: `pip install 'umbrella_llava[bids]'` (or write the file as JSON)."
            ) from error
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise QuestionFileError(f"{path}: not valid YAML ({error}).") from None
    else:
        raise QuestionFileError(f"{path}: a question file must be .yaml, .yml or .json.")
    return parse_questions(raw, str(path))


def parse_questions(raw: Any, source: str = "questions") -> list[QuestionKind]:
    """Check the parsed content of a question file (a list of kind mappings); `source` names it in errors."""
    if not isinstance(raw, list) or not raw:
        raise QuestionFileError(
            f"{source}: the file must be a non-empty list of question kinds, got {type(raw).__name__}."
        )
    kinds = [_parse_kind(entry, index, source) for index, entry in enumerate(raw)]
    seen: set[str] = set()
    for kind in kinds:
        if kind.task in seen:
            raise QuestionFileError(f"{source}: task {kind.task!r} is defined twice; task names must be unique.")
        seen.add(kind.task)
    return kinds


def _parse_kind(entry: Any, index: int, source: str) -> QuestionKind:
    if not isinstance(entry, Mapping):
        raise QuestionFileError(f"{source}: kind {index} is a {type(entry).__name__}, not a mapping.")
    task = entry.get("task")
    if not isinstance(task, str) or not task.strip():
        raise QuestionFileError(f"{source}: kind {index} has no `task` (its name, the records' task_type).")
    where = f"{source}: kind {index} ({task!r})"
    _check_keys(entry, _KIND_KEYS, where)
    if "images" not in entry:
        raise QuestionFileError(f"{where}: missing key `images` (the BIDS entities of the scans to show).")
    images = entry["images"]
    images = [images] if isinstance(images, Mapping) else images
    if not isinstance(images, list) or not images:
        raise QuestionFileError(f"{where}: `images` must be a mapping of BIDS entities or a non-empty list of them.")
    queries = tuple(_parse_image(image, f"{where}, images[{position}]") for position, image in enumerate(images))

    single = _TURN_KEYS & set(entry)
    if "turns" in entry:
        if single:
            raise QuestionFileError(
                f"{where}: has both `turns` and {sorted(single)}; give the questions either as `turns` or as one "
                "question, column and answer(s)."
            )
        if not isinstance(entry["turns"], list) or not entry["turns"]:
            raise QuestionFileError(f"{where}: `turns` must be a non-empty list of question entries.")
        turns = tuple(
            _parse_turn(turn, f"{where}, turns[{position}]", in_turns=True)
            for position, turn in enumerate(entry["turns"])
        )
    else:
        turns = (_parse_turn(entry, where, in_turns=False, answer_optional="compare" in entry),)

    compare = entry.get("compare")
    pairs_per_subject = entry.get("pairs_per_subject", 1)
    if compare is None:
        if "pairs_per_subject" in entry:
            raise QuestionFileError(f"{where}: `pairs_per_subject` is for comparison kinds (with `compare`).")
        return QuestionKind(task, queries, turns)
    if compare not in COMPARISONS:
        raise QuestionFileError(f"{where}: `compare` must be one of {list(COMPARISONS)}, got {compare!r}.")
    if len(turns) != 1:
        raise QuestionFileError(f"{where}: a comparison kind asks one question; it has {len(turns)} turns.")
    if isinstance(pairs_per_subject, bool) or not isinstance(pairs_per_subject, int) or pairs_per_subject < 1:
        raise QuestionFileError(f"{where}: `pairs_per_subject` must be a positive integer, got {pairs_per_subject!r}.")
    turn = turns[0]
    if turn.answer is not None:
        raise QuestionFileError(
            f"{where}: a comparison kind's answer says which scan; give `answers` with keys "
            f"{sorted(COMPARISON_ANSWERS[compare])}, or leave it out, instead of `answer`."
        )
    answers = dict(COMPARISON_ANSWERS[compare])
    if turn.answers is not None:
        if set(turn.answers) != set(answers):
            raise QuestionFileError(
                f"{where}: `answers` of `compare: {compare}` must have exactly the keys {sorted(answers)}, got "
                f"{sorted(turn.answers)}."
            )
        answers = turn.answers
    turn = Turn(turn.question, turn.column, answers, None, (turn.column,))
    return QuestionKind(task, queries, (turn,), compare, pairs_per_subject)


def _parse_turn(entry: Any, where: str, in_turns: bool, answer_optional: bool = False) -> Turn:
    """A question entry: an item of `turns` (only the turn keys), or the kind itself (its keys checked already).
    With `answer_optional` (comparison kinds, whose answers have defaults), neither `answers` nor `answer` is fine."""
    if not isinstance(entry, Mapping):
        raise QuestionFileError(f"{where}: a question entry must be a mapping, got {type(entry).__name__}.")
    if in_turns:
        _check_keys(entry, _TURN_KEYS, where)
    for key in ("question", "column"):
        if key not in entry:
            raise QuestionFileError(f"{where}: missing key `{key}`.")
    question = entry["question"]
    if not isinstance(question, str) or not question.strip():
        raise QuestionFileError(f"{where}: `question` must be non-empty text, got {question!r}.")
    column = parse_column(entry["column"], where)
    has_answers, has_answer = "answers" in entry, "answer" in entry
    if has_answers == has_answer and not (answer_optional and not has_answers):
        raise QuestionFileError(
            f"{where}: give exactly one of `answers` (a mapping value → answer text) or `answer` (a format string "
            f"over the row); it has {'both' if has_answers else 'neither'}."
        )
    if has_answers or not has_answer:
        answers = _parse_answers(entry["answers"], where) if has_answers else None
        return Turn(question, column, answers, None, (column,))
    answer = entry["answer"]
    if not isinstance(answer, str) or not answer.strip():
        raise QuestionFileError(f"{where}: `answer` must be a format string such as '{{age:.0f}}', got {answer!r}.")
    return Turn(question, column, None, answer, tuple(dict.fromkeys((column, *_format_columns(answer, where)))))


def _parse_answers(answers: Any, where: str) -> dict[str, str]:
    if not isinstance(answers, Mapping) or not answers:
        raise QuestionFileError(f"{where}: `answers` must be a non-empty mapping of column value → answer text.")
    parsed = {}
    for value, text in answers.items():
        if isinstance(value, bool):
            raise QuestionFileError(
                f"{where}: `answers` has the key {value!r}, which YAML reads from an unquoted yes/no/on/off/true/"
                "false; quote the key as it is written in the table (e.g. 'yes': ...)."
            )
        if isinstance(text, bool) or not isinstance(text, str | int | float) or not str(text).strip():
            raise QuestionFileError(f"{where}: the answer for {value!r} must be non-empty text, got {text!r}.")
        parsed[str(value)] = str(text)
    return parsed


def _format_columns(answer: str, where: str) -> list[Column]:
    """The columns an `answer` format string reads: `{age}` and `{cognition.score:.1f}`."""
    columns = []
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(answer) if field is not None]
    except ValueError as error:
        raise QuestionFileError(f"{where}: `answer` {answer!r} is not a valid format string ({error}).") from None
    for field in fields:
        if not field or field.isdigit() or "[" in field:
            raise QuestionFileError(
                f"{where}: `answer` {answer!r} has the field {{{field}}}; fields must name columns, as {{age}} or "
                "{table.column}."
            )
        columns.append(parse_column(field, where))
    return columns


def _parse_image(image: Any, where: str) -> ImageQuery:
    if not isinstance(image, Mapping) or not image:
        raise QuestionFileError(f"{where}: must be a mapping of BIDS entities such as {{suffix: T1w}}, got {image!r}.")
    forbidden = sorted(_FORBIDDEN_IMAGE_KEYS & set(image))
    if forbidden:
        raise QuestionFileError(
            f"{where}: the key `{forbidden[0]}` may not be given: records are built subject by subject and session "
            "by session, and the builder sets the query's options."
        )
    entities = {key: value for key, value in image.items() if key not in _OUR_IMAGE_KEYS}
    for key, value in entities.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in values):
            raise QuestionFileError(
                f"{where}: entity `{key}` must be text, a number or a list of them, got {value!r}."
            )
    entities.setdefault("extension", list(DEFAULT_EXTENSIONS))
    scope = image.get("scope", "raw")
    if not isinstance(scope, str) or not scope:
        raise QuestionFileError(f"{where}: `scope` must be 'raw' or a --derivatives folder name, got {scope!r}.")
    modality = image.get("modality", entities.get("suffix"))
    if not isinstance(modality, str) or not modality:
        raise QuestionFileError(
            f"{where}: give `suffix` (T1w, FLAIR, ...) or a `modality` label, so the record can name the scan."
        )
    return ImageQuery(entities, scope, modality)


def _check_keys(entry: Mapping, allowed: frozenset[str], where: str) -> None:
    unknown = [key for key in entry if key not in allowed]
    if unknown:
        raise QuestionFileError(f"{where}: unknown key `{unknown[0]}`; the keys of this entry are {sorted(allowed)}.")


__all__ = [
    "COMPARISONS",
    "Column",
    "ImageQuery",
    "QuestionFileError",
    "QuestionKind",
    "Turn",
    "parse_questions",
    "read_questions",
]
