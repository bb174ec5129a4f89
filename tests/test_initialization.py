"""Weights missing from a checkpoint come back by their module's own rules (mirrors transformers'
`test_can_init_all_missing_weights`): the tower's by CLIP's or SigLIP's, the 3-D embedder's by its host tower's, the
projector's at unit gain."""

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from umbrella_llava import UmbrellaLlavaForConditionalGeneration

TOWER = "model.vision_tower."
# Parameters whose rule differs from transformers' generic N(0, 0.02) / zeros, per tower.
DROPPED = {
    "clip": [
        "encoder.layers.0.self_attn.q_proj.weight",  # CLIPAttention: width^-0.5 * (2 layers)^-0.5
        "encoder.layers.1.mlp.fc1.weight",  # CLIPMLP: (2 width)^-0.5
    ],
    "siglip": [
        "encoder.layers.0.mlp.fc1.weight",  # SiglipMLP: Xavier-uniform
        "encoder.layers.1.mlp.fc2.bias",  # SiglipMLP: N(0, 1e-6)
    ],
}
PROJECTOR_WEIGHT = "model.multi_modal_projector.linear_1.weight"
EMBEDDER = ["embeddings.patch_embedding.weight", "embeddings.position_embedding.weight"]


def embedder_rule_std(config, name: str) -> float:
    """The std the host tower gives its own 2-D embedding's counterpart of `name`."""
    vision = config.vision_config
    if vision.model_type == "clip_vision_model":
        if name.startswith("embeddings.class_embedding"):
            return vision.hidden_size**-0.5 * vision.initializer_factor
        return vision.initializer_range * vision.initializer_factor
    if name == "embeddings.patch_embedding.weight":  # LeCun normal over the flattened patch
        return (config.volume_channels * torch.Size(config.volume_patch_size).numel()) ** -0.5
    return vision.hidden_size**-0.5


@pytest.mark.parametrize("vision", ["siglip", "clip"])
def test_can_init_all_missing_weights(tmp_path, tokenizer, vision):
    config = tiny_config(tokenizer, vision=vision)
    torch.manual_seed(0)
    UmbrellaLlavaForConditionalGeneration(config).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    dropped = DROPPED[vision] + EMBEDDER + (["embeddings.class_embedding.weight"] if vision == "clip" else [])
    for name in dropped:
        del state[TOWER + name]
    del state[PROJECTOR_WEIGHT]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})

    torch.manual_seed(1)
    model = UmbrellaLlavaForConditionalGeneration.from_pretrained(tmp_path)
    loaded = dict(model.named_parameters())
    torch.manual_seed(2)
    native_tower = dict(AutoModel.from_config(config.vision_config).named_parameters())
    for name in dropped:
        expected = (
            embedder_rule_std(config, name) if name.startswith("embeddings.") else native_tower[name].detach().std()
        )
        std = loaded[TOWER + name].detach().std()
        assert 0.8 < float(std / expected) < 1.25, (name, float(std), float(expected))
    projector = loaded[PROJECTOR_WEIGHT].detach()
    assert 0.8 < float(projector.std() * projector.shape[1] ** 0.5) < 1.25  # LeCun normal: std = fan_in^-0.5
    for name, tensor in state.items():  # and nothing that was loaded is touched
        torch.testing.assert_close(
            loaded[name] if name in loaded else model.state_dict()[name], tensor, rtol=0, atol=0
        )
