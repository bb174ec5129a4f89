"""Auto-class registration, save_pretrained with code, and loading with trust_remote_code without the package."""

import ast
import json
from pathlib import Path

import torch
from conftest import run_without_package, tiny_config
from test_modeling import make_batch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

import umbrella_llava
from umbrella_llava import UmbrellaLlavaForConditionalGeneration, UmbrellaLlavaModel
from umbrella_llava.hub import REMOTE_CODE_FILES

PACKAGE_DIR = Path(umbrella_llava.__file__).parent
REMOTE_CODE_PREFIXES = ("configuration_", "modeling_", "processing_", "image_processing_", "pipeline_")
ALLOWED_HARD_IMPORTS = {"torch", "transformers", "einops"}


def test_auto_classes_resolve_after_import(tokenizer):
    config = tiny_config(tokenizer)
    assert isinstance(AutoConfig.for_model("umbrella_llava"), umbrella_llava.UmbrellaLlavaConfig)
    assert type(AutoModel.from_config(config)) is UmbrellaLlavaModel
    assert type(AutoModelForImageTextToText.from_config(config)) is UmbrellaLlavaForConditionalGeneration


def test_save_pretrained_writes_code_and_auto_map(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_umbrella_llava.UmbrellaLlavaConfig",
        "AutoModel": "modeling_umbrella_llava.UmbrellaLlavaModel",
        "AutoModelForImageTextToText": "modeling_umbrella_llava.UmbrellaLlavaForConditionalGeneration",
    }
    assert (tmp_path / "modeling_umbrella_llava.py").exists()
    assert (tmp_path / "configuration_umbrella_llava.py").exists()


def test_remote_code_files_are_flat_and_import_only_torch_transformers_einops():
    # The transformers-named files, and the siblings they import (listed in hub.REMOTE_CODE_FILES).
    files = [
        p for p in PACKAGE_DIR.glob("*.py") if p.name.startswith(REMOTE_CODE_PREFIXES) or p.name in REMOTE_CODE_FILES
    ]
    assert {"configuration_umbrella_llava.py", "modeling_umbrella_llava.py"} <= {p.name for p in files}
    for path in files:
        tree = ast.parse(path.read_text())
        # transformers' remote-code import check skips try/except blocks: optional imports live there.
        guarded = {id(n) for node in ast.walk(tree) if isinstance(node, ast.Try) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in guarded:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.level == 1 and "." not in (node.module or ""), f"{path.name}: nested relative import"
                    sibling = f"{node.module}.py"
                    assert sibling.startswith(REMOTE_CODE_PREFIXES) or sibling in REMOTE_CODE_FILES, path.name
                    continue
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                import sys

                assert top in ALLOWED_HARD_IMPORTS or top in sys.stdlib_module_names, f"{path.name} imports {name}"


def test_saved_folder_loads_with_trust_remote_code_without_the_package(tmp_path, tiny_model):
    checkpoint = tmp_path / "checkpoint"
    tiny_model.save_pretrained(checkpoint)
    batch = make_batch(tiny_model.config, [2, 1])
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        logits = tiny_model(**batch).logits
        hidden = tiny_model.model(**batch).last_hidden_state
    torch.save({"logits": logits, "hidden": hidden}, tmp_path / "expected.pt")

    result = run_without_package(
        f"""
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
        try:
            import umbrella_llava
            raise SystemExit("the package should not be importable here")
        except ModuleNotFoundError:
            pass
        checkpoint = {str(checkpoint)!r}
        batch = torch.load({str(tmp_path / "batch.pt")!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
        assert type(config).__name__ == "UmbrellaLlavaConfig", type(config)
        model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True).eval()
        assert type(model).__name__ == "UmbrellaLlavaForConditionalGeneration"
        assert model.__module__.startswith("transformers_modules"), model.__module__
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, expected["logits"], rtol=0, atol=0)
        base = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
        assert type(base).__name__ == "UmbrellaLlavaModel"
        with torch.no_grad():
            torch.testing.assert_close(base(**batch).last_hidden_state, expected["hidden"], rtol=0, atol=0)
        print("remote code OK")
        """,
        cwd=tmp_path,
    )
    assert "remote code OK" in result.stdout


def test_from_pretrained_restores_every_tensor(tmp_path, tiny_model):
    """Mirrors transformers' `test_save_load`."""
    tiny_model.save_pretrained(tmp_path)
    reloaded, info = UmbrellaLlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    reloaded_state = reloaded.state_dict()
    for name, tensor in tiny_model.state_dict().items():
        torch.testing.assert_close(reloaded_state[name], tensor, rtol=0, atol=0, msg=name)


def test_processors_resolve_through_auto_classes(tmp_path, tokenizer, tiny_model):
    from transformers import AutoImageProcessor, AutoProcessor

    from umbrella_llava import UmbrellaLlavaProcessor, UmbrellaVolumeProcessor

    config = tiny_model.config
    processor = UmbrellaLlavaProcessor(
        image_processor=UmbrellaVolumeProcessor(volume_size=config.volume_size),
        tokenizer=tokenizer,
        image_seq_length=config.image_seq_length,
    )
    tiny_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "processing_umbrella_llava.py").exists()
    assert (tmp_path / "image_processing_umbrella_llava.py").exists()
    assert (tmp_path / "dicom_series.py").exists()  # imported by the image processor, copied by transformers
    assert type(AutoProcessor.from_pretrained(tmp_path)) is UmbrellaLlavaProcessor
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(image_processor) is UmbrellaVolumeProcessor
    assert image_processor.volume_size == list(config.volume_size)
