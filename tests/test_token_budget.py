"""The token budget of a volume: `volume_merge_size` merges neighbouring patch tokens before the projector."""

import json

import pytest
import torch
from conftest import run_without_package, tiny_config
from test_conversion import save_stock_llava
from test_modeling import _generate, make_batch, volume_prompt

from umbrella_llava import (
    UmbrellaLlavaConfig,
    UmbrellaLlavaForConditionalGeneration,
    UmbrellaLlavaProcessor,
    UmbrellaVolumeProcessor,
)
from umbrella_llava.cli import convert_main

# A 4³ patch grid (16³ volumes in 4³ patches), which 2×2×2 and 4×4×4 divide.
GRID_4 = dict(volume_size=(16, 16, 16), volume_patch_size=(4, 4, 4))


def merged_config(tokenizer, merge=(2, 2, 2), **overrides) -> UmbrellaLlavaConfig:
    return tiny_config(tokenizer, **{**GRID_4, "volume_merge_size": merge, **overrides})


@pytest.fixture
def tiny_model(tokenizer):
    """A tiny model whose volumes take 8 tokens: 64 patches merged 2×2×2 (overrides conftest's, for the imported
    `volume_sensitive_model`)."""
    torch.manual_seed(0)
    return UmbrellaLlavaForConditionalGeneration(merged_config(tokenizer)).eval()


def block_averages_by_loops(features: torch.Tensor, grid, merge) -> torch.Tensor:
    """What the merge must give, written out: the average of each block, blocks in (h w d) order."""
    (gh, gw, gd), (mh, mw, md) = grid, merge
    tokens = []
    for h in range(0, gh, mh):
        for w in range(0, gw, mw):
            for d in range(0, gd, md):
                members = [
                    features[:, (h + i) * gw * gd + (w + j) * gd + (d + k)]
                    for i in range(mh)
                    for j in range(mw)
                    for k in range(md)
                ]
                tokens.append(torch.stack(members).mean(0))
    return torch.stack(tokens, dim=1)


# 1. Config


def test_config_derives_image_seq_length_from_the_merge_and_round_trips(tmp_path, tokenizer):
    assert merged_config(tokenizer, (1, 1, 1)).image_seq_length == 64
    assert merged_config(tokenizer, (2, 2, 2)).image_seq_length == 8
    assert merged_config(tokenizer, (2, 1, 4)).image_seq_length == 8
    assert merged_config(tokenizer, 4).volume_merge_size == [4, 4, 4]
    assert merged_config(tokenizer, 4).image_seq_length == 1
    # CLIP: "default" drops the class token, "full" keeps it unmerged beside the merged patches.
    assert merged_config(tokenizer, 2, vision="clip").image_seq_length == 8
    assert merged_config(tokenizer, 2, vision="clip", vision_feature_select_strategy="full").image_seq_length == 9

    merged_config(tokenizer, (2, 1, 4)).save_pretrained(tmp_path)
    reloaded = UmbrellaLlavaConfig.from_pretrained(tmp_path)
    assert reloaded.volume_merge_size == [2, 1, 4] and reloaded.image_seq_length == 8


