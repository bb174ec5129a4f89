"""UmbrellaLlava's config, 3-D embedder and forward pass on tiny random configs."""

import pytest
import torch
from conftest import tiny_config
from einops import rearrange
from transformers import CompileConfig, GenerationMixin, LlavaConfig, LlavaForConditionalGeneration

from umbrella_llava import UmbrellaLlavaConfig, UmbrellaLlavaForConditionalGeneration, UmbrellaVolumeEmbeddings


def make_batch(config, volumes_per_sample: list[int], slots: int | None = None, text_len: int = 4, seed: int = 0):
    """Left-padded ids with one image block per volume, and (B, N, C, H, W, D) slots with an image mask."""
    generator = torch.Generator().manual_seed(seed)
    slots = slots if slots is not None else max(volumes_per_sample)
    rows = []
    for b, count in enumerate(volumes_per_sample):
        text = torch.randint(10, 300, (text_len + b,), generator=generator).tolist()
        rows.append(text[:2] + [config.image_token_id] * (config.image_seq_length * count) + text[2:])
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([[0] * (length - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    pixel_values = torch.randn(len(rows), slots, config.volume_channels, *config.volume_size, generator=generator)
    image_mask = torch.arange(slots)[None, :] < torch.tensor(volumes_per_sample)[:, None]
    pixel_values[~image_mask] = 0.0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "image_mask": image_mask,
        "num_images_per_sample": torch.tensor(volumes_per_sample),
    }


# 1. Config


def test_config_derives_image_seq_length_and_round_trips(tmp_path, tokenizer):
    config = tiny_config(tokenizer, volume_size=(16, 32, 24), volume_patch_size=(8, 8, 8))
    assert config.image_seq_length == 2 * 4 * 3
    config.save_pretrained(tmp_path)
    reloaded = UmbrellaLlavaConfig.from_pretrained(tmp_path)
    assert reloaded.volume_size == [16, 32, 24] and reloaded.image_seq_length == 24
    assert tiny_config(tokenizer, vision="clip").image_seq_length == 8  # "default" drops CLIP's class token
    assert tiny_config(tokenizer, vision="clip", vision_feature_select_strategy="full").image_seq_length == 9


def test_config_rejects_patch_that_does_not_divide_volume(tokenizer):
    with pytest.raises(ValueError, match=r"does not divide volume_size \(16, 20, 16\).*W: 20 % 8 = 4"):
        tiny_config(tokenizer, volume_size=(16, 20, 16))


def test_config_rejects_default_strategy_on_tower_without_class_token(tokenizer):
    with pytest.raises(ValueError, match="would drop a patch"):
        tiny_config(tokenizer, vision_feature_select_strategy="default")


# 2. 3-D patch embedder


def test_embedder_patch_layout_matches_the_maths(tokenizer):
    config = tiny_config(tokenizer, volume_channels=2, volume_size=(16, 8, 24))
    embedder = UmbrellaVolumeEmbeddings(config)
    volumes = torch.randn(3, 2, 16, 8, 24)
    out = embedder(volumes)
    assert out.shape == (3, 2 * 1 * 3, config.vision_config.hidden_size)
    # Patch (h=1, w=0, d=2) is the 4th + 2 = 6th in (h w d) order; its voxels flatten as (ph pw pd c).
    patch = volumes[:, :, 8:16, 0:8, 16:24]
    flat = rearrange(patch, "m c ph pw pd -> m (ph pw pd c)")
    expected = embedder.patch_embedding(flat) + embedder.position_embedding.weight[5]
    torch.testing.assert_close(out[:, 5], expected)
    assert list(embedder.buffers()) == []


def test_embedder_rejects_wrong_volume_shape(tokenizer):
    embedder = UmbrellaVolumeEmbeddings(tiny_config(tokenizer))
    with pytest.raises(ValueError, match=r"\(M, 1, 16, 16, 16\), got \(2, 1, 16, 16, 8\)"):
        embedder(torch.zeros(2, 1, 16, 16, 8))


@pytest.mark.parametrize("vision", ["siglip", "clip"])
def test_stock_llava_weights_keep_their_names(tokenizer, vision):
    """Encoder layers, projector and LM are LLaVA's own: every stock key except the 2-D embedding is ours too."""
    config = tiny_config(tokenizer, vision=vision)
    ours = set(UmbrellaLlavaForConditionalGeneration(config).state_dict())
    stock_config = LlavaConfig(**{k: v for k, v in config.to_dict().items() if not k.startswith("volume_")})
    stock = set(LlavaForConditionalGeneration(stock_config).state_dict())
    replaced = {k for k in stock if ".embeddings." in k or "post_layernorm" in k or ".head." in k}
    assert stock - replaced <= ours
    assert all("embeddings" in k for k in ours - stock)


@pytest.mark.parametrize("vision", ["siglip", "clip"])
def test_forward_runs_with_both_towers(tokenizer, vision):
    torch.manual_seed(0)
    config = tiny_config(tokenizer, vision=vision)
    model = UmbrellaLlavaForConditionalGeneration(config).eval()
    batch = make_batch(config, [2, 1])
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    assert out.logits.shape == (*batch["input_ids"].shape, config.text_config.vocab_size)


# 3. The forward pass


def test_all_input_forms_give_identical_logits(tiny_model):
    config = tiny_model.config
    batch = make_batch(config, [2, 0, 1], slots=3)
    valid = batch["pixel_values"][batch["image_mask"]]
    common = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        reference = tiny_model(**common, pixel_values=batch["pixel_values"], image_mask=batch["image_mask"]).logits
        forms = [
            {"pixel_values": batch["pixel_values"], "num_images_per_sample": batch["num_images_per_sample"]},
            {"pixel_values": valid, "image_mask": batch["image_mask"]},
            {"pixel_values": valid, "num_images_per_sample": batch["num_images_per_sample"]},
            {"pixel_values": valid},  # counts derived from the text
        ]
        for form in forms:
            torch.testing.assert_close(tiny_model(**common, **form).logits, reference)


def test_padded_slots_cost_nothing_and_change_nothing(tiny_model):
    batch = make_batch(tiny_model.config, [1, 3], slots=4)
    encoded = []
    hook = tiny_model.model.vision_tower.embeddings.register_forward_hook(
        lambda module, args, out: encoded.append(args[0].shape[0])
    )
    with torch.no_grad():
        reference = tiny_model(**batch).logits
        batch["pixel_values"][~batch["image_mask"]] = float("nan")  # garbage in padded slots
        again = tiny_model(**batch).logits
    hook.remove()
    assert encoded == [4, 4]  # 1 + 3 valid volumes of 8 slots
    torch.testing.assert_close(again, reference)


def test_each_sample_gets_its_own_volumes_in_slot_order(tiny_model):
    batch = make_batch(tiny_model.config, [2, 1, 3], slots=3)
    seen = {}
    hook = tiny_model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        tiny_model(**batch)
    hook.remove()
    seq = tiny_model.config.image_seq_length
    for b in range(3):
        positions = (batch["input_ids"][b] == tiny_model.config.image_token_id).nonzero().flatten()
        for slot in range(int(batch["num_images_per_sample"][b])):
            with torch.no_grad():
                alone = tiny_model.model.get_image_features(batch["pixel_values"][b, slot][None]).pooler_output[0]
            block = seen["embeds"][b, positions[slot * seq : (slot + 1) * seq]]
            torch.testing.assert_close(block, alone, rtol=1e-4, atol=1e-5)


def test_batch_matches_samples_run_alone(tiny_model):
    batch = make_batch(tiny_model.config, [2, 1], slots=2)
    with torch.no_grad():
        together = tiny_model(**batch).logits
        for b in range(2):
            n = int(batch["num_images_per_sample"][b])
            keep = batch["attention_mask"][b].bool()
            alone = tiny_model(
                input_ids=batch["input_ids"][b, keep][None], pixel_values=batch["pixel_values"][b, :n][None]
            ).logits
            torch.testing.assert_close(together[b, keep], alone[0], rtol=1e-4, atol=1e-4)


def test_per_sample_mismatch_is_an_error_even_when_totals_agree(tiny_model):
    batch = make_batch(tiny_model.config, [1, 2], slots=2)
    swapped = batch["image_mask"].flip(0)  # 2 volumes for sample 0's one block, 1 for sample 1's two
    with pytest.raises(
        ValueError, match=r"sample 0: 8 image tokens, 2 volumes .*sample 1: 16 image tokens, 1 volumes"
    ):
        tiny_model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], image_mask=swapped)


