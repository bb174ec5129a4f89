"""pipeline("image-text-to-text") on volumes, named after transformers' tests/pipelines/test_pipelines_image_text_to_text.py.

The model is the tiny one with its attention scaled (as `volume_sensitive_model` in test_modeling.py), so that what it
generates depends on the volumes: each test that checks an answer also checks that other volumes give another one.
"""

import numpy as np
import pytest
import torch
from conftest import run_without_package, tiny_config
from transformers import pipeline
from transformers.pipelines import ImageTextToTextPipeline

from umbrella_llava import UmbrellaLlavaForConditionalGeneration, UmbrellaLlavaProcessor, UmbrellaVolumeProcessor
from umbrella_llava.pipeline_umbrella_llava import UmbrellaLlavaImageTextToTextPipeline

pytest.importorskip("PIL", reason="transformers' image-text-to-text pipeline requires the vision backend (Pillow)")

MAX_NEW_TOKENS = 5


def volume_sensitive_model(tokenizer) -> UmbrellaLlavaForConditionalGeneration:
    torch.manual_seed(0)
    model = UmbrellaLlavaForConditionalGeneration(tiny_config(tokenizer)).eval()
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.v_proj.weight.mul_(30.0)
            layer.self_attn.o_proj.weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory):
    """A saved tiny model with its processor, as `scripts/convert_llava_checkpoint.py` or training leave one."""
    folder = tmp_path_factory.mktemp("pipeline") / "checkpoint"
    volume_sensitive_model(tokenizer).save_pretrained(folder)
    processor = UmbrellaLlavaProcessor(
        image_processor=UmbrellaVolumeProcessor(volume_size=16), tokenizer=tokenizer, image_seq_length=8
    )
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return pipeline("image-text-to-text", model=str(checkpoint), trust_remote_code=True, max_new_tokens=MAX_NEW_TOKENS)


def new_tokens(outputs) -> list[list[int]]:
    """The generated token ids of each output of a `return_tensors=True` call (one list per input)."""
    outputs = [o[0] if isinstance(o, list) else o for o in outputs]
    return [o["generated_token_ids"][-MAX_NEW_TOKENS:].tolist() for o in outputs]


def user_chat(paths, question: str = "What is this?") -> list[dict]:
    content = [{"type": "image", "path": str(p)} for p in paths] + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def test_saved_checkpoint_names_the_volume_pipeline_for_the_task(pipe, checkpoint):
    assert type(pipe).__name__ == "UmbrellaLlavaImageTextToTextPipeline"
    assert type(pipe).__module__.startswith("transformers_modules")  # loaded from the folder, as remote code
    assert (checkpoint / "pipeline_umbrella_llava.py").is_file()


def test_small_model_pt_token(pipe, mni_volume_paths):
    # A NIfTI path, a list of paths, an array and a tensor beside a text with one <image> per volume.
    t1, gm = str(mni_volume_paths["T1"]), str(mni_volume_paths["GM"])
    outputs = pipe(t1, text="<image> What is this?")
    assert outputs == [{"input_text": "<image> What is this?", "generated_text": outputs[0]["generated_text"]}]
    assert outputs[0]["generated_text"].startswith("<image> What is this?")

    by_path = new_tokens(pipe(t1, text="<image> What is this?", return_tensors=True))
    processed = pipe.processor.image_processor.preprocess_volume(t1)  # (C, H, W, D), already at volume_size
    by_tensor = new_tokens(pipe(processed, text="<image> What is this?", return_tensors=True))
    by_array = new_tokens(pipe(processed[0].numpy(), text="<image> What is this?", return_tensors=True))
    assert by_path == by_tensor == by_array
    other = new_tokens(pipe(gm, text="<image> What is this?", return_tensors=True))
    assert other != by_path  # negative control: the answer depends on the volume

    two = new_tokens(pipe([t1, gm], text="Compare <image> and <image>", return_tensors=True))
    assert two != new_tokens(pipe([gm, t1], text="Compare <image> and <image>", return_tensors=True))  # in order

    # As in transformers' test: a list of images beside a list of texts, one image each.
    batch = pipe([t1, gm], text=["<image> What is this?", "<image> What is this?"], return_tensors=True)
    assert new_tokens(batch) == by_path + other


