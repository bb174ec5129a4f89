"""`umbrella-build-records`: a small BIDS dataset of real MNI152 brains → records, split by subject, and training on
them."""

import json
import sys
from pathlib import Path

import nibabel as nib
import pytest
import torch
from conftest import tiny_config

pytest.importorskip("bids")

from umbrella_llava.bids_records import build_records, main, split_subjects  # noqa: E402

# participant_id, sex, age; sub-03's sex is n/a, sub-09 has no files.
PARTICIPANTS = [
    ("01", "M", "25"),
    ("02", "F", "31"),
    ("03", "n/a", "47"),
    ("04", "M", "52"),
    ("05", "F", "38"),
    ("06", "M", "61"),
    ("07", "F", "29"),
    ("08", "F", "44"),
    ("09", "M", "33"),
]
COGNITION = {"01": "27", "02": "29", "03": "25", "04": "n/a", "05": "30", "06": "22", "07": "28", "08": "26"}
SUBJECTS_WITH_FILES = [subject for subject, _, _ in PARTICIPANTS if subject != "09"]

QUESTIONS = """\
- task: sex
  images: {suffix: T1w}
  column: sex
  question: Is this brain male or female?
  answers: {M: male, F: female}
- task: age
  images: {suffix: T1w}
  column: age
  question: How old is this person?
  answer: "{age:.0f} years"
- task: t1_flair
  images: [{suffix: T1w}, {suffix: FLAIR}]
  turns:
    - {question: "Male or female?", column: sex, answers: {M: male, F: female}}
    - {question: "What is the memory score?", column: cognition.score, answer: "{cognition.score}"}
- task: older
  images: {suffix: T1w}
  column: age
  compare: greater
  question: Which of the two is older?
- task: sex_preproc
  images: {scope: prep, desc: preproc, suffix: T1w}
  column: sex
  question: Male or female?
  answers: {M: male, F: female}
"""


