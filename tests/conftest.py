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


def tiny_llava_kwargs(tokenizer=None, vision: str = "siglip") -> dict:
    """LlavaConfig arguments of a tiny random LLaVA: 2-layer SigLIP or CLIP tower (32² images in 8² patches) and a
    2-layer Qwen2 LM. The same sub-configs serve the stock LLaVA of the conversion tests and UmbrellaLlava."""
    vocab_size = len(tokenizer) if tokenizer is not None else 512
    kwargs = dict(
        vision_config={
            "model_type": f"{vision}_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config={
            "model_type": "qwen2",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": vocab_size,
            "max_position_embeddings": 512,
            "tie_word_embeddings": True,
        },
        image_token_index=tokenizer.image_token_id if tokenizer is not None else 3,
        vision_feature_select_strategy="full" if vision == "siglip" else "default",
        vision_feature_layer=-1,
    )
    if tokenizer is not None:
        kwargs.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return kwargs


def tiny_config(tokenizer=None, vision: str = "siglip", **overrides):
    """A tiny random UmbrellaLlavaConfig: 16³ volumes, 8³ patches (8 tokens per volume), 2-layer tower and LM."""
    from umbrella_llava import UmbrellaLlavaConfig

    kwargs = tiny_llava_kwargs(tokenizer, vision)
    kwargs.update(
        projector_hidden_act="gelu", volume_size=(16, 16, 16), volume_patch_size=(8, 8, 8), volume_channels=1
    )
    kwargs.update(overrides)
    return UmbrellaLlavaConfig(**kwargs)


@pytest.fixture
def tiny_model(tokenizer):
    from umbrella_llava import UmbrellaLlavaForConditionalGeneration

    torch.manual_seed(0)
    return UmbrellaLlavaForConditionalGeneration(tiny_config(tokenizer)).eval()


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
