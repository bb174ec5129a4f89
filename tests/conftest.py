"""Shared fixtures: tiny configs, a locally trained tokenizer, real brain volumes, isolated subprocesses."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from umbrella_llava.model_sizes import ModelSize, llava_config_kwargs, umbrella_config  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def import_blocker(package: str) -> str:
    """Python source that, run first in a fresh process, makes `package` (and its submodules) unimportable."""
    return f"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {package!r} or name.startswith({package + "."!r}):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
        return None
sys.meta_path.insert(0, _Block())
"""


# A subprocess that runs this prelude cannot import umbrella_llava, as on the machine of someone who downloaded a
# shared checkpoint without installing the package.
_BLOCK_PACKAGE = import_blocker("umbrella_llava") + 'sys.path = [p for p in sys.path if p not in ("", ".")]\n'


def run_without_package(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python process that cannot import umbrella_llava; fails the test on a non-zero exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    env["HF_MODULES_CACHE"] = str(Path(cwd) / "hf_modules")
    env["PYTHONPATH"] = os.pathsep.join(p for p in env["PYTHONPATH"].split(os.pathsep) if p and Path(p) != REPO_ROOT)
    script = _BLOCK_PACKAGE + textwrap.dedent(code)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"subprocess failed:\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}"
    return result


@pytest.fixture(scope="session")
def tokenizer():
    from umbrella_llava.tokenization import build_chatml_tokenizer

    return build_chatml_tokenizer()


# The tests' model: 2-layer SigLIP or CLIP tower (32² images in 8² patches for stock LLaVA) and 2-layer Qwen2 LM,
# 16³ volumes in 8³ patches (8 tokens per volume). Built by the package's one config builder (model_sizes.py).
TEST_SIZE = ModelSize("tests", 32, 64, 2, 4, 64, 128, 2, 4, 2, 512, 16, 8, tie_word_embeddings=True)
TEST_VISION = {"image_size": 32, "patch_size": 8}


def tiny_llava_kwargs(tokenizer=None, vision: str = "siglip") -> dict:
    """LlavaConfig arguments of a tiny random LLaVA. The same sub-configs serve the stock LLaVA of the conversion
    tests and UmbrellaLlava."""
    return llava_config_kwargs(TEST_SIZE, tokenizer, vision, max_position_embeddings=512, **TEST_VISION)


def tiny_config(tokenizer=None, vision: str = "siglip", **overrides):
    """A tiny random UmbrellaLlavaConfig: 16³ volumes, 8³ patches (8 tokens per volume), 2-layer tower and LM."""
    return umbrella_config(
        TEST_SIZE, tokenizer, vision, max_position_embeddings=512, vision_options=TEST_VISION, **overrides
    )


@pytest.fixture
def tiny_model(tokenizer):
    from umbrella_llava import UmbrellaLlavaForConditionalGeneration

    torch.manual_seed(0)
    return UmbrellaLlavaForConditionalGeneration(tiny_config(tokenizer)).eval()


@pytest.fixture
def volume_sensitive_model(tiny_model):
    """The tiny model with its attention's value and output projections scaled 30-fold: at initialisation the residual
    stream carries mostly the token's own embedding, so the model repeats its last text token whatever the volumes;
    scaled, what a volume gives decides the next tokens, which a negative control needs."""
    with torch.no_grad():
        for layer in tiny_model.model.language_model.layers:
            layer.self_attn.v_proj.weight.mul_(30.0)
            layer.self_attn.o_proj.weight.mul_(30.0)
    return tiny_model


@pytest.fixture(scope="session")
def mni_t1_path(tmp_path_factory) -> Path:
    """nilearn's MNI152 T1 template (a real brain shipped inside the package), written as a .nii.gz file."""
    nilearn_datasets = pytest.importorskip("nilearn.datasets")
    path = tmp_path_factory.mktemp("mni") / "mni152_t1.nii.gz"
    nilearn_datasets.load_mni152_template(resolution=2).to_filename(path)
    return path


@pytest.fixture
def tiny_processor(tokenizer):
    """An UmbrellaLlavaProcessor that matches `tiny_config`: 16³ volumes, 8 image tokens per volume."""
    from umbrella_llava.image_processing_umbrella_llava import UmbrellaVolumeProcessor
    from umbrella_llava.processing_umbrella_llava import UmbrellaLlavaProcessor

    return UmbrellaLlavaProcessor(
        image_processor=UmbrellaVolumeProcessor(volume_size=(16, 16, 16)), tokenizer=tokenizer, image_seq_length=8
    )


@pytest.fixture(scope="session")
def mni_volume_paths(tmp_path_factory, mni_t1_path) -> dict[str, Path]:
    """Three real brain volumes in one folder: nilearn's MNI152 T1, grey-matter and white-matter templates."""
    nilearn_datasets = pytest.importorskip("nilearn.datasets")
    folder = mni_t1_path.parent
    paths = {"T1": mni_t1_path, "GM": folder / "mni152_gm.nii.gz", "WM": folder / "mni152_wm.nii.gz"}
    nilearn_datasets.load_mni152_gm_template(resolution=2).to_filename(paths["GM"])
    nilearn_datasets.load_mni152_wm_template(resolution=2).to_filename(paths["WM"])
    return paths