@pytest.mark.parametrize("chunking", [{}, {"prefill_chunk_size": 5}])
def test_generate_refuses_a_per_sample_mismatch_even_when_totals_agree(tiny_model, chunking):
    """The same check when generate() encodes the volumes before the prefill (5.2x), also when the prefill then
    reads them chunk by chunk, as when the forward gets them."""
    if chunking and not hasattr(GenerationMixin, "_supports_mm_encoder_outputs"):
        pytest.skip(NO_PRE_ENCODING + " to every chunk")
    batch = make_batch(tiny_model.config, [1, 2], slots=2)
    swapped = batch["image_mask"].flip(0)
    inputs = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"], "image_mask": swapped}
    with pytest.raises(
        ValueError, match=r"sample 0: 8 image tokens, 2 volumes .*sample 1: 16 image tokens, 1 volumes"
    ):
        _generate(tiny_model, **inputs, **chunking)


def test_mask_and_counts_that_disagree_are_an_error(tiny_model):
    batch = make_batch(tiny_model.config, [1, 2], slots=2)
    with pytest.raises(ValueError, match="image_mask and num_images_per_sample disagree"):
        tiny_model(**{**batch, "num_images_per_sample": torch.tensor([2, 1])})


def test_wrong_volume_shape_is_an_error(tiny_model):
    batch = make_batch(tiny_model.config, [1, 1])
    batch["pixel_values"] = batch["pixel_values"][..., :8]
    with pytest.raises(ValueError, match="Expected volumes of shape"):
        tiny_model(**batch)