def _write_tsv(path: Path, rows: list[tuple[str, ...]]) -> None:
    path.write_text("".join("\t".join(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def bids_dataset(tmp_path_factory) -> Path:
    """8 subjects with scans (sub-02 in two sessions, sub-07 without FLAIR, sub-04 with a misnamed extra file),
    participants.tsv, sub-02's sessions.tsv, phenotype/cognition.tsv and a `prep` derivatives folder."""
    nilearn_datasets = pytest.importorskip("nilearn.datasets")
    template = nilearn_datasets.load_mni152_template(resolution=2)
    volume = template.slicer[::6, ::6, ::6]  # 17 × 20 × 16 voxels of 12 mm: a real brain, tiny
    root = tmp_path_factory.mktemp("bids") / "ds"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    _write_tsv(
        root / "participants.tsv",
        [("participant_id", "sex", "age")] + [(f"sub-{s}", x, a) for s, x, a in PARTICIPANTS],
    )
    (root / "phenotype").mkdir()
    _write_tsv(
        root / "phenotype" / "cognition.tsv",
        [("participant_id", "score")] + [(f"sub-{s}", v) for s, v in COGNITION.items()],
    )

    def scan(relative: str) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        volume.to_filename(path)

    for subject in SUBJECTS_WITH_FILES:
        if subject == "02":
            for session in ("1", "2"):
                scan(f"sub-02/ses-{session}/anat/sub-02_ses-{session}_T1w.nii.gz")
            scan("sub-02/ses-1/anat/sub-02_ses-1_FLAIR.nii.gz")
            _write_tsv(
                root / "sub-02" / "sub-02_sessions.tsv", [("session_id", "age"), ("ses-1", "31"), ("ses-2", "33")]
            )
            continue
        scan(f"sub-{subject}/anat/sub-{subject}_T1w.nii.gz")
        if subject != "07":
            scan(f"sub-{subject}/anat/sub-{subject}_FLAIR.nii.gz")
    scan("sub-04/anat/sub-04_bogus_T1w.nii.gz")  # not a BIDS name: pybids' validator rejects it

    prep = root / "derivatives" / "prep"
    prep.mkdir(parents=True)
    description = {
        "Name": "prep",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "prep"}],
    }
    (prep / "dataset_description.json").write_text(json.dumps(description))
    for subject in ("01", "04", "05"):
        scan(f"derivatives/prep/sub-{subject}/anat/sub-{subject}_desc-preproc_T1w.nii.gz")
    return root


@pytest.fixture(scope="module")
def questions_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("questions") / "questions.yaml"
    path.write_text(QUESTIONS)
    return path


def _build(bids_dataset: Path, questions: Path, output_dir: Path, *extra: str) -> dict[str, list[dict]]:
    argv = ["--bids", str(bids_dataset), "--questions", str(questions), "--output_dir", str(output_dir)]
    assert main([*argv, "--derivatives", "prep", *extra]) == 0
    summary = json.loads((output_dir / "summary.json").read_text())
    return {
        name: [json.loads(line) for line in (output_dir / f"{name}.jsonl").read_text().splitlines()]
        for name in summary["split"]
    }


@pytest.fixture(scope="module")
def built(bids_dataset, questions_file, tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    output_dir = tmp_path_factory.mktemp("records")
    return output_dir, _build(bids_dataset, questions_file, output_dir)


def _subjects(record: dict) -> list[str]:
    metadata = record["metadata"]
    return metadata.get("subjects") or [metadata["subject"]]


def _by_id(splits: dict[str, list[dict]]) -> dict[str, dict]:
    return {record["task_id"]: record for records in splits.values() for record in records}


def _texts(record: dict, role: str) -> list[str]:
    return [
        item["text"]
        for turn in record["conversations"]
        if turn["role"] == role
        for item in turn["content"]
        if item["type"] == "text"
    ]


def test_records_hold_the_scans_and_the_answers_of_the_tables(bids_dataset, built):
    _, splits = built
    records = _by_id(splits)

    sex = {record_id: r for record_id, r in records.items() if r["task_type"] == "sex"}
    # one record per session with scans: sub-02 twice; sub-03 (n/a) never answered
    assert sorted(sex) == [f"sex-sub-{s}" for s in ("01",)] + ["sex-sub-02_ses-1", "sex-sub-02_ses-2"] + [
        f"sex-sub-{s}" for s in ("04", "05", "06", "07", "08")
    ]
    assert _texts(records["sex-sub-01"], "assistant") == ["male"]
    assert _texts(records["sex-sub-02_ses-2"], "assistant") == ["female"]
    assert records["sex-sub-02_ses-2"]["metadata"]["session"] == "2"
    assert records["sex-sub-04"]["images"][0]["path"] == "sub-04/anat/sub-04_T1w.nii.gz"  # the misnamed file is not
    assert records["sex-sub-02_ses-1"]["images"] == [
        {"path": "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz", "token": "<image>", "modality": "T1w"}
    ]

    # sessions.tsv overrides participants.tsv for its session; the format string formats numbers
    assert _texts(records["age-sub-02_ses-1"], "assistant") == ["31 years"]
    assert _texts(records["age-sub-02_ses-2"], "assistant") == ["33 years"]
    assert _texts(records["age-sub-03"], "assistant") == ["47 years"]

    # two scans of one session in one record, one placeholder each, and several questions in one conversation
    both = records["t1_flair-sub-01"]
    assert [image["modality"] for image in both["images"]] == ["T1w", "FLAIR"]
    first_turn = both["conversations"][0]["content"]
    assert [item.get("image_path") for item in first_turn if item["type"] == "image"] == [
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/anat/sub-01_FLAIR.nii.gz",
    ]
    assert [turn["role"] for turn in both["conversations"]] == ["user", "assistant", "user", "assistant"]
    assert _texts(both, "assistant") == ["male", "27"]
    assert _texts(records["t1_flair-sub-03"], "assistant") == ["25"]  # the n/a question dropped, the other kept
    assert _texts(records["t1_flair-sub-04"], "assistant") == ["male"]
    assert "t1_flair-sub-07" not in records and "t1_flair-sub-02_ses-2" not in records  # no FLAIR

    # derivatives: the preprocessed scan, by a path relative to the BIDS root
    assert sorted(r for r in records if r.startswith("sex_preproc")) == [
        f"sex_preproc-sub-{s}" for s in ("01", "04", "05")
    ]
    assert records["sex_preproc-sub-04"]["images"][0]["path"] == (
        "derivatives/prep/sub-04/anat/sub-04_desc-preproc_T1w.nii.gz"
    )

    for record in records.values():
        assert all("n/a" not in text for text in _texts(record, "assistant"))
        for image in record["images"]:
            assert not Path(image["path"]).is_absolute() and (bids_dataset / image["path"]).is_file()


def test_comparisons_pair_two_subjects_of_one_split_and_answer_from_their_values(built):
    _, splits = built
    ages = {s: float(a) for s, _, a in PARTICIPANTS} | {"02": None}
    session_ages = {"1": 31.0, "2": 33.0}
    pairs = 0
    for records in splits.values():
        for record in (r for r in records if r["task_type"] == "older"):
            pairs += 1
            first, second = record["metadata"]["subjects"]
            assert first != second
            values = [
                ages[subject] if ages[subject] is not None else session_ages[session]
                for subject, session in zip(record["metadata"]["subjects"], record["metadata"]["sessions"])
            ]
            assert record["metadata"]["values"]["age"] == [f"{value:.0f}" for value in values]  # sessions.tsv read
            assert values[0] != values[1]
            assert _texts(record, "assistant") == ["first" if values[0] > values[1] else "second"]
            assert len(record["images"]) == 2
    assert pairs > 0


def test_split_is_by_subject_and_reproducible_from_the_seed(bids_dataset, questions_file, built, tmp_path):
    output_dir, splits = built
    owner = {}
    for name, records in splits.items():
        for record in records:
            for subject in _subjects(record):
                assert owner.setdefault(subject, name) == name, f"sub-{subject} is in {owner[subject]} and {name}"
    assert sorted(owner) == SUBJECTS_WITH_FILES
    summary = json.loads((output_dir / "summary.json").read_text())
    assert {name: len(subjects) for name, subjects in summary["subjects"].items()} == {
        "train": 6,
        "eval": 1,
        "test": 1,
    }
    assert summary["stratified_by"] == {"task": "sex", "column": "sex"}

    again = _build(bids_dataset, questions_file, tmp_path / "again")
    assert again == splits
    other = json.loads(
        (
            _build(bids_dataset, questions_file, tmp_path / "seed1", "--seed", "1")
            and tmp_path / "seed1" / "summary.json"
        ).read_text()
    )
    assert other["subjects"] != summary["subjects"]


def test_split_subjects_keeps_strata_in_proportion():
    subjects = [f"{i:02d}" for i in range(40)]
    labels = ["M"] * 20 + ["F"] * 20
    fractions = {"train": 0.5, "eval": 0.25, "test": 0.25}
    assignment, steps = split_subjects(subjects, labels, fractions, seed=3)
    assert all(step["stratified"] for step in steps)
    for name, size in (("train", 20), ("eval", 10), ("test", 10)):
        chosen = [label for subject, label in zip(subjects, labels) if assignment[subject] == name]
        assert len(chosen) == size and chosen.count("M") == size // 2
    assert split_subjects(subjects, labels, fractions, seed=3)[0] == assignment
    for name in fractions:  # another seed draws other subjects into every split
        other = split_subjects(subjects, labels, fractions, seed=4)[0]
        assert {s for s in subjects if other[s] == name} != {s for s in subjects if assignment[s] == name}


def test_summary_counts_records_and_every_skip_with_its_reason(built):
    output_dir, splits = built
    summary = json.loads((output_dir / "summary.json").read_text())
    totals = {task: sum(per_split.values()) for task, per_split in summary["records"].items()}
    assert totals == {
        "sex": 8,
        "age": 9,
        "t1_flair": 7,
        "older": sum(r["task_type"] == "older" for records in splits.values() for r in records),
        "sex_preproc": 3,
    }
    for task, per_split in summary["records"].items():
        for name, count in per_split.items():
            assert count == sum(r["task_type"] == task for r in splits[name])

    counts = summary["skipped_counts"]
    assert counts["sex"] == {"missing value": 1}
    assert counts["t1_flair"] == {"no image": 2, "missing value": 2}
    assert counts["sex_preproc"] == {"no image": 6}
    assert counts["(subject)"] == {"no files": 1}
    assert "age" not in counts
    skipped = {(entry["task"], entry["subject"], entry["session"]): entry for entry in summary["skipped"]}
    assert skipped[("sex", "03", None)]["reason"] == "missing value"
    assert (
        "'n/a'" in skipped[("sex", "03", None)]["detail"]
        and "participants.tsv" in skipped[("sex", "03", None)]["detail"]
    )
    assert skipped[("t1_flair", "04", None)]["reason"] == "missing value"
    assert "phenotype/cognition.tsv" in skipped[("t1_flair", "04", None)]["detail"]
    assert skipped[("t1_flair", "07", None)]["reason"] == "no image"
    assert "suffix=FLAIR" in skipped[("t1_flair", "07", None)]["detail"]
    assert skipped[("t1_flair", "02", "2")]["reason"] == "no image"
    assert skipped[(None, "09", None)]["reason"] == "no files"
    assert [entry["path"] for entry in summary["ignored_files"]] == ["sub-04/anat/sub-04_bogus_T1w.nii.gz"]
    assert "validator" in summary["ignored_files"][0]["reason"]


def _exit_message(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    return capsys.readouterr().err


def test_a_folder_that_is_not_bids_is_refused_with_the_path_and_pybids_reason(tmp_path, questions_file, capsys):
    folder = tmp_path / "not_bids"
    (folder / "sub-01" / "anat").mkdir(parents=True)
    message = _exit_message(
        capsys, ["--bids", str(folder), "--questions", str(questions_file), "--output_dir", str(tmp_path / "out")]
    )
    assert str(folder) in message and "dataset_description.json" in message
    assert not (tmp_path / "out").exists()


def test_a_value_the_answers_do_not_list_is_an_error_naming_column_value_and_subject(bids_dataset, tmp_path):
    questions = tmp_path / "questions.json"
    kind = {"task": "sex", "images": {"suffix": "T1w"}, "column": "sex", "question": "Sex?", "answers": {"M": "male"}}
    questions.write_text(json.dumps([kind]))
    with pytest.raises(ValueError, match=r"'sex' has the value 'F' for sub-02_ses-1") as raised:
        build_records(bids_dataset, questions)
    assert "participants.tsv" in str(raised.value)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ({"task": "sex", "images": {"suffix": "T1w"}, "column": "sex", "answers": {"M": "m"}}, r"'sex'.*`question`"),
        (
            {
                "task": "sex",
                "images": {"suffix": "T1w"},
                "column": "sex",
                "question": "?",
                "answers": {"M": "m"},
                "colour": 1,
            },
            r"'sex'.*unknown key `colour`",
        ),
        (
            {"task": "age", "images": {"suffix": "T1w"}, "column": "height", "question": "?", "answer": "{height}"},
            r"'age'.*'height' is not a column",
        ),
        (
            {
                "task": "t",
                "images": {"suffix": "T1w", "acq": "x"},
                "column": "sex",
                "question": "?",
                "answers": {"M": "m"},
            },
            r"'t'.*'acq' is not a recognized entity",
        ),
        (
            {
                "task": "t",
                "images": {"suffix": "T1w", "scope": "fmriprep"},
                "column": "sex",
                "question": "?",
                "answers": {"M": "m"},
            },
            r"'t'.*scope 'fmriprep' is neither 'raw' nor a folder given with --derivatives",
        ),
    ],
    ids=["missing key", "unknown key", "unknown column", "unknown entity", "unknown scope"],
)
def test_a_bad_question_file_is_an_error_naming_the_kind_and_key(bids_dataset, tmp_path, kind, expected):
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps([kind]))
    with pytest.raises(ValueError, match=expected):
        build_records(bids_dataset, questions)


