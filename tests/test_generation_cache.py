"""A conversation continues from the cache that `generate()` returned, as transformers' own generation tests ask of
every model (`test_generate_continue_from_past_key_values`, `test_generate_from_inputs_embeds`), with the volume
inputs a follow-up question may carry."""

import copy

import pytest
import torch
from test_modeling import make_batch

GREEDY = {
    "pad_token_id": -1,
    "eos_token_id": -1,
    "do_sample": False,
    "use_cache": True,
    "return_dict_in_generate": True,
    "output_scores": True,
}


def _cache_kwarg(output) -> dict:
    """The returned cache under the name generate() takes it: `cache` from transformers 5.2x on, else
    `past_key_values`; deep-copied, since decoding extends it in place."""
    cache = getattr(output, "cache", None)
    if cache is not None:
        return {"cache": copy.deepcopy(cache)}
    return {"past_key_values": copy.deepcopy(output.past_key_values)}


def _extended_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(attention_mask, (0, length - attention_mask.shape[1]), value=1)


def _volume_inputs(batch: dict) -> dict:
    return {key: batch[key] for key in ("pixel_values", "image_mask", "num_images_per_sample")}


@pytest.mark.parametrize("volumes_again", [False, True], ids=["without-volumes", "with-the-same-volumes"])
def test_generate_continue_from_past_key_values(volume_sensitive_model, volumes_again):
    model = volume_sensitive_model
    batch = make_batch(model.config, [1, 2], slots=2)
    full = model.generate(**batch, **GREEDY, max_new_tokens=4)
    first = model.generate(**batch, **GREEDY, max_new_tokens=3)

    inputs = {
        "input_ids": first.sequences,
        "attention_mask": _extended_mask(batch["attention_mask"], first.sequences.shape[1]),
        **(_volume_inputs(batch) if volumes_again else {}),
    }
    encoded = []
    hook = model.model.vision_tower.register_forward_hook(lambda *args: encoded.append(True))
    try:
        continued = model.generate(**inputs, **_cache_kwarg(first), **GREEDY, max_new_tokens=1)
    finally:
        hook.remove()
    assert not encoded, "the cache already holds the volumes: none is encoded again"
    assert torch.equal(continued.sequences, full.sequences)
    torch.testing.assert_close(torch.stack(first.scores + continued.scores), torch.stack(full.scores))

    # Negative control: other volumes give other tokens, so the equality above is the volumes' doing.
    other = make_batch(model.config, [1, 2], slots=2, seed=1)
    other_tokens = model.generate(**{**batch, **_volume_inputs(other)}, **GREEDY, max_new_tokens=4).sequences
    assert not torch.equal(other_tokens, full.sequences)


@pytest.mark.parametrize("given", ["all-volumes", "new-volume-only"])
def test_a_follow_up_with_a_new_scan_continues_as_one_call_on_the_whole_conversation(volume_sensitive_model, given):
    """Turn 1 asks about scan A; turn 2 adds scan B. From the cache of turn 1, only B is encoded, whether the call
    passes both volumes or B alone, and the answer is that of one call on the whole conversation."""
    model = volume_sensitive_model
    config = model.config
    two = make_batch(config, [2], slots=2)
    volume_a, volume_b = two["pixel_values"][:, :1], two["pixel_values"][:, 1:]
    image_block = [config.image_token_id] * config.image_seq_length
    turn_1 = torch.tensor([[11, 12, *image_block, 13, 14]])
    answer = model.generate(input_ids=turn_1, pixel_values=volume_a, **GREEDY, max_new_tokens=3)

    conversation = torch.cat([answer.sequences, torch.tensor([[21, *image_block, 22, 23]])], dim=1)
    whole = model.generate(input_ids=conversation, pixel_values=two["pixel_values"], **GREEDY, max_new_tokens=4)

    volumes = two["pixel_values"] if given == "all-volumes" else volume_b
    encoded = []
    hook = model.model.vision_tower.register_forward_hook(lambda _, args, out: encoded.append(args[0].shape[0]))
    try:
        continued = model.generate(
            input_ids=conversation,
            attention_mask=torch.ones_like(conversation),
            pixel_values=volumes,
            **_cache_kwarg(answer),
            **GREEDY,
            max_new_tokens=4,
        )
    finally:
        hook.remove()
    assert encoded == [1], "only the new scan is encoded"
    assert torch.equal(continued.sequences, whole.sequences)

    # Negative control: with another second scan the follow-up's answer changes.
    swapped = model.generate(
        input_ids=conversation, pixel_values=torch.cat([volume_a, volume_a], dim=1), **GREEDY, max_new_tokens=4
    )
    assert not torch.equal(swapped.sequences, whole.sequences)


def test_continuing_with_volumes_that_fit_neither_the_new_tokens_nor_the_whole_is_refused(volume_sensitive_model):
    model = volume_sensitive_model
    batch = make_batch(model.config, [1, 2], slots=2)
    first = model.generate(**batch, **GREEDY, max_new_tokens=2)
    wrong = {"pixel_values": batch["pixel_values"], "image_mask": torch.tensor([[True, True], [True, False]])}
    with pytest.raises(ValueError, match=r"do not match per sample .*sample 0: 0 image tokens, 2 volumes"):
        model.generate(
            input_ids=first.sequences,
            attention_mask=_extended_mask(batch["attention_mask"], first.sequences.shape[1]),
            **wrong,
            **_cache_kwarg(first),
            **GREEDY,
            max_new_tokens=1,
        )


def test_generate_from_inputs_embeds_with_image_tokens_in_the_ids(volume_sensitive_model):
    """Mirrors transformers' `test_generate_from_inputs_embeds`: the embeddings (with the volumes' features written
    into the image tokens) feed the prefill, so the ids' image tokens need no volumes."""
    model = volume_sensitive_model
    batch = make_batch(model.config, [1, 2], slots=2)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch["input_ids"])
        features = model.get_image_features(batch["pixel_values"], image_mask=batch["image_mask"]).pooler_output
        is_image = (batch["input_ids"] == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(is_image, features.to(embeds.dtype))
    expected = model.generate(**batch, **GREEDY, max_new_tokens=4).sequences
    from_embeds = model.generate(
        input_ids=batch["input_ids"],
        inputs_embeds=embeds,
        attention_mask=batch["attention_mask"],
        **GREEDY,
        max_new_tokens=4,
    ).sequences
    assert torch.equal(from_embeds, expected)


def test_get_image_features_without_return_dict_gives_a_tuple_as_llava_does(volume_sensitive_model):
    batch = make_batch(volume_sensitive_model.config, [1, 2], slots=2)
    output = volume_sensitive_model.get_image_features(batch["pixel_values"], image_mask=batch["image_mask"])
    as_tuple = volume_sensitive_model.get_image_features(
        batch["pixel_values"], image_mask=batch["image_mask"], return_dict=False
    )
    assert type(as_tuple) is tuple
    assert torch.equal(as_tuple[0], output[0]) and len(as_tuple) == len(output.to_tuple())
