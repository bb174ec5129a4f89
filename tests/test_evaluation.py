"""Evaluation you can publish: metrics against scikit-learn and scipy, the bootstrap, the report, `umbrella-evaluate`
end to end on a tiny saved model, `umbrella-train --generation_metrics`, the model card's table, and bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from test_train_script import run_inputs, single_volume_record, subprocess_env, train_args, write_jsonl  # noqa: F401

from umbrella_llava.metrics import (
    OTHER_ANSWER,
    bootstrap_scores,
    categorical_metrics,
    compute_metrics,
    free_text_metrics,
    is_number,
    numeric_metrics,
    parse_number,
    task_kind,
)

sklearn_metrics = pytest.importorskip("sklearn.metrics")
scipy_stats = pytest.importorskip("scipy.stats")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")


# ---------------------------------------------------------------------------------------------------------------------
# Reading answers and task kinds
# ---------------------------------------------------------------------------------------------------------------------


def test_a_numeric_answer_is_its_first_number():
    assert parse_number("about 42.5 years, maybe 43") == 42.5
    assert parse_number("-3") == -3.0 and parse_number(".5") == 0.5 and parse_number("1e2") == 100.0
    assert parse_number("no idea") is None and parse_number("") is None
    assert is_number(" 42. ") and is_number("-1.5") and not is_number("42 years") and not is_number("yes")


def test_task_kind_reads_the_references():
    assert task_kind(["42", "67.5", "-3"]) == ("numeric", False)
    assert task_kind(["Yes.", "no", "yes"]) == ("categorical", False)
    assert task_kind(["42", "unknown", "7"]) == ("categorical", True)  # mixed: categorical, and said so
    sentences = [f"There is a lesion number {i} in the left frontal lobe." for i in range(3)]
    assert task_kind(sentences)[0] == "free_text"
    assert task_kind([f"answer{i}" for i in range(30)])[0] == "free_text"  # more classes than MAX_CLASSES
    assert task_kind(["25 years", "31 years.", "47  Years"]) == ("numeric", False)  # one shared unit
    assert task_kind(["25 years", "31 months"]) == ("categorical", True)  # two units are not one scale
    assert task_kind(["T1", "T2", "T1"]) == ("categorical", False)  # a name with a digit is not a number


# ---------------------------------------------------------------------------------------------------------------------
# Metrics against scikit-learn and scipy
# ---------------------------------------------------------------------------------------------------------------------

REFERENCES = ["yes", "no", "yes", "maybe", "no", "yes", "yes", "no"]
PREDICTIONS = ["Yes.", "yes", "yes", "no", "No", "perhaps", "YES", "no"]


def test_categorical_metrics_are_scikit_learns():
    metrics = categorical_metrics(REFERENCES, PREDICTIONS, n_resamples=0)
    normalised = ["yes", "yes", "yes", "no", "no", "perhaps", "yes", "no"]
    classes = ["maybe", "no", "yes"]
    assert metrics["n"] == 8
    assert metrics["accuracy"] == {"value": sklearn_metrics.accuracy_score(REFERENCES, normalised), "ci95": None}
    assert metrics["balanced_accuracy"]["value"] == pytest.approx(
        sklearn_metrics.balanced_accuracy_score(REFERENCES, normalised)
    )
    assert metrics["macro_f1"]["value"] == pytest.approx(
        sklearn_metrics.f1_score(REFERENCES, normalised, labels=classes, average="macro", zero_division=0)
    )
    assert metrics["reference_counts"] == {"yes": 4, "no": 3, "maybe": 1}
    assert metrics["prediction_counts"] == {"yes": 4, "no": 3, "perhaps": 1}
    majority = ["yes"] * 8
    assert metrics["majority_baseline"] == {
        "answer": "yes",
        "accuracy": 0.5,
        "balanced_accuracy": pytest.approx(sklearn_metrics.balanced_accuracy_score(REFERENCES, majority)),
        "macro_f1": pytest.approx(
            sklearn_metrics.f1_score(REFERENCES, majority, labels=classes, average="macro", zero_division=0)
        ),
    }
    # Square: the invented answer "perhaps" is a column (and an empty row) of its own.
    assert metrics["confusion_matrix"]["labels"] == [*classes, OTHER_ANSWER]
    assert metrics["confusion_matrix"]["matrix"] == [[0, 1, 0, 0], [0, 2, 1, 0], [0, 0, 3, 1], [0, 0, 0, 0]]


def test_a_one_class_task_and_an_empty_task():
    truth, guess = ["yes"] * 5, ["yes", "yes", "no", "yes", "no"]
    one_class = categorical_metrics(truth, guess, n_resamples=50)
    assert one_class["accuracy"]["value"] == sklearn_metrics.accuracy_score(truth, guess) == 0.6
    # one reference class: balanced accuracy is its recall, macro F1 its F1 (as scikit-learn computes them)
    assert one_class["balanced_accuracy"]["value"] == pytest.approx(
        sklearn_metrics.balanced_accuracy_score(truth, guess)
    )
    assert one_class["macro_f1"]["value"] == pytest.approx(
        sklearn_metrics.f1_score(truth, guess, labels=["yes"], average="macro")
    )
    assert one_class["majority_baseline"]["accuracy"] == 1.0

    for metrics in (categorical_metrics([], []), numeric_metrics([], []), free_text_metrics([], [])):
        assert metrics["n"] == 0
        scores = [value for value in metrics.values() if isinstance(value, dict) and "ci95" in value]
        assert scores and all(score == {"value": None, "ci95": None} for score in scores)


def test_numeric_metrics_are_scikit_learns_and_scipys_and_count_answers_without_a_number():
    references = ["42", "67", "30", "55", "71"]
    predictions = ["about 40 years", "70", "unknown", "50.5", "-3"]
    metrics = numeric_metrics(references, predictions, n_resamples=0)
    truth, guess = [42, 67, 55, 71], [40, 70, 50.5, -3]
    assert (metrics["n"], metrics["parsed"], metrics["unparsed"]) == (5, 4, 1)
    assert metrics["mae"]["value"] == pytest.approx(sklearn_metrics.mean_absolute_error(truth, guess))
    assert metrics["rmse"]["value"] == pytest.approx(sklearn_metrics.mean_squared_error(truth, guess) ** 0.5)
    assert metrics["pearson_r"]["value"] == pytest.approx(scipy_stats.pearsonr(truth, guess).statistic)
    assert metrics["pairs"][2] == [30.0, None]
    constant = numeric_metrics(["1", "2", "3"], ["5", "5", "5"], n_resamples=20)
    assert constant["pearson_r"] == {"value": None, "ci95": None}  # undefined, not NaN


def test_free_text_metrics_are_exact_match_and_rouge_scores():
    references = ["A lesion in the left frontal lobe.", "No abnormality.", "Enlarged ventricles."]
    predictions = ["a lesion in the LEFT frontal lobe", "There is no abnormality", "Small ventricles."]
    metrics = free_text_metrics(references, predictions, n_resamples=0)
    assert metrics["exact_match"]["value"] == pytest.approx(1 / 3)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = np.mean([scorer.score(r, p)["rougeL"].fmeasure for r, p in zip(references, predictions)])
    assert metrics["rouge_l_f1"]["value"] == pytest.approx(expected)


def test_compute_metrics_groups_by_task_and_counts_empty_and_cut_off_answers():
    rows = [
        {"task": "sex", "reference": "female", "prediction": "female"},
        {"task": "sex", "reference": "male", "prediction": "", "truncated": False},
        {"task": "age", "reference": "42", "prediction": "42 42 42 42", "truncated": True},
        {"task": None, "reference": "yes", "prediction": "Yes"},
    ]
    metrics = compute_metrics(rows, n_resamples=0)
    assert list(metrics["tasks"]) == ["age", "sex", "untyped"]
    assert metrics["tasks"]["age"]["kind"] == "numeric" and metrics["tasks"]["sex"]["kind"] == "categorical"
    assert (metrics["tasks"]["sex"]["empty"], metrics["tasks"]["age"]["truncated"]) == (1, 1)
    assert metrics["overall"]["n"] == 4 and metrics["overall"]["exact_match"]["value"] == 0.5
    forced = compute_metrics(rows, n_resamples=0, task_kinds={"age": "categorical"})
    assert forced["tasks"]["age"]["kind"] == "categorical"
    with pytest.raises(ValueError, match="kind 'numbers' is not one of"):
        compute_metrics(rows, task_kinds={"age": "numbers"})


# ---------------------------------------------------------------------------------------------------------------------
# The bootstrap
# ---------------------------------------------------------------------------------------------------------------------


def _accuracy_interval(n: int, seed: int) -> tuple[float, list[float]]:
    correct = np.arange(n) % 4 != 0  # 75 % right, spread evenly
    score = bootstrap_scores(
        lambda i: [correct[i].mean()], n, ["accuracy"], n_resamples=500, rng=np.random.default_rng(seed)
    )["accuracy"]
    return score["value"], score["ci95"]


def test_the_bootstrap_interval_holds_the_value_narrows_with_more_data_and_follows_the_seed():
    value, (low, high) = _accuracy_interval(40, seed=0)
    assert value == 0.75 and low <= value <= high and low < high
    _, (low_more, high_more) = _accuracy_interval(640, seed=0)
    assert high_more - low_more < (high - low) / 2  # 16 times the data: about a quarter of the width
    assert _accuracy_interval(40, seed=0) == _accuracy_interval(40, seed=0)
    assert _accuracy_interval(40, seed=1) != _accuracy_interval(40, seed=0)

    rows = [{"task": "t", "reference": r, "prediction": p} for r, p in zip(REFERENCES * 3, PREDICTIONS * 3)]
    first = compute_metrics(rows, n_resamples=200, seed=3)
    assert first == compute_metrics(rows, n_resamples=200, seed=3)
    assert first != compute_metrics(rows, n_resamples=200, seed=4)
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        score = first["tasks"]["t"][name]
        assert score["ci95"][0] <= score["value"] <= score["ci95"][1], name


# ---------------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------------


def test_the_report_has_the_tables_the_pictures_and_says_what_the_numbers_cannot(tmp_path):
    from umbrella_llava.report import metrics_table, write_evaluation

    rows = [{"task": "sex", "reference": r, "prediction": p} for r, p in zip(["female", "male"] * 6, ["female"] * 12)]
    rows += [
        {"task": "age", "reference": str(a), "prediction": f"{a + d} years"}
        for a, d in zip(range(40, 52), range(-6, 6))
    ]
    rows += [{"task": "lesion", "reference": r, "prediction": ""} for r in ("3", "small", "none")]
    rows += [{"task": "loops", "reference": "yes", "prediction": "yes yes yes", "truncated": True}] * 2
    metrics = {"generation": {"max_new_tokens": 4}, **compute_metrics(rows, n_resamples=100)}
    write_evaluation(tmp_path, rows, metrics)

    report = (tmp_path / "report.md").read_text()
    assert "| categorical task | n | accuracy | balanced accuracy | macro F1 |" in report
    assert "| numeric task | n | MAE | RMSE | Pearson r | no number |" in report
    assert "lesion ¹" in report and "mix numbers and words, so it is scored as categorical" in report
    assert "lesion: all 3 answers are empty" in report
    assert "loops: all 2 answers were cut off at max_new_tokens=4" in report
    sex = metrics["tasks"]["sex"]
    assert f"| sex | 12 | 0.50 [{sex['accuracy']['ci95'][0]:.2f}, {sex['accuracy']['ci95'][1]:.2f}] |" in report
    for picture in ("confusion_sex.png", "confusion_lesion.png", "scatter_age.png"):
        assert f"]({picture})" in report
        assert (tmp_path / picture).read_bytes().startswith(b"\x89PNG") and (tmp_path / picture).stat().st_size > 5000
    assert json.loads((tmp_path / "metrics.json").read_text())["tasks"] == json.loads(json.dumps(metrics["tasks"]))
    assert metrics_table(metrics) in report


# ---------------------------------------------------------------------------------------------------------------------
# umbrella-evaluate end to end
# ---------------------------------------------------------------------------------------------------------------------


def age_record(index: int, volume: str, age: str, follow_up: str | None = None) -> dict:
    turns = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How old is this subject?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": age}]},
    ]
    if follow_up is not None:
        turns += [{"role": "user", "content": "And in ten years?"}, {"role": "assistant", "content": follow_up}]
    return {"task_id": f"age-{index}", "task_type": "age", "images": [{"path": volume}], "conversations": turns}


def multi_turn_record(index: int, first: str, second: str) -> dict:
    """Two volumes, a question about the first, then one about both: the first question sees one volume."""
    return {
        "task_id": f"T2-{index}",
        "task_type": "T2",
        "images": [{"path": first}, {"path": second}],
        "conversations": [
            {"role": "user", "content": "<image>\nIs this a T1-weighted scan?"},
            {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": "<image>\nAnd this one?"},
            {"role": "assistant", "content": "No."},
        ],
    }


NO_ANSWER = {"id": "no-answer", "conversations": [{"from": "human", "value": "Say nothing."}]}


@pytest.fixture
def evaluation_data(run_inputs):  # noqa: F811
    records = [
        single_volume_record(0, "t1.nii.gz", "Yes."),
        multi_turn_record(0, "t1.nii.gz", "gm.nii.gz"),
        age_record(0, "t1.nii.gz", "42", follow_up="52"),
        NO_ANSWER,
        single_volume_record(1, "wm.nii.gz", "No."),
        age_record(1, "gm.nii.gz", "67"),
    ]
    return write_jsonl(run_inputs["root"] / "evaluate.jsonl", records)


def test_umbrella_evaluate_asks_every_assistant_turn_and_writes_reproducible_metrics(
    run_inputs,  # noqa: F811
    evaluation_data,
    tmp_path,
):
    from umbrella_llava.cli import evaluate_main
    from umbrella_llava.report import data_sha256, package_version, read_predictions

    output_dir = tmp_path / "eval"
    evaluate_main(
        [
            "--model",
            str(run_inputs["checkpoint"]),
            "--data",
            str(evaluation_data),
            "--output_dir",
            str(output_dir),
            "--batch_size",
            "3",
            "--max_new_tokens",
            "3",
            "--bootstrap",
            "50",
            "--seed",
            "1",
            "--generate_kwargs",
            '{"repetition_penalty": 1.1}',
        ]  # fmt: skip
    )

    predictions = read_predictions(output_dir / "predictions.jsonl")
    assert [(p["record"], p["turn"]) for p in predictions] == [
        ("t1-0", 1), ("T2-0", 1), ("T2-0", 3), ("age-0", 1), ("age-0", 3), ("t1-1", 1), ("age-1", 1),
    ]  # fmt: skip
    assert [p["reference"] for p in predictions] == ["Yes.", "Yes.", "No.", "42", "52", "No.", "67"]
    assert {p["task"] for p in predictions} == {"T1", "T2", "age"}
    assert predictions[2]["prompt"].count("<image>") == 2 and predictions[1]["prompt"].count("<image>") == 1
    assert all(set(p) >= {"record", "turn", "task", "reference", "prediction", "truncated"} for p in predictions)

    metrics = json.loads((output_dir / "metrics.json").read_text())
    recomputed = compute_metrics(predictions, n_resamples=50, seed=1)
    assert {"tasks": metrics["tasks"], "overall": metrics["overall"]} == json.loads(json.dumps(recomputed))
    assert metrics["tasks"]["age"]["kind"] == "numeric" and metrics["tasks"]["T2"]["kind"] == "categorical"
    assert metrics["tasks"]["T2"]["n"] == 2 and metrics["overall"]["n"] == 7
    assert metrics["skipped_records"]["by_reason"] == {"no assistant turn": 1}
    assert metrics["data"]["sha256"] == data_sha256(evaluation_data) and len(metrics["data"]["sha256"]) == 64
    assert metrics["model"] == str(run_inputs["checkpoint"]) and metrics["package_version"] == package_version()
    assert metrics["generation"] == {"max_new_tokens": 3, "do_sample": False, "repetition_penalty": 1.1}

    report = (output_dir / "report.md").read_text()
    assert "| T2 | 2 |" in report and "1 record was skipped (no assistant turn: 1)" in report
    assert (output_dir / "confusion_T1.png").is_file() and (output_dir / "confusion_T2.png").is_file()
    # A random tiny model never stops within 3 tokens: the report says so instead of only showing 0 %.
    truncated = metrics["tasks"]["T1"]["truncated"]
    assert truncated == sum(p["truncated"] for p in predictions if p["task"] == "T1")
    if truncated == 2:
        assert "T1: all 2 answers" in report and "cut off at max_new_tokens=3" in report


def test_metrics_json_is_recomputed_from_predictions_jsonl(
    run_inputs,  # noqa: F811
    evaluation_data,
    tokenizer,
    tmp_path,
    monkeypatch,
):
    """With answers that are partly right (so that every interval depends on its resamples), `metrics.json` is what
    `compute_metrics` gives on `predictions.jsonl` with the recorded seed and resamples."""
    from umbrella_llava import UmbrellaLlavaForConditionalGeneration
    from umbrella_llava.cli import evaluate_main
    from umbrella_llava.report import read_predictions

    # In question order; the references are Yes., Yes., No., 42, 52, No., 67.
    texts = iter(["Yes.", "No.", "No.", "40 years", "52", "Yes.", "67"])

    def answers(model, input_ids, max_new_tokens, **kwargs):
        rows = [tokenizer.encode(next(texts) + "<|im_end|>") for _ in input_ids]
        width = max(map(len, rows))
        rows = [row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)

    monkeypatch.setattr(UmbrellaLlavaForConditionalGeneration, "generate", answers)
    output_dir = tmp_path / "eval"
    evaluate_main(
        [
            "--model",
            str(run_inputs["checkpoint"]),
            "--data",
            str(evaluation_data),
            "--output_dir",
            str(output_dir),
            "--batch_size",
            "2",
            "--bootstrap",
            "100",
            "--seed",
            "5",
        ]  # fmt: skip
    )
    predictions = read_predictions(output_dir / "predictions.jsonl")
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert 0 < metrics["overall"]["exact_match"]["value"] < 1 and metrics["tasks"]["age"]["parsed"] > 0
    assert metrics["bootstrap"]["resamples"] == 100 and metrics["bootstrap"]["seed"] == 5
    recomputed = compute_metrics(predictions, n_resamples=100, seed=5)
    assert {"tasks": metrics["tasks"], "overall": metrics["overall"]} == json.loads(json.dumps(recomputed))
    assert (output_dir / "scatter_age.png").is_file() and "![age: predicted against reference]" in (
        output_dir / "report.md"
    ).read_text()


class AnswersAtMost(torch.nn.Module):
    """Stands in for the model: 'generates' the first `max_new_tokens` tokens of "Yes.<|im_end|>"."""

    def __init__(self, tokenizer):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answer = torch.tensor(tokenizer.encode("Yes.<|im_end|>", add_special_tokens=False))

    def generate(self, input_ids, max_new_tokens, **kwargs):
        return torch.cat([input_ids, self.answer[:max_new_tokens].expand(input_ids.shape[0], -1)], dim=1)


def test_an_answer_that_reaches_max_new_tokens_without_ending_is_marked_cut_off(run_inputs, tiny_processor):  # noqa: F811
    from umbrella_llava.data import ConversationDataset
    from umbrella_llava.evaluation import evaluate_generation

    dataset = ConversationDataset(run_inputs["eval"], tiny_processor)
    model = AnswersAtMost(tiny_processor.tokenizer)
    ended = len(model.answer)
    whole = evaluate_generation(model, tiny_processor, dataset, max_new_tokens=ended + 2)["results"]
    assert [(r["truncated"], r["new_tokens"]) for r in whole] == [(False, ended)] * 3
    cut = evaluate_generation(model, tiny_processor, dataset, max_new_tokens=ended - 1)["results"]
    assert [(r["truncated"], r["new_tokens"], r["prediction"]) for r in cut] == [(True, ended - 1, "Yes.")] * 3


def test_the_evaluate_script_runs_in_a_fresh_process(run_inputs, evaluation_data, tmp_path):  # noqa: F811
    script = REPO_ROOT / "scripts" / "evaluate.py"
    args = ["--model", str(run_inputs["checkpoint"]), "--data", str(evaluation_data), "--output_dir", str(tmp_path)]
    result = subprocess.run(
        [sys.executable, str(script), *args, "--max_new_tokens", "2", "--bootstrap", "0"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "7 questions" in result.stderr and (tmp_path / "report.md").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--generate_kwargs", "{num_beams: 2}"], "--generate_kwargs is not valid JSON"),
        (["--generate_kwargs", "[1]"], "--generate_kwargs must be a JSON object"),
        (["--generate_kwargs", '{"num_return_sequences": 2}'], "num_return_sequences must be 1"),
        (["--task_kind", "age=number"], "--task_kind takes TASK=KIND"),
    ],
    ids=["not-json", "not-object", "several-answers", "bad-kind"],
)
def test_bad_evaluate_flags_exit_with_the_reason(run_inputs, evaluation_data, tmp_path, capsys, extra, message):  # noqa: F811
    from umbrella_llava.cli import evaluate_main

    args = ["--model", str(run_inputs["checkpoint"]), "--data", str(evaluation_data), "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main([*args, "--max_new_tokens", "1", "--bootstrap", "0", *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_an_invalid_record_stops_the_evaluation_naming_it(run_inputs, tmp_path, capsys):  # noqa: F811
    from umbrella_llava.cli import evaluate_main

    data = write_jsonl(tmp_path / "bad.jsonl", [single_volume_record(0, "t1.nii.gz", "Yes."),
                                                single_volume_record(1, "missing.nii.gz", "No.")])  # fmt: skip
    shutil.copy(run_inputs["root"] / "t1.nii.gz", tmp_path / "t1.nii.gz")
    args = ["--model", str(run_inputs["checkpoint"]), "--data", str(data), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        evaluate_main(args)
    assert "1 invalid records" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_package_imports_without_the_eval_extra():
    # transformers itself may import scikit-learn and scipy when they are installed (5.17's generation utilities do);
    # what is checked is that the package's own modules import none of the eval extra beyond that.
    code = (
        "import sys, transformers, transformers.generation.utils, transformers.trainer\n"
        "EXTRA = ('sklearn', 'scipy.stats', 'rouge_score')\n"
        "before = {m for m in EXTRA if m in sys.modules}\n"
        "import umbrella_llava, umbrella_llava.evaluation, umbrella_llava.training, umbrella_llava.hub, "
        "umbrella_llava.cli, umbrella_llava.metrics, umbrella_llava.report\n"
        "print(sorted(m for m in EXTRA if m in sys.modules and m not in before))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_without_the_eval_extra_the_metrics_and_the_command_name_the_install(
    run_inputs,  # noqa: F811
    evaluation_data,
    tmp_path,
    monkeypatch,
    capsys,
):
    from umbrella_llava.cli import evaluate_main

    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` now raises ImportError
    with pytest.raises(
        ImportError, match=r"need scikit-learn, which is not installed: pip install umbrella_llava\[eval\]"
    ):
        compute_metrics([{"task": "t", "reference": "a", "prediction": "a"}])
    args = ["--model", str(run_inputs["checkpoint"]), "--data", str(evaluation_data), "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit):
        evaluate_main(args)
    assert "pip install umbrella_llava[eval]" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# During training, and on the model card
# ---------------------------------------------------------------------------------------------------------------------


def test_generation_metrics_are_logged_at_each_evaluation_and_written_with_the_model(run_inputs, tmp_path):  # noqa: F811
    from umbrella_llava.training import main

    output_dir = tmp_path / "run"
    args = train_args(
        run_inputs, output_dir, "--train_mode", "embedder", "--max_steps", "2", "--save_strategy", "no",
        "--eval_strategy", "steps", "--eval_steps", "1", "--generation_metrics", "--generation_bootstrap", "20",
        "--generation_max_new_tokens", "3", eval_data=True,
    )  # fmt: skip
    trainer = main(args)

    logged = [entry for entry in trainer.state.log_history if "eval_T1_accuracy" in entry]
    # at the Trainer's evaluations (steps 1 and 2, beside the eval loss) and once more after training
    assert [entry["step"] for entry in logged] == [1, 2, 2]
    for entry in logged:
        for name in ("eval_T1_balanced_accuracy", "eval_T1_macro_f1", "eval_T2_accuracy", "eval_overall_exact_match",
                     "eval_T1_truncated", "eval_accuracy_T1"):  # fmt: skip
            assert name in entry, name
    assert any("eval_loss" in entry and entry["step"] == 1 for entry in trainer.state.log_history)

    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"T1", "T2"} and metrics["overall"]["n"] == 3
    assert metrics["global_step"] == 2 and metrics["model"] == str(output_dir)
    assert metrics["tasks"]["T1"]["accuracy"]["value"] == logged[-1]["eval_T1_accuracy"]
    card = (output_dir / "README.md").read_text()
    assert "## Evaluation" in card and "| categorical task | n | accuracy |" in card and "| T1 | 2 |" in card


def test_generation_metrics_need_eval_data(run_inputs, tmp_path):  # noqa: F811
    from umbrella_llava.training import main

    with pytest.raises(ValueError, match="--generation_metrics .* pass --eval_data"):
        main(train_args(run_inputs, tmp_path, "--generation_metrics", "--max_steps", "1"))


def test_the_model_card_shows_the_evaluation_table_of_the_checkpoint(run_inputs, tmp_path):  # noqa: F811
    from umbrella_llava.hub import render_model_card, select_upload_files
    from umbrella_llava.report import evaluation_provenance

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(run_inputs["checkpoint"], checkpoint)
    without = render_model_card(checkpoint, "me/x").text
    assert "## Evaluation" not in without

    rows = [{"task": "sex", "reference": r, "prediction": p} for r, p in zip(["female", "male"] * 4, ["female"] * 8)]
    metrics = evaluation_provenance(checkpoint, run_inputs["eval"], {"max_new_tokens": 8}, 100, 0)
    metrics |= compute_metrics(rows, n_resamples=100)
    (checkpoint / "metrics.json").write_text(json.dumps(metrics))
    card = render_model_card(checkpoint, "me/x").text
    assert "## Evaluation" in card and "8 held-out questions from `eval.jsonl` (SHA-256" in card
    assert "| sex | 8 | 0.50 [" in card and "{{" not in card
    assert "metrics.json" in select_upload_files(checkpoint)