def test_without_pybids_the_command_names_the_extra(bids_dataset, questions_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bids", None)  # `import bids` raises ImportError
    message = _exit_message(
        capsys, ["--bids", str(bids_dataset), "--questions", str(questions_file), "--output_dir", str(tmp_path)]
    )
    assert "pip install 'umbrella_llava[bids]'" in message


def test_the_stock_trainer_trains_on_the_records_read_against_the_bids_root(
    bids_dataset, built, tiny_processor, tokenizer, tmp_path
):
    from transformers import Trainer, TrainingArguments

    from umbrella_llava import UmbrellaLlavaForConditionalGeneration
    from umbrella_llava.data import ConversationDataset, UmbrellaCollator

    output_dir, splits = built
    datasets = {
        name: ConversationDataset(output_dir / f"{name}.jsonl", tiny_processor, image_root=bids_dataset)
        for name in splits
    }
    assert {name: len(dataset) for name, dataset in datasets.items()} == {name: len(r) for name, r in splits.items()}
    assert set(datasets["train"].task_types) == {"sex", "age", "t1_flair", "older", "sex_preproc"}

    torch.manual_seed(0)
    model = UmbrellaLlavaForConditionalGeneration(tiny_config(tokenizer))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[], dataloader_pin_memory=False
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=datasets["train"], data_collator=UmbrellaCollator(tiny_processor)
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))


