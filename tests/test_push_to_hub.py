"""Sharing a checkpoint: the exact files of the one commit (Hub client mocked), the dry run, the card, bad input."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_without_package
from huggingface_hub import HfApi, ModelCard
from test_conversion import VOLUME, save_stock_llava

from umbrella_llava.conversion import convert_llava_checkpoint
from umbrella_llava.hub import CheckpointError, render_model_card, validate_checkpoint

SCRIPT = REPO_ROOT / "scripts" / "push_to_hub.py"
BASE_ID = "llava-hf/llava-interleave-qwen-0.5b-hf"
# A converted checkpoint holds exactly these; a Trainer checkpoint adds state that must stay behind.
MODEL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "configuration_umbrella_llava.py",
    "modeling_umbrella_llava.py",
    "processing_umbrella_llava.py",
    "image_processing_umbrella_llava.py",
    "dicom_series.py",
    "pipeline_umbrella_llava.py",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}
TRAINER_STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A converted tiny checkpoint that records a Hub base id, with Trainer state and an old README beside it."""
    root = tmp_path_factory.mktemp("push")
    save_stock_llava(root / "stock", tokenizer)
    folder = convert_llava_checkpoint(root / "stock", root / "checkpoint", **VOLUME)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "converted_from": BASE_ID}, indent=2))
    for name in TRAINER_STATE_FILES:
        (folder / name).write_bytes(b"trainer state")
    (folder / "README.md").write_text("stale card")
    return folder


class RecordingHub:
    """Stands in for the Hub: records create_repo and create_commit calls instead of sending anything."""

    def __init__(self, monkeypatch):
        self.repos, self.commits = [], []
        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kwargs: self.repos.append((repo_id, kwargs)))
        monkeypatch.setattr(HfApi, "create_commit", lambda api, **kwargs: self._commit(**kwargs))
        monkeypatch.setattr(HfApi, "upload_folder", lambda *a, **k: pytest.fail("upload in one create_commit"))

    def _commit(self, repo_id, operations, commit_message, **kwargs):
        files = {}
        for operation in operations:
            with operation.as_file() as source:
                files[operation.path_in_repo] = source.read()
        self.commits.append({"repo_id": repo_id, "message": commit_message, "files": files, **kwargs})

        class CommitInfo:
            commit_url = f"https://huggingface.co/{repo_id}/commit/0"

        return CommitInfo()


def run_script(*args: str) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from push_to_hub import main
    finally:
        sys.path.remove(str(SCRIPT.parent))
    main(list(args))


def test_push_sends_model_processor_code_and_card_in_one_commit(checkpoint, monkeypatch):
    hub = RecordingHub(monkeypatch)
    run_script("--checkpoint", str(checkpoint), "--repo_id", "me/umbrella-tiny", "--private", "--commit_message", "v1")

    assert hub.repos == [("me/umbrella-tiny", {"private": True, "exist_ok": True, "repo_type": "model"})]
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["repo_id"] == "me/umbrella-tiny" and commit["message"] == "v1"
    assert set(commit["files"]) == MODEL_FILES | {"README.md"}
    for name in MODEL_FILES:
        assert commit["files"][name] == (checkpoint / name).read_bytes(), name
    card = ModelCard(commit["files"]["README.md"].decode())
    assert card.data.base_model == BASE_ID
    assert 'model_id = "me/umbrella-tiny"' in card.text


def test_dry_run_writes_exactly_what_the_commit_sends(checkpoint, monkeypatch, tmp_path):
    hub = RecordingHub(monkeypatch)
    run_script("--checkpoint", str(checkpoint), "--repo_id", "me/umbrella-tiny")
    sent = hub.commits[0]["files"]

    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("a dry run contacted the Hub"))
    monkeypatch.setattr(HfApi, "create_commit", lambda *a, **k: pytest.fail("a dry run contacted the Hub"))
    run_script(
        "--checkpoint", str(checkpoint), "--repo_id", "me/umbrella-tiny", "--dry_run", "--output_dir", str(tmp_path)
    )
    written = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert written == sent


def test_card_metadata_and_body_follow_the_config(checkpoint):
    card = render_model_card(checkpoint, "me/umbrella-tiny", license="cc-by-nc-4.0")
    metadata = card.data.to_dict()
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-text-to-text"
    assert {"custom_code", "medical", "mri", "3d"} <= set(metadata["tags"])
    assert metadata["license"] == "cc-by-nc-4.0"
    assert metadata["base_model"] == BASE_ID
    # YAML front matter parses on its own as well.
    import yaml

    front_matter = yaml.safe_load(str(card).split("---")[1])
    assert front_matter["pipeline_tag"] == "image-text-to-text" and front_matter["base_model"] == BASE_ID

    text = card.text
    assert "| Volume size (H, W, D), voxels | 32 × 32 × 16 |" in text
    assert "| 3-D patch (H, W, D), voxels | 8 × 8 × 8 |" in text
    assert "| Tokens per volume | 32 |" in text
    assert "--volume_size 32 32 16 --patch_size 8 8 8" in text
    assert "trust_remote_code=True" in text and "UMBRELLA" in text and "--train_mode" in text
    assert "{{" not in text and "{%" not in text