def test_image_tokens_without_volumes_are_an_error(tiny_model):
    batch = make_batch(tiny_model.config, [1, 0])
    with pytest.raises(ValueError, match="sample 0: 8 image tokens, 0 volumes"):
        tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


# 4. generate()


NO_PRE_ENCODING = (
    "transformers 5.17's generate() has no pre-encoding hook (mm_encoder_outputs): it passes the raw volumes"
)


def pre_encodes(model) -> bool:
    """Whether this transformers' generate() encodes the volumes once before the prefill (5.2x, `mm_encoder_outputs`)."""
    return bool(getattr(model, "_supports_mm_encoder_outputs", lambda: False)())


def _generate(model, **inputs):
    return model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)


def test_generate_refuses_image_tokens_without_volumes(tiny_model):
    """The forward leaves this check to generate() when it has a cache; generate() makes it on the prompt."""
    batch = make_batch(tiny_model.config, [1, 0])
    with pytest.raises(ValueError, match="sample 0: 8 image tokens, 0 volumes"):
        _generate(tiny_model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_greedy_generation_matches_the_forward_pass(tiny_model):
    """Mirrors transformers' `test_greedy_generate`."""
    batch = make_batch(tiny_model.config, [2, 1])
    generated = _generate(tiny_model, **batch)
    prompt_len = batch["input_ids"].shape[1]
    full_mask = torch.cat([batch["attention_mask"], torch.ones_like(generated[:, prompt_len:])], dim=1)
    with torch.no_grad():
        logits = tiny_model(**{**batch, "input_ids": generated, "attention_mask": full_mask}).logits
    torch.testing.assert_close(logits[:, prompt_len - 1 : -1].argmax(-1), generated[:, prompt_len:])


def other_volumes(batch: dict, seed: int = 7) -> dict:
    """The same batch with other random volumes in its valid slots (a negative control for generation)."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = (
        torch.randn(batch["pixel_values"].shape, generator=generator)
        * batch["image_mask"][..., None, None, None, None]
    )
    return {**batch, "pixel_values": pixel_values}


def test_batched_left_padded_generation_matches_each_sample_alone(volume_sensitive_model):
    """Mirrors transformers' `test_left_padding_compatibility`."""
    model = volume_sensitive_model
    batch = make_batch(model.config, [2, 1, 0], slots=2)
    together = _generate(model, **batch)
    for b in range(3):
        n, keep = int(batch["num_images_per_sample"][b]), batch["attention_mask"][b].bool()
        alone = _generate(
            model,
            input_ids=batch["input_ids"][b, keep][None],
            pixel_values=batch["pixel_values"][b, :n][None] if n else None,
        )
        assert together[b, -6:].tolist() == alone[0, -6:].tolist()
    # Negative control: other volumes give the samples that have volumes other tokens, and leave the text-only one.
    other = _generate(model, **other_volumes(batch))
    assert together[0, -6:].tolist() != other[0, -6:].tolist()
    assert together[1, -6:].tolist() != other[1, -6:].tolist()
    assert together[2, -6:].tolist() == other[2, -6:].tolist()


def test_decoding_continues_when_a_generated_token_is_the_image_token(tiny_model):
    """From the cache, a generated image token is an ordinary token: it has no volume and must not be refused."""
    from transformers import LogitsProcessor, LogitsProcessorList

    image_token = tiny_model.config.image_token_id

    class ImageTokenFirst(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == prompt_length:
                scores = torch.full_like(scores, -float("inf"))
                scores[:, image_token] = 0.0
            return scores

    batch = make_batch(tiny_model.config, [1, 2])
    prompt_length = batch["input_ids"].shape[1]
    generated = tiny_model.generate(
        **batch,
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=0,
        logits_processor=LogitsProcessorList([ImageTokenFirst()]),
    )
    assert generated.shape[1] == prompt_length + 4
    assert (generated[:, prompt_length] == image_token).all()


@pytest.mark.parametrize("flattened", [False, True])
def test_beams_and_return_sequences_keep_each_samples_volumes(volume_sensitive_model, flattened):
    """Mirrors transformers' `test_beam_search_generate` with `num_return_sequences`."""
    tiny_model = volume_sensitive_model
    batch = make_batch(tiny_model.config, [1, 2], slots=2)
    settings = {"num_beams": 3, "num_return_sequences": 2}
    if flattened:
        inputs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "pixel_values": batch["pixel_values"][batch["image_mask"]],
            "num_images_per_sample": batch["num_images_per_sample"],
        }
    else:
        inputs = batch
    together = _generate(tiny_model, **inputs, **settings)
    assert together.shape[0] == 4
    for b in range(2):
        n, keep = int(batch["num_images_per_sample"][b]), batch["attention_mask"][b].bool()
        alone = _generate(
            tiny_model,
            input_ids=batch["input_ids"][b, keep][None],
            pixel_values=batch["pixel_values"][b, :n][None],
            **settings,
        )
        assert together[2 * b : 2 * b + 2, -6:].tolist() == alone[:, -6:].tolist()
    # Negative control: other volumes, other beams.
    other = other_volumes(batch)
    other_inputs = {
        **inputs,
        "pixel_values": other["pixel_values"][batch["image_mask"]] if flattened else other["pixel_values"],
    }
    other_together = _generate(tiny_model, **other_inputs, **settings)
    for b in range(2):
        assert together[2 * b : 2 * b + 2, -6:].tolist() != other_together[2 * b : 2 * b + 2, -6:].tolist()


# 5. What transformers' common model and generation tests check, on volumes (each named after the test it mirrors)


def volume_prompt(config, seed: int) -> dict:
    """One sample, text around one volume's image-token block, as a chat prompt has."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.tensor([[20, 30] + [config.image_token_id] * config.image_seq_length + [40, 50, 60]]),
        "pixel_values": torch.randn(1, 1, config.volume_channels, *config.volume_size, generator=generator),
    }


def test_forward_with_logits_to_keep(tiny_model):
    batch = make_batch(tiny_model.config, [2, 1])
    with torch.no_grad():
        full = tiny_model(**batch).logits
        last = tiny_model(**batch, logits_to_keep=1).logits
    assert last.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:])


def test_generate_prefill_computes_logits_for_the_last_position_only(tiny_model):
    """generate() asks for `logits_to_keep=1` only from a forward that names the argument."""
    batch = make_batch(tiny_model.config, [2, 1])
    asked, positions = [], []
    hooks = [
        tiny_model.register_forward_pre_hook(
            lambda module, args, kwargs: asked.append(kwargs.get("logits_to_keep")), with_kwargs=True
        ),
        tiny_model.lm_head.register_forward_hook(lambda module, args, out: positions.append(out.shape[1])),
    ]
    try:
        _generate(tiny_model, **batch)
    finally:
        for hook in hooks:
            hook.remove()
    assert asked[0] == 1 and positions[0] == 1


def test_image_hidden_states_hold_the_valid_volumes_features(tiny_model):
    """Mirrors the output-field checks of transformers' `test_model_outputs_equivalence` for `image_hidden_states`."""
    batch = make_batch(tiny_model.config, [2, 0, 1], slots=3)
    with torch.no_grad():
        out = tiny_model(**batch)
        expected = tiny_model.get_image_features(batch["pixel_values"][batch["image_mask"]]).pooler_output
    assert tuple(out.image_hidden_states.shape) == (3, tiny_model.config.image_seq_length, 64)
    torch.testing.assert_close(out.image_hidden_states, expected)


def test_get_image_features_takes_slots_or_flattened_volumes_and_per_call_layer_and_strategy(tokenizer):
    torch.manual_seed(0)
    model = UmbrellaLlavaForConditionalGeneration(tiny_config(tokenizer, vision="clip")).eval()
    batch = make_batch(model.config, [2, 0, 1], slots=3)
    volumes = batch["pixel_values"][batch["image_mask"]]
    with torch.no_grad():
        flat = model.get_image_features(volumes).pooler_output
        assert flat.shape == (3, 8, 64)  # "default" drops CLIP's class token
        for counts in ({"image_mask": batch["image_mask"]}, {"num_images_per_sample": batch["num_images_per_sample"]}):
            torch.testing.assert_close(model.get_image_features(batch["pixel_values"], **counts).pooler_output, flat)
        assert model.get_image_features(volumes, vision_feature_select_strategy="full").pooler_output.shape[1] == 9
        second_last = model.get_image_features(volumes, vision_feature_layer=-2).pooler_output
        tower = model.model.vision_tower(volumes, output_hidden_states=True)
        torch.testing.assert_close(second_last, model.model.multi_modal_projector(tower.hidden_states[-2][:, 1:]))
        through_forward = model(**batch, vision_feature_layer=-2).image_hidden_states
    assert not torch.allclose(second_last, flat)
    torch.testing.assert_close(through_forward, second_last)


@pytest.mark.parametrize("vision", ["siglip", "clip"])
def test_disk_offload_safetensors(tokenizer, tmp_path, vision):
    """The 3-D embedder and the projector offloaded to disk give the logits they give in memory."""
    torch.manual_seed(0)
    model = UmbrellaLlavaForConditionalGeneration(tiny_config(tokenizer, vision=vision)).eval()
    model.save_pretrained(tmp_path / "model")
    device_map = {f"model.vision_tower.{name}": "cpu" for name, _ in model.model.vision_tower.named_children()}
    device_map.update(
        {
            "model.vision_tower.embeddings": "disk",
            "model.multi_modal_projector": "disk",
            "model.language_model": "cpu",
            "lm_head": "cpu",
        }
    )
    offloaded = UmbrellaLlavaForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    assert offloaded.model.vision_tower.embeddings.position_embedding.weight.device.type == "meta"
    batch = make_batch(model.config, [2, 1])
    with torch.no_grad():
        torch.testing.assert_close(offloaded(**batch).logits, model(**batch).logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading beside a GPU needs a GPU")
@pytest.mark.parametrize("offload_to", ["cpu", "disk"])
def test_cpu_offload_beside_a_gpu(volume_sensitive_model, tmp_path, offload_to):
    """What `device_map="auto"` does when GPU memory is short: the 3-D embedder and the projector on the CPU (or on
    disk), everything else on the GPU; the logits and the generated tokens are the ones of the model wholly on the
    GPU, and other volumes give other tokens."""
    model = volume_sensitive_model.eval()
    model.save_pretrained(tmp_path / "model")
    device_map = {f"model.vision_tower.{name}": 0 for name, _ in model.model.vision_tower.named_children()}
    device_map.update(
        {
            "model.vision_tower.embeddings": offload_to,
            "model.multi_modal_projector": offload_to,
            "model.language_model": 0,
            "lm_head": 0,
        }
    )
    offloaded = UmbrellaLlavaForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    on_gpu = model.to("cuda")
    batch = {key: value.to("cuda") for key, value in make_batch(model.config, [2, 1]).items()}
    with torch.no_grad():
        torch.testing.assert_close(offloaded(**batch).logits, on_gpu(**batch).logits)
    generated = offloaded.generate(**batch, max_new_tokens=6, do_sample=False)
    assert generated.tolist() == on_gpu.generate(**batch, max_new_tokens=6, do_sample=False).tolist()
    other = {**batch, "pixel_values": torch.flip(batch["pixel_values"], dims=[0]) * 3}
    assert offloaded.generate(**other, max_new_tokens=6, do_sample=False).tolist() != generated.tolist()


@pytest.mark.parametrize("mode", ["assistant_model", "prompt_lookup_num_tokens"])
def test_assisted_decoding_matches_greedy_search(volume_sensitive_model, mode):
    """Also `test_prompt_lookup_decoding_matches_greedy_search`. The assistant (the model itself) fills its own cache
    on a forward transformers does not count as the first, and must get the volumes there too: raw on 5.17, which
    the assistant encodes again; from 5.2x on, the features generate() encoded once, which transformers hands to the
    assistant."""
    model = volume_sensitive_model
    encodings = 1 if mode == "prompt_lookup_num_tokens" or pre_encodes(model) else 2
    encoded = []
    hook = model.model.vision_tower.embeddings.register_forward_hook(
        lambda module, args, out: encoded.append(args[0].shape[0])
    )
    assistance = {"assistant_model": model} if mode == "assistant_model" else {"prompt_lookup_num_tokens": 3}
    answers = []
    try:
        for seed in (0, 1):
            inputs = volume_prompt(model.config, seed)
            greedy = _generate(model, **inputs)
            encoded.clear()
            assisted = _generate(model, **inputs, **assistance)
            assert assisted.tolist() == greedy.tolist()
            assert encoded == [1] * encodings  # the assistant's prefill saw the volume
            answers.append(assisted[0, -6:].tolist())
    finally:
        hook.remove()
    assert answers[0] != answers[1]  # other volumes, other tokens


@pytest.mark.skipif(not hasattr(GenerationMixin, "_supports_mm_encoder_outputs"), reason=NO_PRE_ENCODING)
def test_generate_pre_encodes_volumes_through_mm_encoder_outputs(volume_sensitive_model, monkeypatch):
    """generate() encodes the valid volumes once, through get_image_features, and the prefill reads them from
    `mm_encoder_outputs` with each sample's count; the tokens are those of the raw-volume path."""
    model = volume_sensitive_model
    batch = make_batch(model.config, [2, 1, 0], slots=2)
    encoded, forwards = [], []
    hooks = [
        model.model.vision_tower.embeddings.register_forward_hook(
            lambda m, args, out: encoded.append(args[0].shape[0])
        ),
        model.register_forward_pre_hook(lambda m, args, kwargs: forwards.append(kwargs), with_kwargs=True),
    ]
    try:
        pre_encoded = _generate(model, **batch)
    finally:
        for hook in hooks:
            hook.remove()
    assert encoded == [3]  # the three valid volumes, once, before the prefill
    prefill = forwards[0]
    assert prefill.get("pixel_values") is None
    image = prefill["mm_encoder_outputs"]["image"]
    assert image.pooler_output.shape[:2] == (3, model.config.image_seq_length)
    assert image.num_images_per_sample.tolist() == [2, 1, 0]
    assert all(kwargs.get("mm_encoder_outputs") is None for kwargs in forwards[1:])

    monkeypatch.setattr(model, "_supports_mm_encoder_outputs", lambda: False)  # raw volumes into the prefill
    assert _generate(model, **batch).tolist() == pre_encoded.tolist()
    other = _generate(model, **other_volumes(batch))
    assert other[0, -6:].tolist() != pre_encoded[0, -6:].tolist()


@pytest.mark.skipif(
    not hasattr(GenerationMixin, "_supports_mm_encoder_outputs"),
    reason=NO_PRE_ENCODING + " to every chunk, and a chunk cannot hold part of a volume",
)
@pytest.mark.parametrize("chunk_size", [3, 8, 13])
def test_prefill_chunking_matches_unchunked_generation(volume_sensitive_model, chunk_size):
    """`prefill_chunk_size` splits the prompt, image-token blocks included (8 tokens per volume here), and gives
    the tokens of the unchunked prefill; other volumes give other tokens."""
    model = volume_sensitive_model
    batch = make_batch(model.config, [2, 1, 0], slots=2)
    whole = _generate(model, **batch)
    chunked = _generate(model, **batch, prefill_chunk_size=chunk_size)
    assert chunked.tolist() == whole.tolist()
    other = _generate(model, **other_volumes(batch), prefill_chunk_size=chunk_size)
    assert other[0, -6:].tolist() != chunked[0, -6:].tolist()
    assert other[1, -6:].tolist() != chunked[1, -6:].tolist()


def test_sample_generate(volume_sensitive_model):
    """Sampling keeps each sample's volumes: the same seed gives the same tokens, near-zero temperature gives the
    greedy tokens of a left-padded batch, and other volumes give other tokens."""
    model = volume_sensitive_model
    batch = make_batch(model.config, [2, 1], slots=2)
    sampled = []
    for _ in range(2):
        torch.manual_seed(0)
        sampled.append(model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=0))
    assert sampled[0].tolist() == sampled[1].tolist()
    cold = model.generate(**batch, max_new_tokens=6, do_sample=True, temperature=1e-4, top_k=0, pad_token_id=0)
    assert cold.tolist() == _generate(model, **batch).tolist()
    torch.manual_seed(0)
    other = model.generate(**other_volumes(batch), max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=0)
    assert other[:, -6:].tolist() != sampled[0][:, -6:].tolist()


def test_resize_tokens_embeddings(tiny_model):
    """Growing the vocabulary (new special tokens) keeps the volume path and every old token's logit."""
    model = tiny_model
    batch = make_batch(model.config, [2, 1], slots=2)
    with torch.no_grad():
        before = model(**batch).logits
    vocab = model.config.text_config.vocab_size
    model.resize_token_embeddings(vocab + 10, pad_to_multiple_of=8)
    grown = model.config.text_config.vocab_size
    assert grown >= vocab + 10 and grown % 8 == 0
    assert model.get_input_embeddings().weight.shape[0] == model.lm_head.weight.shape[0] == grown
    with torch.no_grad():
        after = model(**batch).logits
    assert after.shape[-1] == grown
    torch.testing.assert_close(after[..., :vocab], before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_matches_sdpa_inference(tokenizer, dtype):
    """Eager and SDPA attention give the same logits and image features with volumes, in a left-padded batch with
    a text-only sample (compared where the attention mask is 1)."""
    models = {}
    for implementation in ("eager", "sdpa"):
        config = tiny_config(tokenizer)
        config._attn_implementation = implementation  # the towers' sub-configs follow
        torch.manual_seed(0)
        models[implementation] = UmbrellaLlavaForConditionalGeneration(config).eval()
        for tower in (models[implementation].model.vision_tower, models[implementation].model.language_model):
            assert tower.config._attn_implementation == implementation
    eager, sdpa = models["eager"], models["sdpa"]
    eager, sdpa = eager.to(dtype), sdpa.to(dtype)
    batch = make_batch(eager.config, [2, 1, 0], slots=2)
    with torch.no_grad():
        out_eager, out_sdpa = eager(**batch), sdpa(**batch)
    keep = batch["attention_mask"].bool()
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(out_sdpa.logits[keep], out_eager.logits[keep], **tolerance)
    torch.testing.assert_close(out_sdpa.image_hidden_states, out_eager.image_hidden_states, **tolerance)


def test_generate_compile_model_forward_fullgraph(volume_sensitive_model):
    """A static cache and `torch.compile(fullgraph=True)` of the decoding step: no branch on tensor values. The
    eager backend traces the whole graph without generating code, which is what fullgraph checks."""
    model = volume_sensitive_model
    compile_config = CompileConfig(fullgraph=True, backend="eager")
    compile_config._compile_all_devices = True  # as transformers' own test does on CPU
    torch._dynamo.reset()
    answers = []
    for seed in (0, 1):
        inputs = volume_prompt(model.config, seed)
        eager = _generate(model, **inputs)
        compiled = _generate(model, **inputs, cache_implementation="static", compile_config=compile_config)
        assert compiled.tolist() == eager.tolist()
        answers.append(compiled[0, -6:].tolist())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert answers[0] != answers[1]  # other volumes, other tokens