def test_umbrella_evaluate_reads_the_built_test_split(bids_dataset, built, tiny_processor, tokenizer, tmp_path):
    """Issue 18's harness on records this command built: one question per assistant turn, metrics per task kind."""
    from umbrella_llava import UmbrellaLlavaForConditionalGeneration
    from umbrella_llava.cli import evaluate_main
    from umbrella_llava.report import read_predictions

    output_dir, splits = built
    torch.manual_seed(0)
    checkpoint = tmp_path / "model"
    UmbrellaLlavaForConditionalGeneration(tiny_config(tokenizer)).save_pretrained(checkpoint)
    tiny_processor.save_pretrained(checkpoint)
    data = output_dir / "train.jsonl"  # the largest split: every task kind is in it
    out = tmp_path / "eval"
    args = ["--model", str(checkpoint), "--data", str(data), "--image_root", str(bids_dataset)]
    evaluate_main([*args, "--output_dir", str(out), "--max_new_tokens", "2", "--bootstrap", "20"])

    predictions = read_predictions(out / "predictions.jsonl")
    turns = sum(len(_texts(record, "assistant")) for record in splits["train"])
    assert len(predictions) == turns
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {record["task_type"] for record in splits["train"]}
    assert metrics["tasks"]["age"]["kind"] == "numeric" and metrics["tasks"]["sex"]["kind"] == "categorical"
    assert (out / "report.md").is_file()


