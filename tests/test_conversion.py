"""Converting a stock LLaVA checkpoint: bit-identical weights, the inflated 3-D embedder, the CLI and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import REPO_ROOT, run_without_package, tiny_llava_kwargs
from safetensors import safe_open
from test_modeling import make_batch
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2Config,
    SiglipImageProcessor,
)

from umbrella_llava import UmbrellaLlavaForConditionalGeneration, UmbrellaVolumeEmbeddings
from umbrella_llava.conversion import (
    REPLACED_TOWER_PREFIXES,
    convert_llava_checkpoint,
    convert_llava_model,
    inflate_volume_embeddings,
    read_llava_config,
    umbrella_config_from_llava,
)
from umbrella_llava.processing_umbrella_llava import DEFAULT_CHAT_TEMPLATE

SCRIPT = REPO_ROOT / "scripts" / "convert_llava_checkpoint.py"
# A Qwen-style template without a {% generation %} block, as stock LLaVA processors carry.
STOCK_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# 32 x 32 images in 8 x 8 patches: a 4 x 4 grid, which a (32, 32, 16) volume in 8^3 patches extends by 2 in depth.
VOLUME = dict(volume_size=(32, 32, 16), patch_size=8)


def stock_llava_config(tokenizer, vision: str = "siglip", **overrides) -> LlavaConfig:
    return LlavaConfig(**{**tiny_llava_kwargs(tokenizer, vision), **overrides})


def save_stock_llava(folder: Path, tokenizer, vision: str = "siglip", **overrides) -> LlavaForConditionalGeneration:
    """A tiny random stock LLaVA saved as llava-hf does: legacy weight names, a LlavaProcessor and its template.
    `overrides` change its LlavaConfig (e.g. `vision_feature_layer=-2`, as llava-1.5)."""
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(stock_llava_config(tokenizer, vision, **overrides)).eval()
    with torch.no_grad():  # make the biases nonzero, so that copying them is really checked
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_()
    model.save_pretrained(folder)
    # Each tower with its own pixel normalisation: SigLIP's (x - 0.5) / 0.5, CLIP's per-channel mean and std.
    if vision == "clip":
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        image_processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=STOCK_CHAT_TEMPLATE
    ).save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=["siglip", "clip"])
def converted(request, tmp_path_factory, tokenizer):
    """(stock model, stock folder, converted folder) for each tower."""
    root = tmp_path_factory.mktemp(f"convert_{request.param}")
    stock = save_stock_llava(root / "stock", tokenizer, request.param)
    output = convert_llava_checkpoint(root / "stock", root / "umbrella", **VOLUME)
    return stock, root / "stock", output


# 1. Weights


def test_stock_folder_has_legacy_key_names(converted):
    """The fixture must exercise transformers' renaming, as the llava-hf folders on the Hub do."""
    _, stock_folder, _ = converted
    with safe_open(stock_folder / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert any(name.startswith("language_model.model.") for name in names)
    assert not any(name.startswith("model.language_model.") for name in names)


def test_converted_model_loads_with_no_missing_keys_and_stock_tensors_bit_identical(converted):
    stock, _, output = converted
    model, info = UmbrellaLlavaForConditionalGeneration.from_pretrained(output, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

    loaded, stock_state = model.state_dict(), stock.state_dict()
    copied = [name for name in stock_state if not name.startswith(REPLACED_TOWER_PREFIXES)]
    for name in copied:
        assert loaded[name].dtype == stock_state[name].dtype, name
        assert torch.equal(loaded[name], stock_state[name]), name
    # The comparison covers every part that must stay the stock's.
    layers = stock.config.vision_config.num_hidden_layers
    assert {f"model.vision_tower.encoder.layers.{i}.mlp.fc1.weight" for i in range(layers)} <= set(copied)
    for part in ("model.language_model.layers.1.", "model.multi_modal_projector.linear_2.", "lm_head.weight"):
        assert any(name.startswith(part) for name in copied), part
    assert set(loaded) - set(copied) == {name for name in loaded if name.startswith("model.vision_tower.embeddings.")}


def test_converted_config_records_base_geometry_and_auto_map(converted):
    _, stock_folder, output = converted
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "umbrella_llava"
    assert config["converted_from"] == str(stock_folder)
    assert config["volume_size"] == [32, 32, 16] and config["volume_patch_size"] == [8, 8, 8]
    assert config["auto_map"]["AutoModelForImageTextToText"].endswith("UmbrellaLlavaForConditionalGeneration")
    processor_config = json.loads((output / "processor_config.json").read_text())
    assert processor_config["image_seq_length"] == config["image_seq_length"]
    for name in ("modeling_umbrella_llava.py", "configuration_umbrella_llava.py", "processing_umbrella_llava.py"):
        assert (output / name).is_file(), name
    assert (output / "image_processing_umbrella_llava.py").is_file()


# 2. The inflated embedder


@pytest.mark.parametrize("vision", ["siglip", "clip"])
@pytest.mark.parametrize("volume_channels", [1, 2])
def test_inflated_embedder_reproduces_2d_embedding_on_depth_constant_volume(tokenizer, vision, volume_channels):
    """A volume repeating one grey slice along depth (in every channel) gets, at every depth, the tokens that the
    2-D tower gives the slice fed as R = G = B: kernel inflation, bias, positions and class token all agree."""
    torch.manual_seed(0)
    stock = LlavaForConditionalGeneration(stock_llava_config(tokenizer, vision)).eval()
    config = umbrella_config_from_llava(stock.config, (32, 32, 3), (8, 8, 3), volume_channels)
    embeddings_2d = stock.model.vision_tower.embeddings
    with torch.no_grad():
        embeddings_2d.patch_embedding.weight.normal_()
    embeddings_2d = embeddings_2d.double()  # so that the identity holds up to float64 rounding
    embedder = UmbrellaVolumeEmbeddings(config).double()
    embedder.load_state_dict(inflate_volume_embeddings(embeddings_2d.state_dict(), config))

    grey = torch.rand(2, 32, 32, dtype=torch.float64)
    volume = grey[:, None, :, :, None].expand(2, volume_channels, 32, 32, 3)
    with torch.no_grad():
        expected = embeddings_2d(grey[:, None].expand(2, 3, 32, 32))  # (2, [1 +] 16, hidden)
        tokens = embedder(volume)  # (2, [1 +] 16 * 1 depth patch, hidden)
    torch.testing.assert_close(tokens, expected, rtol=1e-12, atol=1e-12)


def grey_test_image() -> np.ndarray:
    """A 32 x 32 8-bit grey image that spans 0..255 (a gradient with texture), so min-max scaling after percentile
    clipping maps it to [0, 1] within about 1 %."""
    rows, cols = np.mgrid[0:32, 0:32]
    texture = np.random.default_rng(0).uniform(-40, 40, (32, 32))
    return np.clip(rows * 4 + cols * 4 + texture, 0, 255).astype(np.uint8)


def patch_projections(embeddings: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The embeddings' tokens without their position table (the table is shared by construction)."""
    with torch.no_grad():
        tokens = embeddings(pixel_values)
    return tokens - embeddings.position_embedding.weight


@pytest.mark.parametrize("vision", ["siglip", "clip"])
def test_converted_processor_and_embedder_give_the_stock_tokens_of_a_grey_image(tmp_path, tokenizer, vision):
    """The base's pixel normalisation is folded into the inflated kernel: a volume whose depth slices all hold one
    grey image, read through the converted checkpoint's own processor, gets at every depth the patch embeddings that
    the stock tower gives that image read through the base's own image processor (R = G = B)."""
    stock = save_stock_llava(tmp_path / "stock", tokenizer, vision)
    output = convert_llava_checkpoint(
        tmp_path / "stock", tmp_path / "umbrella", volume_size=(32, 32, 16), patch_size=8
    )
    grey = grey_test_image()

    base_processor = AutoImageProcessor.from_pretrained(tmp_path / "stock")
    image = PIL.Image.fromarray(np.stack([grey] * 3, axis=-1))
    expected = patch_projections(
        stock.model.vision_tower.embeddings, base_processor(image, return_tensors="pt")["pixel_values"]
    )

    volume_path = tmp_path / "grey.nii.gz"
    nib.Nifti1Image(np.repeat(grey[:, :, None], 16, axis=2).astype(np.float32), np.eye(4)).to_filename(volume_path)
    processor = AutoProcessor.from_pretrained(output)
    pixel_values = processor.image_processor([[volume_path]], return_tensors="pt")["pixel_values"]
    model = UmbrellaLlavaForConditionalGeneration.from_pretrained(output)
    tokens = patch_projections(model.model.vision_tower.embeddings, pixel_values[:, 0])

    prefix = int(model.config.volume_class_token)  # CLIP's class token carries no pixels: compare the patches
    grid = tokens[0, prefix:].reshape(4, 4, 2, -1)  # (h, w, d) patches of the (32, 32, 16) volume
    expected = expected[0, prefix:].reshape(4, 4, -1)  # (h, w) patches of the 32 x 32 image
    for depth in range(2):
        error = (grid[:, :, depth] - expected).norm() / expected.norm()
        assert error < 0.02, (vision, depth, float(error))


def test_inflation_resamples_kernel_and_repeats_positions_over_depth(tokenizer):
    stock = LlavaForConditionalGeneration(stock_llava_config(tokenizer, "clip"))
    config = umbrella_config_from_llava(stock.config, (32, 64, 16), (16, 16, 4), 1)
    state = inflate_volume_embeddings(stock.model.vision_tower.embeddings.state_dict(), config)
    hidden = config.vision_config.hidden_size
    assert state["patch_embedding.weight"].shape == (hidden, 16 * 16 * 4)
    table = state["position_embedding.weight"]
    assert table.shape == (1 + 2 * 4 * 4, hidden)
    torch.testing.assert_close(table[0], stock.model.vision_tower.embeddings.position_embedding.weight[0])
    grid = table[1:].reshape(2, 4, 4, hidden)  # (h, w, d)
    assert torch.equal(grid, grid[:, :, :1].expand_as(grid))  # same position at every depth
    assert not torch.equal(grid[0, 0], grid[1, 3])  # but (h, w) still differ
    # The 4 x 4 image grid is resampled to the volume's 2 (H) x 4 (W) grid, in that order: swapped axes would give a
    # 4 x 2 grid read as 2 x 4.
    table_2d = stock.model.vision_tower.embeddings.position_embedding.weight.detach()
    image_grid = table_2d[1:].reshape(1, 4, 4, hidden).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(image_grid, size=(2, 4), mode="bicubic", antialias=True)
    torch.testing.assert_close(grid[:, :, 0], expected[0].permute(1, 2, 0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["class_embedding.weight"][0], stock.model.vision_tower.embeddings.class_embedding)


def test_random_embedder_init_keeps_the_rest_identical(tokenizer):
    torch.manual_seed(0)
    stock = LlavaForConditionalGeneration(stock_llava_config(tokenizer)).eval()
    config = umbrella_config_from_llava(stock.config, **{"volume_size": 32, "volume_patch_size": 8})
    model = convert_llava_model(stock, config, embedder_init="random", seed=1)
    embedder = model.model.vision_tower.embeddings
    # Reproducible from the seed, another seed another embedder, and timm's ViT scale (std 0.02).
    again = convert_llava_model(stock, config, embedder_init="random", seed=1).model.vision_tower.embeddings
    other = convert_llava_model(stock, config, embedder_init="random", seed=2).model.vision_tower.embeddings
    assert torch.equal(embedder.patch_embedding.weight, again.patch_embedding.weight)
    assert not torch.equal(embedder.patch_embedding.weight, other.patch_embedding.weight)
    assert 0.01 < float(embedder.patch_embedding.weight.detach().std()) < 0.03
    assert not embedder.patch_embedding.bias.any()
    inflated = inflate_volume_embeddings(stock.model.vision_tower.embeddings.state_dict(), config)
    assert not torch.equal(embedder.patch_embedding.weight, inflated["patch_embedding.weight"])
    stock_state = stock.state_dict()
    for name, tensor in model.state_dict().items():
        if not name.startswith("model.vision_tower.embeddings."):
            assert torch.equal(tensor, stock_state[name]), name


def test_conversion_leaves_out_the_vision_layers_past_the_feature_layer_and_keeps_the_logits(tokenizer):
    """llava-1.5 reads the next-to-last layer (-2): its last layer goes, and the model's output stays the same."""
    stock_config = stock_llava_config(tokenizer, "clip", vision_feature_layer=-2)
    torch.manual_seed(0)
    stock = LlavaForConditionalGeneration(stock_config).eval()
    geometry = {"volume_size": 32, "volume_patch_size": 8}
    full = umbrella_config_from_llava(stock_config, **geometry, drop_unread_vision_layers=False)
    config = umbrella_config_from_llava(stock_config, **geometry)

    def tower(c):
        return c.vision_config.num_hidden_layers, c.vision_feature_layer, c.dropped_vision_layers

    assert tower(full) == (2, -2, 0) and tower(config) == (1, -1, 1)

    reference = convert_llava_model(stock, full, embedder_init="random")
    model = convert_llava_model(stock, config, embedder_init="random")
    assert any(".encoder.layers.1." in name for name in reference.state_dict())
    assert not any(".encoder.layers.1." in name for name in model.state_dict())
    batch = make_batch(config, [1, 2])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)

    # A list of feature layers keeps up to the last one read, each renumbered to the same hidden states.
    stock_config.vision_feature_layer = [-3, -2]
    listed = umbrella_config_from_llava(stock_config, **geometry)
    assert (listed.vision_config.num_hidden_layers, listed.vision_feature_layer) == (1, [-2, -1])


# 3. Processor and chat template


def test_chat_template_auto_is_chatml_with_generation_blocks_and_base_keeps_the_stock(converted, tmp_path):
    _, stock_folder, output = converted
    assert "{%- generation -%}" in DEFAULT_CHAT_TEMPLATE
    assert (output / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
    base_output = convert_llava_checkpoint(stock_folder, tmp_path / "base_template", **VOLUME, chat_template="base")
    assert (base_output / "chat_template.jinja").read_text() == STOCK_CHAT_TEMPLATE


# 4. Command line and remote code


@pytest.mark.slow
def test_cli_output_loads_with_trust_remote_code_without_the_package(tokenizer, tmp_path):
    stock = save_stock_llava(tmp_path / "stock", tokenizer)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--base", str(tmp_path / "stock"), "--output_dir", str(tmp_path / "out")]
        + ["--volume_size", "32", "32", "16", "--patch_size", "8", "--dtype", "bfloat16"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    stock_lm_head = stock.lm_head.weight.to(torch.bfloat16)
    torch.save(stock_lm_head, tmp_path / "lm_head.pt")
    run_without_package(
        f"""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = {str(tmp_path / "out")!r}
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__name__ == "UmbrellaLlavaForConditionalGeneration", type(model)
        assert type(processor).__name__ == "UmbrellaLlavaProcessor", type(processor)
        assert model.dtype == torch.bfloat16, model.dtype
        assert torch.equal(model.lm_head.weight, torch.load({str(tmp_path / "lm_head.pt")!r}))
        prompt = processor.apply_chat_template(
            [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Is this a brain?"}}]}}],
            add_generation_prompt=True,
        )
        inputs = processor(text=prompt, images=[[torch.rand(1, 40, 36, 20)]], return_tensors="pt")
        assert inputs["pixel_values"].shape == (1, 1, 1, 32, 32, 16), inputs["pixel_values"].shape
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert output.shape[1] == inputs["input_ids"].shape[1] + 3
        """,
        cwd=tmp_path,
    )


# 5. Bad input


def test_base_that_is_not_llava_fails_before_loading_weights(tmp_path, monkeypatch):
    import umbrella_llava.conversion as conversion

    Qwen2Config(hidden_size=64, num_attention_heads=4).save_pretrained(tmp_path / "qwen")
    monkeypatch.setattr(conversion, "load_stock_llava", lambda *a, **k: pytest.fail("loaded weights of a non-LLaVA"))
    with pytest.raises(ValueError, match=r"is a 'qwen2' checkpoint, not a LLaVA one"):
        convert_llava_checkpoint(tmp_path / "qwen", tmp_path / "out", **VOLUME)
    with pytest.raises(ValueError, match="Cannot read a config.json"):
        read_llava_config(tmp_path / "missing")


def test_cli_shows_geometry_and_strategy_errors_and_rejects_unknown_flags(converted, tmp_path, capsys):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from convert_llava_checkpoint import main
    finally:
        sys.path.remove(str(SCRIPT.parent))
    _, stock_folder, _ = converted
    common = ["--base", str(stock_folder), "--output_dir", str(tmp_path / "out")]
    cases = {
        "does not divide volume_size (32, 30, 16) (W: 30 % 8 = 6)": "--volume_size 32 30 16 --patch_size 8".split(),
        "one int (a cube) or three": ["--volume_size", "32", "32", "--patch_size", "8"],
        "unrecognized arguments: --patch 8": ["--volume_size", "32", "--patch_size", "8", "--patch", "8"],
        "invalid choice: 'xavier'": ["--volume_size", "32", "--patch_size", "8", "--embedder_init", "xavier"],
    }
    if json.loads((stock_folder / "config.json").read_text())["vision_config"]["model_type"] == "siglip_vision_model":
        cases["Pass --vision_feature_select_strategy full"] = [
            "--volume_size", "32", "--patch_size", "8", "--vision_feature_select_strategy", "default",
        ]  # fmt: skip
    for message, flags in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(common + flags)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, message
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_output_dir_and_foreign_tokenizer(converted, tmp_path, tokenizer):
    _, stock_folder, output = converted
    with pytest.raises(ValueError, match="not an empty folder"):
        convert_llava_checkpoint(stock_folder, output, **VOLUME)
    # A base whose config names another image token id than its tokenizer's <image>.
    config = json.loads((stock_folder / "config.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in stock_folder.iterdir():
        (broken / path.name).symlink_to(path)
    (broken / "config.json").unlink()
    (broken / "config.json").write_text(json.dumps({**config, "image_token_index": tokenizer.image_token_id + 1}))
    with pytest.raises(ValueError, match="config.image_token_id is"):
        convert_llava_checkpoint(broken, tmp_path / "out", **VOLUME)
