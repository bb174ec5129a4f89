"""`VolumeConversation`: a follow-up question is answered from the cache, as one call on the whole conversation
would answer it, and no scan is encoded twice."""

import torch

from umbrella_llava.chat import VolumeConversation, answer_question


def test_a_follow_up_is_answered_from_the_cache_as_one_call_on_the_whole_conversation(
    volume_sensitive_model, tiny_processor, mni_volume_paths
):
    model = volume_sensitive_model
    scans = [mni_volume_paths["T1"], mni_volume_paths["GM"]]
    encoded = []
    hook = model.model.vision_tower.register_forward_hook(lambda _, args, out: encoded.append(args[0].shape[0]))
    try:
        conversation = VolumeConversation(model, tiny_processor, scans, max_new_tokens=5)
        first = conversation.ask("Which scan is the grey-matter map?")
        second = conversation.ask("Are you sure?")
    finally:
        hook.remove()
    assert encoded == [2], "both scans encoded once, for the first question only"
    assert [m["role"] for m in conversation.messages] == ["user", "assistant", "user", "assistant"]
    assert conversation.messages[2]["content"] == [{"type": "text", "text": "Are you sure?"}]

    # The same conversation asked in one call, without a cache.
    prompt = conversation.prompt_ids(conversation.messages[:3])
    expected = model.generate(
        input_ids=prompt[None], pixel_values=conversation.pixel_values, max_new_tokens=5, do_sample=False
    )
    assert second == tiny_processor.decode(expected[0, len(prompt) :], skip_special_tokens=True).strip()
    assert first == answer_question(model, tiny_processor, scans, "Which scan is the grey-matter map?", 5)

    # Negative control: other scans, other answer.
    other = answer_question(
        model,
        tiny_processor,
        [mni_volume_paths["WM"], mni_volume_paths["WM"]],
        "Which scan is the grey-matter map?",
        5,
    )
    assert other != first


def test_scans_are_preprocessed_as_the_processor_does(tiny_model, tiny_processor, mni_volume_paths):
    conversation = VolumeConversation(tiny_model, tiny_processor, [mni_volume_paths["T1"]])
    expected = tiny_processor(text=["<image>"], images=[[mni_volume_paths["T1"]]], return_tensors="pt")["pixel_values"]
    assert torch.equal(conversation.pixel_values, expected)