def test_config_without_the_key_merges_nothing(tmp_path, tokenizer):
    """A checkpoint saved before `volume_merge_size` existed."""
    tiny_config(tokenizer).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["volume_merge_size"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = UmbrellaLlavaConfig.from_pretrained(tmp_path)
    assert config.volume_merge_size == [1, 1, 1] and config.image_seq_length == 8


def test_config_rejects_a_merge_that_does_not_divide_the_grid(tokenizer):
    with pytest.raises(ValueError, match=r"\(2, 2, 2\) does not divide the patch grid \(4, 4, 3\).*D: 3 % 2 = 1"):
        tiny_config(tokenizer, volume_size=(16, 16, 12), volume_patch_size=4, volume_merge_size=2)
    with pytest.raises(ValueError, match="Choose a merge size that divides every axis of the grid"):
        merged_config(tokenizer, (3, 1, 1))
    with pytest.raises(ValueError, match=r"`volume_merge_size` must be three positive ints"):
        merged_config(tokenizer, (2, 0, 2))


# 2. The merge


@pytest.mark.parametrize("merge", [(2, 2, 2), (2, 1, 4), (4, 4, 4)])
def test_merge_averages_each_block_of_neighbours_in_grid_order(tokenizer, merge):
    config = merged_config(tokenizer, merge)
    merger = UmbrellaLlavaForConditionalGeneration(config).model.multi_modal_projector.volume_merger
    features = torch.randn(3, 64, 32)
    expected = block_averages_by_loops(features, config.volume_grid, merge)
    torch.testing.assert_close(merger(features), expected)


def test_class_token_passes_through_unmerged_and_first(tokenizer):
    config = merged_config(tokenizer, vision="clip", vision_feature_select_strategy="full")
    merger = UmbrellaLlavaForConditionalGeneration(config).model.multi_modal_projector.volume_merger
    features = torch.randn(2, 1 + 64, 32)
    merged = merger(features)
    assert merged.shape == (2, config.image_seq_length, 32)
    torch.testing.assert_close(merged[:, 0], features[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(merged[:, 1:], block_averages_by_loops(features[:, 1:], config.volume_grid, (2, 2, 2)))


def test_merge_one_adds_nothing(tokenizer, tmp_path):
    """No merger and no parameter at (1, 1, 1), so old checkpoints (without the key) load with identical logits."""
    torch.manual_seed(0)
    model = UmbrellaLlavaForConditionalGeneration(tiny_config(tokenizer)).eval()
    assert model.model.multi_modal_projector.volume_merger is None
    merged = UmbrellaLlavaForConditionalGeneration(merged_config(tokenizer))
    assert {name for name, _ in merged.named_parameters()} == {name for name, _ in model.named_parameters()}

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["volume_merge_size"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    reloaded = UmbrellaLlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = make_batch(model.config, [2, 1])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


# 3. Training, saving, loading, generating


def test_forward_and_backward_with_two_volumes_per_sample_through_the_processor(tokenizer, tiny_model):
    config = tiny_model.config
    processor = UmbrellaLlavaProcessor(
        image_processor=UmbrellaVolumeProcessor(volume_size=config.volume_size),
        tokenizer=tokenizer,
        image_seq_length=config.image_seq_length,
    )
    generator = torch.Generator().manual_seed(0)
    volumes = [[torch.rand(1, 20, 18, 16, generator=generator) for _ in range(2)] for _ in range(2)]
    image = processor.image_token
    texts = [f"{image}{image} Same map? yes", f"First {image} then {image} compare: no"]
    batch = processor(text=texts, images=volumes, padding=True, return_tensors="pt")
    image_tokens = (batch["input_ids"] == config.image_token_id).sum(dim=1)
    assert image_tokens.tolist() == [2 * 8, 2 * 8]
    assert batch["pixel_values"].shape == (2, 2, 1, 16, 16, 16)

    labels = batch["input_ids"].masked_fill(batch["input_ids"] == config.image_token_id, -100)
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    tiny_model.train()
    outputs = tiny_model(**batch, labels=labels)
    assert outputs.image_hidden_states.shape == (4, 8, config.text_config.hidden_size)
    loss = outputs.loss
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("vision_tower.embeddings.patch_embedding", "multi_modal_projector.linear_1"):
        grad = tiny_model.get_submodule(f"model.{name}").weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_saved_merged_model_loads_with_trust_remote_code_without_the_package(tmp_path, tiny_model):
    checkpoint = tmp_path / "checkpoint"
    tiny_model.save_pretrained(checkpoint)
    batch = make_batch(tiny_model.config, [2, 1])
    torch.save(batch, tmp_path / "batch.pt")
    with torch.no_grad():
        torch.save(tiny_model(**batch).logits, tmp_path / "logits.pt")
    result = run_without_package(
        f"""
        import torch
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
        assert model.__module__.startswith("transformers_modules"), model.__module__
        assert model.config.volume_merge_size == [2, 2, 2] and model.config.image_seq_length == 8
        batch = torch.load({str(tmp_path / "batch.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, torch.load({str(tmp_path / "logits.pt")!r}), rtol=0, atol=0)
        print("merged remote code OK")
        """,
        cwd=tmp_path,
    )
    assert "merged remote code OK" in result.stdout


def test_generation_follows_the_merged_volumes(volume_sensitive_model):  # noqa: F811 (the imported fixture)
    model = volume_sensitive_model
    first, second = volume_prompt(model.config, seed=0), volume_prompt(model.config, seed=1)
    assert (first["input_ids"] == model.config.image_token_id).sum() == 8
    generated = _generate(model, **first)
    assert generated.shape[1] == first["input_ids"].shape[1] + 6
    # Negative control: other volumes, same text, other tokens.
    assert _generate(model, **second)[0, -6:].tolist() != generated[0, -6:].tolist()
    with torch.no_grad():
        logits = model(input_ids=generated, pixel_values=first["pixel_values"]).logits
    prompt_len = first["input_ids"].shape[1]
    assert logits[0, prompt_len - 1 : -1].argmax(-1).tolist() == generated[0, prompt_len:].tolist()


# 4. Conversion


@pytest.mark.parametrize("vision", ["siglip", "clip"])
def test_conversion_with_merge_size_feeds_the_stock_projector_tokens_on_its_scale(tokenizer, tmp_path, vision):
    """`--merge_size 2`: the stock projector is copied, and a block of identical tower tokens reaches it as that
    token, so it maps merged tokens as it mapped single ones. CLIP's class token (kept with "full") passes alone."""
    stock = save_stock_llava(tmp_path / "stock", tokenizer, vision)
    convert_main(
        ["--base", str(tmp_path / "stock"), "--output_dir", str(tmp_path / "out"), "--volume_size", "32", "32", "16"]
        + ["--patch_size", "8", "--merge_size", "2", "--vision_feature_select_strategy", "full"]
    )
    model = UmbrellaLlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    processor = UmbrellaLlavaProcessor.from_pretrained(tmp_path / "out")
    class_tokens = int(vision == "clip")
    assert model.config.volume_merge_size == [2, 2, 2]
    assert model.config.image_seq_length == processor.image_seq_length == 4 * 4 * 2 // 8 + class_tokens

    projector = model.model.multi_modal_projector
    for name in ("linear_1", "linear_2"):
        stock_linear = stock.model.multi_modal_projector.get_submodule(name)
        assert torch.equal(projector.get_submodule(name).weight, stock_linear.weight), name

    # Tower tokens constant over each 2×2×2 block of the (4, 4, 2) grid, in (h w d) order.
    width, grid = projector.linear_1.in_features, model.config.volume_grid
    block_tokens = torch.randn(1, 4, width) * 3.0
    block_of = [(h // 2) * 2 + w // 2 for h in range(grid[0]) for w in range(grid[1]) for _ in range(grid[2])]
    class_token = torch.randn(1, class_tokens, width)
    features = torch.cat([class_token, block_tokens[:, block_of]], dim=1)
    with torch.no_grad():
        merged = projector(features)
        expected = stock.model.multi_modal_projector(torch.cat([class_token, block_tokens], dim=1))
    torch.testing.assert_close(merged, expected)


def test_conversion_refuses_a_merge_that_does_not_divide_the_grid_naming_the_flag(tokenizer, tmp_path, capsys):
    save_stock_llava(tmp_path / "stock", tokenizer)
    with pytest.raises(SystemExit) as exit_info:
        convert_main(
            ["--base", str(tmp_path / "stock"), "--output_dir", str(tmp_path / "out"), "--volume_size", "32", "32"]
            + ["16", "--patch_size", "8", "--merge_size", "2", "2", "4"]
        )
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "does not divide the patch grid (4, 4, 2)" in error and "D: 2 % 4 = 2" in error, error
    assert "(--merge_size / --volume_size / --patch_size)" in error, error
    assert not (tmp_path / "out").exists()
