"""A real install: the wheel carries what the package reads at run time and installs every command, which runs
from a folder outside the checkout."""

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_config

from umbrella_llava import UmbrellaLlavaForConditionalGeneration

COMMANDS = (
    "umbrella-train",
    "umbrella-convert",
    "umbrella-push",
    "umbrella-demo",
    "umbrella-preview",
    "umbrella-evaluate",
    "umbrella-check-data",
    "umbrella-build-records",
    "umbrella-explain",
    "umbrella-app",
)
BUILD_LEFTOVERS = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "outputs", ".*_cache")


def installed_wheel(root: Path) -> Path:
    """Build the wheel of the checkout and install it, without its dependencies, into a fresh venv under `root`.

    The venv reaches torch, transformers and the rest through a `.pth` line naming this interpreter's site-packages.
    A directory named by a `.pth` line has its own `.pth` files ignored, so the editable install of the checkout (a
    `.pth` import hook there) stays off, and a file the wheel lacks cannot be found in the checkout instead.
    """
    # A copy without the checkout's build/ and *.egg-info, whose leftovers setuptools would put into the wheel.
    source = root / "source"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
    wheel_dir = root / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheel_dir, source],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheel_dir.glob("umbrella_llava-*.whl")
    environment = root / "venv"
    venv.create(environment, with_pip=False)
    (site_packages,) = environment.glob("lib/python*/site-packages")
    (site_packages / "dependencies.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    python = environment / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
        check=True,
        capture_output=True,
    )
    return environment


def run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_wheel_installs_the_commands_and_the_model_card_template(tmp_path, tokenizer, tiny_processor):
    environment = installed_wheel(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    where = run([environment / "bin" / "python", "-c", "import umbrella_llava.hub as h; print(h.__file__)"], outside)
    assert where.returncode == 0, where.stderr[-3000:]
    assert Path(where.stdout.strip()).is_relative_to(environment), where.stdout  # the wheel's copy, not the checkout

    for command in COMMANDS:
        result = run([environment / "bin" / command, "--help"], outside)
        assert result.returncode == 0, f"{command}:\n{result.stderr[-3000:]}"
        assert "usage:" in result.stdout, command

    checkpoint = tmp_path / "checkpoint"
    torch.manual_seed(0)
    UmbrellaLlavaForConditionalGeneration(tiny_config(tokenizer)).save_pretrained(checkpoint)
    tiny_processor.save_pretrained(checkpoint)
    upload = outside / "upload"
    push = [environment / "bin" / "umbrella-push", "--checkpoint", checkpoint, "--repo_id", "a/b", "--dry_run"]
    result = run([*push, "--output_dir", upload], outside)
    assert result.returncode == 0, result.stderr[-3000:]
    card = (upload / "README.md").read_text()
    assert "library_name: transformers" in card and 'model_id = "a/b"' in card
    assert (upload / "model.safetensors").is_file() and (upload / "modeling_umbrella_llava.py").is_file()


def test_demo_without_nilearn_stops_with_the_install_command(tmp_path, monkeypatch, capsys):
    from umbrella_llava import demo

    monkeypatch.setitem(sys.modules, "nilearn", None)  # `import nilearn` now raises ImportError
    with pytest.raises(SystemExit, match=r"nilearn, which is not installed: pip install 'umbrella_llava\[demo\]'"):
        demo.main(["--output_dir", str(tmp_path / "demo")])
    assert not (tmp_path / "demo").exists()
