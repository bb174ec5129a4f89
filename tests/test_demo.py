"""The demo end to end, with a reduced step count: data from real brains, training, metrics, save, reload, plots."""

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

pytest.importorskip("nilearn")


@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_everything(tmp_path):
    output_dir = tmp_path / "demo"
    args = ["--output_dir", str(output_dir), "--max_steps", "6", "--batch_size", "4"]
    args += ["--train_records", "24", "--eval_records", "6", "--volumes_per_tissue", "2"]
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"tissue", "side", "compare"}
    for question, chance in (("tissue", 1 / 3), ("side", 1 / 2), ("compare", 1 / 2)):
        row = metrics["accuracy"][question]
        assert row["total"] == 2 and 0.0 <= row["accuracy"] <= 1.0
        assert row["chance"] == pytest.approx(chance)
        # scored by umbrella-evaluate's code: the interval and the whole evaluation, report beside it
        assert row["ci95"] is None or row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
        assert metrics["evaluation"]["tasks"][question]["accuracy"]["value"] == row["accuracy"]
        assert (output_dir / "evaluation" / f"confusion_{question}.png").is_file()
    assert "| categorical task | n | accuracy |" in (output_dir / "evaluation" / "report.md").read_text()
    assert metrics["train"]["steps"] == 6
    assert isinstance(metrics["reload"]["answer"], str)

    records = [json.loads(line) for line in (output_dir / "data" / "train.jsonl").read_text().splitlines()]
    assert len(records) == 24 and {r["task_type"] for r in records} == {"T1", "T3"}
    assert all((output_dir / "data" / image["path"]).exists() for r in records for image in r["images"])

    model_dir = output_dir / "model"
    for name in ("config.json", "model.safetensors", "modeling_umbrella_llava.py", "processor_config.json"):
        assert (model_dir / name).exists(), name
    card = (model_dir / "README.md").read_text()
    assert "trust_remote_code=True" in card and "library_name: transformers" in card
    for picture in ("loss_curve.png", "preview.png"):
        data = (output_dir / picture).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000, picture