def test_model_pt_chat_template(pipe, mni_volume_paths):
    t1, gm = mni_volume_paths["T1"], mni_volume_paths["GM"]
    outputs = pipe(text=user_chat([t1]), return_full_text=False)
    assert outputs[0]["input_text"] == user_chat([t1])
    assert isinstance(outputs[0]["generated_text"], str)
    chat = new_tokens(pipe(text=user_chat([t1]), return_tensors=True))
    assert chat != new_tokens(pipe(text=user_chat([gm]), return_tensors=True))


def test_consistent_batching_behaviour(pipe, mni_volume_paths):
    # Chats with 1, 2, 0 and 3 volumes: batched at batch_size=2 and 4, each gives what it gives alone.
    t1, gm, wm = (mni_volume_paths[name] for name in ("T1", "GM", "WM"))
    chats = [user_chat([t1]), user_chat([gm, wm]), user_chat([], "Hello?"), user_chat([wm, t1, gm])]
    alone = [new_tokens(pipe(text=chat, return_tensors=True))[0] for chat in chats]
    for batch_size in (2, 4):
        assert new_tokens(pipe(text=chats, batch_size=batch_size, return_tensors=True)) == alone
    assert len({tuple(tokens) for tokens in alone}) > 1


def test_small_model_pt_with_model_and_processor_objects(checkpoint, tokenizer, mni_volume_paths):
    model = UmbrellaLlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = UmbrellaLlavaProcessor.from_pretrained(checkpoint)
    pipe = pipeline(
        "image-text-to-text",
        model=model,
        processor=processor,
        pipeline_class=UmbrellaLlavaImageTextToTextPipeline,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    chats = [user_chat([mni_volume_paths["T1"]]), user_chat([mni_volume_paths["GM"], mni_volume_paths["WM"]])]
    alone = [new_tokens(pipe(text=chat, return_tensors=True))[0] for chat in chats]
    assert new_tokens(pipe(text=chats, batch_size=2, return_tensors=True)) == alone


def test_stock_pipeline_cannot_batch_volumes_or_read_nifti(checkpoint, mni_volume_paths):
    """Why the checkpoint ships its own pipeline class: transformers' opens `images=` with PIL and stacks
    `pixel_values` of different volume counts."""
    model = UmbrellaLlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = UmbrellaLlavaProcessor.from_pretrained(checkpoint)
    stock = ImageTextToTextPipeline(model=model, processor=processor, max_new_tokens=MAX_NEW_TOKENS)
    with pytest.raises(OSError, match="cannot identify image file"):  # PIL's UnidentifiedImageError
        stock(str(mni_volume_paths["T1"]), text="<image> What is this?")
    chats = [user_chat([mni_volume_paths["T1"]]), user_chat([mni_volume_paths["GM"], mni_volume_paths["WM"]])]
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        stock(text=chats, batch_size=2)


@pytest.mark.slow
def test_small_model_pt_token_without_the_package(pipe, checkpoint, mni_volume_paths, tmp_path):
    t1, gm = str(mni_volume_paths["T1"]), str(mni_volume_paths["GM"])
    chats = [user_chat([t1]), user_chat([gm, t1])]
    expected = {
        "path": new_tokens(pipe(t1, text="<image> What is this?", return_tensors=True)),
        "chats": new_tokens(pipe(text=chats, batch_size=2, return_tensors=True)),
    }
    result = run_without_package(
        f"""
        import json
        from transformers import pipeline
        pipe = pipeline("image-text-to-text", model={str(checkpoint)!r}, trust_remote_code=True, max_new_tokens=5)
        def new_tokens(outputs):
            outputs = [o[0] if isinstance(o, list) else o for o in outputs]
            return [o["generated_token_ids"][-5:].tolist() for o in outputs]
        print(json.dumps({{
            "path": new_tokens(pipe({t1!r}, text="<image> What is this?", return_tensors=True)),
            "chats": new_tokens(pipe(text={chats!r}, batch_size=2, return_tensors=True)),
        }}))
        """,
        cwd=tmp_path,
    )
    import json

    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_volume_array_of_any_size_is_resized_like_a_file(pipe):
    volume = np.random.default_rng(0).random((20, 24, 18), dtype=np.float32)
    outputs = pipe(volume, text="<image> What is this?", return_tensors=True)
    assert len(new_tokens(outputs)[0]) == MAX_NEW_TOKENS