def test_base_model_flag_and_local_record(checkpoint, tmp_path):
    assert render_model_card(checkpoint, base_model="Qwen/Qwen2-0.5B").data.base_model == "Qwen/Qwen2-0.5B"
    with pytest.raises(ValueError, match="not a Hub model id"):
        render_model_card(checkpoint, base_model="/local/folder")
    local = tmp_path / "local"
    shutil.copytree(checkpoint, local)
    config = json.loads((local / "config.json").read_text())
    (local / "config.json").write_text(json.dumps({**config, "converted_from": str(tmp_path / "stock")}))
    assert render_model_card(local, "me/x").data.base_model is None  # a folder path is no Hub id


def test_incomplete_checkpoint_is_refused_naming_every_missing_piece(checkpoint, tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    removed = (
        "modeling_umbrella_llava.py",
        "pipeline_umbrella_llava.py",
        "processor_config.json",
        "chat_template.jinja",
    )
    for name in (*removed, "model.safetensors"):
        (broken / name).unlink()
    with pytest.raises(CheckpointError) as error:
        validate_checkpoint(broken)
    for name in ("modeling_umbrella_llava.py", "pipeline_umbrella_llava.py", "processor_config.json", "chat_template"):
        assert name in str(error.value), name
    assert "model.safetensors" in str(error.value)

    RecordingHub(monkeypatch)
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("created a repo for a broken checkpoint"))
    with pytest.raises(SystemExit) as exit_info:
        run_script("--checkpoint", str(broken), "--repo_id", "me/x")
    assert exit_info.value.code == 2 and "modeling_umbrella_llava.py" in capsys.readouterr().err


def test_checkpoint_saved_before_the_pipeline_existed_is_complete_without_its_file(checkpoint, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(checkpoint, older)
    (older / "pipeline_umbrella_llava.py").unlink()
    config = json.loads((older / "config.json").read_text())
    del config["custom_pipelines"]
    (older / "config.json").write_text(json.dumps(config))
    validate_checkpoint(older)


def test_stock_llava_and_bad_flags_are_refused(checkpoint, capsys):
    with pytest.raises(CheckpointError, match="model_type 'llava', not 'umbrella_llava'"):
        validate_checkpoint(checkpoint.parent / "stock")
    for flags, message in [
        (["--repo_id", "not a repo id"], "not a valid Hub id"),
        (["--repo_id", "me/x", "--dry_run"], "--dry_run and --output_dir go together"),
        (["--repo_id", "me/x", "--privat"], "unrecognized arguments: --privat"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            run_script("--checkpoint", str(checkpoint), *flags)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, message


@pytest.mark.slow
def test_card_usage_snippet_runs_on_the_uploaded_folder_without_the_package(checkpoint, tmp_path, mni_t1_path):
    """The card's code, as written, on the dry-run folder and a real NIfTI scan, through a real script run."""
    upload = tmp_path / "upload"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--checkpoint", str(checkpoint), "--repo_id", "me/umbrella-tiny"]
        + ["--dry_run", "--output_dir", str(upload)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    snippet = re.search(r"```python\n(.*?)```", (upload / "README.md").read_text(), re.S).group(1)
    snippet = snippet.replace('"me/umbrella-tiny"', repr(str(upload))).replace('"scan.nii.gz"', repr(str(mni_t1_path)))
    assert str(upload) in snippet and str(mni_t1_path) in snippet
    run_without_package(
        snippet + "\nassert output.shape[1] > inputs['input_ids'].shape[1]\nprint('card OK')\n", tmp_path
    )


def test_card_training_recipe_uses_only_flags_the_scripts_have(checkpoint):
    """Every flag of the card's shell recipe exists in the script it is passed to."""
    import argparse
    import dataclasses

    from transformers import TrainingArguments

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import convert_llava_checkpoint
        import push_to_hub
    finally:
        sys.path.remove(str(SCRIPT.parent))

    def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
        return {flag for action in parser._actions for flag in action.option_strings}

    train_sources = [REPO_ROOT / "scripts" / "train.py", REPO_ROOT / "umbrella_llava" / "training.py"]
    if not all(path.is_file() for path in train_sources):
        pytest.skip("scripts/train.py is not in this tree yet")
    train_text = "\n".join(path.read_text() for path in train_sources)
    trainer_flags = {field.name for field in dataclasses.fields(TrainingArguments)}
    known = {
        "convert_llava_checkpoint.py": parser_flags(convert_llava_checkpoint.build_parser()),
        "push_to_hub.py": parser_flags(push_to_hub.build_parser()),
    }
    recipe = re.search(r"```bash\n(.*?)```", render_model_card(checkpoint, "me/x").text, re.S).group(1)
    scripts = {"convert": "convert_llava_checkpoint.py", "train": "train.py", "push": "push_to_hub.py"}
    commands = re.findall(r"umbrella-(\w+)(.*?)(?=umbrella-|\Z)", recipe, re.S)
    commands = [(scripts[command], arguments) for command, arguments in commands]
    assert [script for script, _ in commands].count("train.py") >= 1 and len(commands) == 4
    for script, arguments in commands:
        for flag in re.findall(r"(--\w+)", arguments):
            if script == "train.py":
                declared = re.search(rf"\b{flag[2:]}\b\s*:", train_text) or flag[2:] in trainer_flags
                assert declared, f"train.py has no {flag}"
            else:
                assert flag in known[script], f"{script} has no {flag}"
