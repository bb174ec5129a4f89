"""UmbrellaLlavaProcessor: image-token expansion, placeholder checks, the ChatML template, the remote-code round trip."""

import pytest
import torch
from conftest import run_without_package
from transformers import ProcessorMixin

from umbrella_llava.image_processing_umbrella_llava import UmbrellaVolumeProcessor
from umbrella_llava.processing_umbrella_llava import UmbrellaLlavaProcessor


def image_token_runs(input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    """Lengths of the runs of consecutive image tokens in one row."""
    runs, current = [], 0
    for token in input_ids.tolist() + [None]:
        if token == image_token_id:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


def test_each_placeholder_becomes_one_image_token_block_and_volumes_are_batched(tiny_processor, mni_volume_paths):
    t1, gm = mni_volume_paths["T1"], mni_volume_paths["GM"]
    batch = tiny_processor(
        text=["<image>\nCompare this scan <image> with the first.", "Which scan is brighter?"],
        images=[[t1, gm], []],
        padding=True,
        return_tensors="pt",
    )

    image_token_id = tiny_processor.image_token_id
    assert image_token_runs(batch["input_ids"][0], image_token_id) == [8, 8]
    assert image_token_runs(batch["input_ids"][1], image_token_id) == []
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["pixel_values"].shape == (2, 2, 1, 16, 16, 16)
    assert batch["image_mask"].tolist() == [[True, True], [False, False]]
    assert batch["num_images_per_sample"].tolist() == [2, 0]
    image_processor = tiny_processor.image_processor
    torch.testing.assert_close(batch["pixel_values"][0, 0], image_processor.preprocess_volume(t1))
    torch.testing.assert_close(batch["pixel_values"][0, 1], image_processor.preprocess_volume(gm))


@pytest.mark.parametrize(
    "text, images, message",
    [
        (
            ["<image> one", "<image><image> two"],
            [["T1"], ["T1"]],
            "Sample 1 has 2 <image> placeholders .* but 1 volumes",
        ),
        (["no placeholder"], [["T1"]], "Sample 0 has 0 <image> placeholders .* but 1 volumes"),
        (["<image> but no volume"], None, "Sample 0 has 1 <image> placeholders .* but 0 volumes"),
    ],
)
def test_placeholders_that_disagree_with_volumes_name_the_sample_and_both_counts(
    tiny_processor, mni_volume_paths, text, images, message
):
    if images is not None:
        images = [[mni_volume_paths[name] for name in sample] for sample in images]
    with pytest.raises(ValueError, match=message):
        tiny_processor(text=text, images=images)


def test_truncation_through_an_image_token_block_is_an_error(tiny_processor, mni_t1_path):
    with pytest.raises(ValueError, match="Sample 0 keeps 3 image tokens .* need 8; truncation cut an image-token"):
        tiny_processor(text="Describe <image>", images=[[mni_t1_path]], truncation=True, max_length=5)


@pytest.mark.parametrize("images", [None, [[], []]])
def test_batch_without_volumes_is_text_only(tiny_processor, images):
    batch = tiny_processor(text=["Hello", "Is this scan T1?"], images=images, padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape[0] == 2


def test_default_chat_template_renders_content_items_and_strings_and_opens_the_assistant_turn(tiny_processor):
    conversation = [
        {"role": "system", "content": "You are a helpful radiology assistant."},
        {
            "role": "user",
            "content": [
                {"type": "image", "modality": "T1", "image_path": "sub-01_T1w.nii.gz"},
                {"type": "text", "text": "Is this a T1-weighted brain MRI?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
        {"role": "user", "content": "<image>\nAnd this one?"},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful radiology assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nIs this a T1-weighted brain MRI?<|im_end|>\n"
        "<|im_start|>assistant\nYes.<|im_end|>\n"
        "<|im_start|>user\n<image>\nAnd this one?<|im_end|>\n"
    )
    assert tiny_processor.apply_chat_template(conversation) == expected
    prompt = tiny_processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == expected + "<|im_start|>assistant\n"


def test_chat_template_with_tokenize_gives_the_inputs_of_the_processor_call(tiny_processor, mni_t1_path):
    conversation = [
        {"role": "user", "content": [{"type": "image", "path": str(mni_t1_path)}, {"type": "text", "text": "T1?"}]}
    ]
    inputs = tiny_processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    prompt = "<|im_start|>user\n<image>\nT1?<|im_end|>\n<|im_start|>assistant\n"
    expected = tiny_processor(text=prompt, images=[[mni_t1_path]], return_tensors="pt")
    assert set(inputs) == set(expected)
    for key, value in expected.items():
        assert torch.equal(inputs[key], value), key


def test_a_given_chat_template_replaces_the_default(tokenizer):
    template = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    processor = UmbrellaLlavaProcessor(
        image_processor=UmbrellaVolumeProcessor(volume_size=16),
        tokenizer=tokenizer,
        image_seq_length=8,
        chat_template=template,
    )
    assert processor.apply_chat_template([{"role": "user", "content": "plain"}]) == "plain"


@pytest.mark.parametrize("image_seq_length", [None, 0, 2.5])
def test_image_seq_length_must_be_a_positive_int(tokenizer, image_seq_length):
    with pytest.raises(ValueError, match="image_seq_length"):
        UmbrellaLlavaProcessor(
            image_processor=UmbrellaVolumeProcessor(volume_size=16),
            tokenizer=tokenizer,
            image_seq_length=image_seq_length,
        )


@pytest.mark.slow
def test_save_and_load_with_trust_remote_code_without_the_package_gives_the_same_output(
    tiny_processor, mni_volume_paths, tmp_path
):
    if UmbrellaLlavaProcessor._auto_class is None:
        UmbrellaLlavaProcessor.register_for_auto_class("AutoProcessor")
    if UmbrellaVolumeProcessor._auto_class is None:
        UmbrellaVolumeProcessor.register_for_auto_class("AutoImageProcessor")
    tiny_processor.save_pretrained(tmp_path / "checkpoint")
    texts = ["<image>\nIs this a T1-weighted brain MRI?", "Compare <image> with <image>."]
    images = [[str(mni_volume_paths["T1"])], [str(mni_volume_paths["GM"]), str(mni_volume_paths["WM"])]]
    expected = tiny_processor(text=texts, images=images, padding=True, return_tensors="pt")

    run_without_package(
        f"""
        import torch
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained({str(tmp_path / "checkpoint")!r}, trust_remote_code=True)
        assert type(processor).__name__ == "UmbrellaLlavaProcessor", type(processor)
        assert processor.image_seq_length == 8
        batch = processor(text={texts!r}, images={images!r}, padding=True, return_tensors="pt")
        prompt = processor.apply_chat_template(
            [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Hi"}}]}}],
            add_generation_prompt=True,
        )
        torch.save({{**batch, "prompt": prompt}}, {str(tmp_path / "remote.pt")!r})
        """,
        cwd=tmp_path,
    )

    remote = torch.load(tmp_path / "remote.pt")
    assert set(remote) - {"prompt"} == set(expected)
    for key, value in expected.items():
        assert torch.equal(remote[key], value), key
    assert remote["prompt"] == "<|im_start|>user\n<image>\nHi<|im_end|>\n<|im_start|>assistant\n"


# transformers gained placeholder-aware assistant masks (`_adjust_assistant_masks_indices`) after 5.17.
SHIFTS_ASSISTANT_MASKS = hasattr(ProcessorMixin, "_adjust_assistant_masks_indices")


def conversation_with_volumes(paths: list, answers: tuple[str, str] = ("The left one.", "Same.")) -> list[dict]:
    """Two user turns sharing `paths` (the first all but the last, the second the last) and two assistant answers."""
    first, second = paths[:-1], paths[-1:]
    return [
        {"role": "system", "content": "You read brain MRI."},
        {
            "role": "user",
            "content": [*({"type": "image", "path": str(p)} for p in first), {"type": "text", "text": "Which?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": answers[0]}]},
        {
            "role": "user",
            "content": [*({"type": "image", "path": str(p)} for p in second), {"type": "text", "text": "And?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": answers[1]}]},
    ]


def test_unstructured_kwargs_reach_the_volume_processor_and_the_tokenizer(tiny_processor, mni_t1_path):
    # transformers' ProcessorTesterMixin.test_unstructured_kwargs: flat keywords are routed by `_merge_kwargs`.
    prompt, images = "<image>\nT1?", [[mni_t1_path]]
    batch = tiny_processor(
        text=prompt, images=images, voxel_spacing=4.0, normalization="minmax", padding="max_length", max_length=24
    )
    expected = UmbrellaVolumeProcessor(volume_size=16, voxel_spacing=4.0, normalization="minmax")([[mni_t1_path]])
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"], rtol=0, atol=0)
    default = tiny_processor(text=prompt, images=images)["pixel_values"]
    assert not torch.equal(batch["pixel_values"], default)
    assert len(batch["input_ids"][0]) == 24


def test_structured_kwargs_nested(tiny_processor, mni_t1_path):
    # transformers' ProcessorTesterMixin.test_structured_kwargs_nested: options grouped per modality.
    batch = tiny_processor(
        text="<image>\nT1?",
        images=[[mni_t1_path]],
        images_kwargs={"clip_percentiles": [2.0, 98.0], "normalization": "none"},
        text_kwargs={"padding": "max_length", "max_length": 24},
        return_tensors="pt",
    )
    expected = UmbrellaVolumeProcessor(volume_size=16, clip_percentiles=[2.0, 98.0], normalization="none")(
        [[mni_t1_path]]
    )
    torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"], rtol=0, atol=0)
    assert batch["input_ids"].shape == (1, 24)


def test_flat_list_of_volumes_is_dealt_out_by_each_texts_placeholders(tiny_processor, mni_volume_paths):
    # As LLaVA deals a flat list of images out to a batch of texts (the image-text-to-text pipeline passes one).
    t1, gm, wm = (mni_volume_paths[name] for name in ("T1", "GM", "WM"))
    texts = ["<image><image> two", "<image> one", "none"]
    flat = tiny_processor(text=texts, images=[t1, gm, wm], padding=True, return_tensors="pt")
    nested = tiny_processor(text=texts, images=[[t1, gm], [wm], []], padding=True, return_tensors="pt")
    assert flat["num_images_per_sample"].tolist() == [2, 1, 0]
    for key, value in nested.items():
        assert torch.equal(flat[key], value), key


@pytest.mark.skipif(not SHIFTS_ASSISTANT_MASKS, reason="transformers 5.17's apply_chat_template ignores the expansion")
@pytest.mark.parametrize("num_volumes", [0, 1, 3])
def test_apply_chat_template_assistant_mask(tiny_processor, mni_volume_paths, num_volumes):
    # transformers' ProcessorTesterMixin.test_apply_chat_template_assistant_mask, with volumes expanded into blocks.
    from umbrella_llava.data import tokenize_conversation

    paths = [mni_volume_paths[name] for name in ("T1", "GM", "WM")][:num_volumes]
    messages = conversation_with_volumes(paths) if paths else conversation_with_volumes(["x"])
    if not paths:  # text only: no image items at all
        messages = [
            {**m, "content": [c for c in m["content"] if c.get("type") != "image"]} if m["role"] == "user" else m
            for m in messages
        ]
    out = tiny_processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    mask = out["assistant_masks"][0].bool()
    assert (out["input_ids"][0] == tiny_processor.image_token_id).sum() == 8 * num_volumes
    marked = tiny_processor.tokenizer.decode(out["input_ids"][0][mask])
    assert marked == "The left one.<|im_end|>Same.<|im_end|>"
    # The same tokens that the package's own turn-masked labels train on.
    input_ids, labels = tokenize_conversation(tiny_processor, messages)
    assert torch.equal(out["input_ids"][0], input_ids)
    assert torch.equal(mask, labels != -100)


@pytest.mark.skipif(SHIFTS_ASSISTANT_MASKS, reason="this transformers shifts the assistant spans past each expansion")
def test_apply_chat_template_assistant_mask_with_volumes_is_refused_where_it_would_be_wrong(
    tiny_processor, mni_t1_path
):
    with pytest.raises(NotImplementedError, match="needs transformers 5.18 or newer"):
        tiny_processor.apply_chat_template(
            conversation_with_volumes([mni_t1_path]),
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
