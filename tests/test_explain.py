"""Relevance maps: a model whose answer can only read one region of a volume gets its relevance there; a map per
volume; attention rollout lands on the model's grid patch by patch."""

import pytest
import torch

from umbrella_llava.explain import METHODS, attention_rollout_relevance, explain

pytest.importorskip("captum")


def only_reads(model, region: tuple[slice, slice, slice], volume: int, count: int):
    """Make `model` see only `region` of volume `volume` of `count` (every other voxel, of every volume, multiplied by
    zero before the embedder):
    its answer then depends on that region alone, so a faithful gradient map is zero elsewhere."""
    mask = torch.zeros(model.config.volume_size)
    mask[region] = 1.0
    embeddings = model.model.vision_tower.embeddings

    def keep_region(module, args):
        volumes = args[0]
        # The valid volumes come in (sample, slot) order; Captum passes copies of one sample of `count` volumes.
        factor = torch.zeros(volumes.shape[0], *model.config.volume_size, dtype=volumes.dtype)
        factor[volume::count] = mask
        return (volumes * factor[:, None].to(volumes.device),)

    return embeddings.register_forward_pre_hook(keep_region)


@pytest.mark.parametrize("method", ["gradient", "gradient_x_input", "integrated_gradients"])
def test_a_gradient_map_lands_on_the_only_region_the_answer_can_read(
    volume_sensitive_model, tiny_processor, mni_volume_paths, method
):
    region = (slice(2, 6), slice(8, 12), slice(4, 8))
    hook = only_reads(volume_sensitive_model, region, volume=1, count=2)
    try:
        result = explain(
            volume_sensitive_model,
            tiny_processor,
            [mni_volume_paths["T1"], mni_volume_paths["GM"]],
            "Which scan is the grey-matter map?",
            method=method,
            n_steps=8,
            max_new_tokens=3,
        )
    finally:
        hook.remove()
    assert result.relevance.shape == (2, 16, 16, 16) and result.answer
    inside = torch.zeros(16, 16, 16, dtype=torch.bool)
    inside[region] = True
    assert result.relevance[1][inside].sum() > 0
    assert result.relevance[1][~inside].abs().max() == 0 and result.relevance[0].abs().max() == 0
    top = result.relevance[1].flatten().topk(10).indices
    assert inside.flatten()[top].all()


def test_integrated_gradients_add_up_to_the_change_of_the_answers_likelihood(
    volume_sensitive_model, tiny_processor, mni_volume_paths
):
    """Completeness (Sundararajan et al., 2017), on signed attributions: a check that the path integral is taken
    from the background baseline to the volume, with enough steps."""
    from captum.attr import IntegratedGradients

    from umbrella_llava.chat import VolumeConversation, user_turn
    from umbrella_llava.explain import answer_log_likelihood

    conversation = VolumeConversation(volume_sensitive_model, tiny_processor, [mni_volume_paths["T1"]])
    prompt = conversation.prompt_ids([user_turn("Which map is this?", 1)])
    answer = torch.tensor(tiny_processor.tokenizer("white matter", add_special_tokens=False)["input_ids"])
    f = answer_log_likelihood(volume_sensitive_model, prompt, answer)
    volumes = conversation.pixel_values
    baseline = volumes.amin(dim=(3, 4, 5), keepdim=True).expand_as(volumes)
    attributions, delta = IntegratedGradients(f).attribute(
        volumes, baselines=baseline, n_steps=64, return_convergence_delta=True
    )
    change = float(f(volumes) - f(baseline))
    assert abs(float(delta)) < 0.05 * abs(change) + 1e-3
    assert attributions.sum().item() == pytest.approx(change, rel=0.05, abs=1e-3)


def test_attention_rollout_gives_a_patchwise_map_per_volume(volume_sensitive_model, tiny_processor, mni_volume_paths):
    implementation = volume_sensitive_model.config._attn_implementation
    result = explain(
        volume_sensitive_model,
        tiny_processor,
        [mni_volume_paths["T1"], mni_volume_paths["WM"]],
        "Compare the two.",
        answer="the first",
        method="attention_rollout",
    )
    relevance = result.relevance
    assert relevance.shape == (2, 16, 16, 16) and (relevance >= 0).all() and relevance.sum() > 0
    # 8³ patches: constant inside each, and the patches differ.
    patches = relevance.reshape(2, 2, 8, 2, 8, 2, 8)
    assert torch.allclose(patches, patches[:, :, :1, :, :1, :, :1].expand_as(patches))
    assert patches[0, :, 0, :, 0, :, 0].unique().numel() > 1
    assert result.answer == "the first" and result.method == "attention_rollout"
    # The attention implementation the model had is restored.
    assert volume_sensitive_model.config._attn_implementation == implementation


def test_rollout_follows_the_answer_not_the_prompt(volume_sensitive_model, tiny_processor, mni_volume_paths):
    prompt = torch.tensor([101, 102] + [volume_sensitive_model.config.image_token_id] * 8 + [103, 104])
    volumes = torch.randn(1, 1, 1, 16, 16, 16)
    first = attention_rollout_relevance(volume_sensitive_model, prompt, torch.tensor([105, 106]), volumes)
    other = attention_rollout_relevance(volume_sensitive_model, prompt, torch.tensor([150, 160, 170]), volumes)
    assert not torch.allclose(first, other)


def test_an_unknown_method_and_an_empty_answer_are_refused(tiny_model, tiny_processor, mni_volume_paths):
    with pytest.raises(ValueError, match=r"Unknown relevance method 'saliency'; choose one of"):
        explain(tiny_model, tiny_processor, [mni_volume_paths["T1"]], "Sex?", answer="male", method="saliency")
    with pytest.raises(ValueError, match="is empty: there is nothing to explain"):
        explain(tiny_model, tiny_processor, [mni_volume_paths["T1"]], "Sex?", answer="")
    assert set(METHODS) == {"gradient", "integrated_gradients", "gradient_x_input", "attention_rollout"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where one is lent)")
@pytest.mark.parametrize("method", METHODS)
def test_a_map_on_a_gpu_is_the_map_on_the_cpu(volume_sensitive_model, tiny_processor, mni_volume_paths, method):
    """The same answer and map on a GPU as on the CPU (fp32 on both; TF32 matmuls left off), for every method."""
    torch.backends.cuda.matmul.allow_tf32 = False
    scans, question = [mni_volume_paths["T1"], mni_volume_paths["GM"]], "Which scan is the grey-matter map?"
    on_cpu = explain(volume_sensitive_model, tiny_processor, scans, question, method=method, n_steps=8)
    on_gpu = explain(volume_sensitive_model.cuda(), tiny_processor, scans, question, method=method, n_steps=8)
    assert on_gpu.answer == on_cpu.answer
    assert on_gpu.relevance.device.type == "cpu"  # maps come back to the host, for NIfTI and pictures
    scale = on_cpu.relevance.abs().max()
    torch.testing.assert_close(on_gpu.relevance, on_cpu.relevance, rtol=1e-3, atol=1e-4 * float(scale))