@pytest.mark.slow
def test_the_script_of_a_clone_writes_the_same_records(bids_dataset, questions_file, built, tmp_path):
    import subprocess

    from conftest import REPO_ROOT

    output_dir, splits = built
    argv = ["--bids", str(bids_dataset), "--questions", str(questions_file), "--output_dir", str(tmp_path)]
    script = REPO_ROOT / "scripts" / "build_records.py"
    result = subprocess.run(
        [sys.executable, str(script), *argv, "--derivatives", "prep"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    for name in splits:
        assert (tmp_path / f"{name}.jsonl").read_text() == (output_dir / f"{name}.jsonl").read_text()


def test_the_documented_question_files_parse():
    import re

    import yaml
    from conftest import REPO_ROOT

    from umbrella_llava import bids_questions

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("### BIDS datasets → records") :]
    docstring = bids_questions.__doc__
    for text in (section, docstring):
        example = re.search(r"```yaml\n(.*?)```", text, re.DOTALL).group(1)
        kinds = bids_questions.parse_questions(yaml.safe_load(example))
        assert [kind.compare for kind in kinds if kind.compare] == ["greater"]
        assert any(len(kind.images) == 2 and len(kind.turns) == 2 for kind in kinds)


def test_push_to_hub_shares_every_split_as_a_nifti_dataset(bids_dataset, questions_file, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    pushed = []
    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", lambda self, repo, **kw: pushed.append((self, repo, kw)))
    splits = _build(bids_dataset, questions_file, tmp_path / "out", "--push_to_hub", "lab/brains", "--private")
    ((dataset, repo, options),) = pushed
    assert repo == "lab/brains" and options == {"private": True}
    assert set(dataset) == {name for name, records in splits.items() if records}
    for name, records in splits.items():
        if not records:
            continue
        assert dataset[name]["id"] == [record["task_id"] for record in records]
        assert isinstance(dataset[name].features["images"].feature, datasets.Nifti)
        first = dataset[name][0]["images"][0]  # decoded from the BIDS file the record names
        assert first.shape[:3] == nib.load(bids_dataset / records[0]["images"][0]["path"]).shape[:3]
