"""`UmbrellaVolumeProcessor(frames=...)`: what a real 4-D NIfTI becomes under each policy, checked against the same
voxels written as 3-D files; the errors; saving, caching, per-call overrides and the preview."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_without_package

from umbrella_llava import image_processing_umbrella_llava
from umbrella_llava.image_processing_umbrella_llava import UmbrellaVolumeProcessor
from umbrella_llava.volume_cache import VolumeCache

nib = pytest.importorskip("nibabel")
from nibabel.testing import data_path as NIBABEL_DATA  # noqa: E402

# nibabel's example: an fMRI run of 2 frames, (128, 96, 24, 2) int16, stored LAS (so reorientation flips an axis).
EXAMPLE_4D = Path(NIBABEL_DATA) / "example4d.nii.gz"
SIZE = (32, 24, 12)


@pytest.fixture(scope="module")
def frames_4d() -> tuple[np.ndarray, np.ndarray]:
    """The decoded voxels (128, 96, 24, 2) float32 and the affine of the example."""
    image = nib.load(EXAMPLE_4D)
    return image.get_fdata(dtype=np.float32), image.affine


def write_3d(folder: Path, name: str, voxels: np.ndarray, affine: np.ndarray) -> Path:
    """One frame's voxels as their own 3-D NIfTI file, with the 4-D file's affine."""
    path = folder / name
    nib.Nifti1Image(voxels.astype(np.float32), affine).to_filename(path)
    return path


def test_the_example_has_two_distinct_frames(frames_4d):
    data, _ = frames_4d
    assert data.shape == (128, 96, 24, 2) and not np.array_equal(data[..., 0], data[..., 1])
    assert "".join(nib.aff2axcodes(nib.load(EXAMPLE_4D).affine)) == "LAS"


# --- each policy against the equivalent 3-D file ------------------------------------------------------------------


@pytest.mark.parametrize("frames, frame", [("first", 0), (0, 0), (1, 1), (-1, 1), (-2, 0)])
@pytest.mark.parametrize("options", [{}, {"voxel_spacing": (4.0, 4.0, 4.0)}], ids=["resize", "spacing"])
def test_one_frame_is_that_frame_as_a_3d_file(frames_4d, tmp_path, frames, frame, options):
    data, affine = frames_4d
    alone = write_3d(tmp_path, f"frame{frame}.nii.gz", data[..., frame], affine)
    expected = UmbrellaVolumeProcessor(volume_size=SIZE, **options).preprocess_volume(alone)
    chosen = UmbrellaVolumeProcessor(volume_size=SIZE, frames=frames, **options).preprocess_volume(EXAMPLE_4D)
    torch.testing.assert_close(chosen, expected, rtol=0, atol=0)


def test_the_two_frames_preprocess_differently():
    """So that the comparisons above cannot pass with the wrong frame."""
    first, last = (UmbrellaVolumeProcessor(volume_size=SIZE, frames=f).preprocess_volume(EXAMPLE_4D) for f in (0, 1))
    assert (first - last).abs().max() > 1e-3


@pytest.mark.parametrize("options", [{}, {"voxel_spacing": (4.0, 4.0, 4.0)}], ids=["resize", "spacing"])
def test_mean_is_the_mean_image_as_a_3d_file(frames_4d, tmp_path, options):
    data, affine = frames_4d
    mean_image = (data[..., 0].astype(np.float64) + data[..., 1].astype(np.float64)) / 2
    expected = UmbrellaVolumeProcessor(volume_size=SIZE, **options).preprocess_volume(
        write_3d(tmp_path, "mean.nii.gz", mean_image, affine)
    )
    mean = UmbrellaVolumeProcessor(volume_size=SIZE, frames="mean", **options).preprocess_volume(EXAMPLE_4D)
    torch.testing.assert_close(mean, expected, rtol=0, atol=1e-6)
    first = UmbrellaVolumeProcessor(volume_size=SIZE, frames="first", **options).preprocess_volume(EXAMPLE_4D)
    assert (mean - first).abs().max() > 1e-3


@pytest.mark.parametrize("options", [{}, {"voxel_spacing": (4.0, 4.0, 4.0)}], ids=["resize", "spacing"])
def test_channels_are_the_frames_each_processed_alone(frames_4d, tmp_path, options):
    data, affine = frames_4d
    channels = UmbrellaVolumeProcessor(
        volume_size=SIZE, volume_channels=2, frames="channels", **options
    ).preprocess_volume(EXAMPLE_4D)
    assert channels.shape == (2, *SIZE)
    single = UmbrellaVolumeProcessor(volume_size=SIZE, **options)
    for frame in range(2):
        alone = single.preprocess_volume(write_3d(tmp_path, f"frame{frame}.nii.gz", data[..., frame], affine))
        torch.testing.assert_close(channels[frame : frame + 1], alone, rtol=0, atol=0)


@pytest.mark.parametrize("frames, channels", [("mean", 1), (-1, 1), ("channels", 2)])
def test_every_frame_is_reoriented_like_nibabels_canonical_image(tmp_path, frames, channels):
    """The example is stored LAS; nibabel's own reorientation of all its frames to RAS+ gives the same tensor."""
    canonical = tmp_path / "canonical.nii.gz"
    nib.as_closest_canonical(nib.load(EXAMPLE_4D)).to_filename(canonical)
    assert "".join(nib.aff2axcodes(nib.load(canonical).affine)) == "RAS"
    processor = UmbrellaVolumeProcessor(volume_size=SIZE, volume_channels=channels, frames=frames)
    torch.testing.assert_close(processor.preprocess_volume(EXAMPLE_4D), processor.preprocess_volume(canonical))


def test_a_nibabel_image_in_memory_takes_the_policy_too(frames_4d):
    data, affine = frames_4d
    image = nib.Nifti1Image(data, affine)
    for frames in ("mean", 1):
        processor = UmbrellaVolumeProcessor(volume_size=SIZE, frames=frames)
        torch.testing.assert_close(processor.preprocess_volume(image), processor.preprocess_volume(EXAMPLE_4D))


def test_3d_files_arrays_and_tensors_ignore_the_policy(frames_4d, tmp_path):
    data, affine = frames_4d
    path = write_3d(tmp_path, "frame0.nii.gz", data[..., 0], affine)
    expected = UmbrellaVolumeProcessor(volume_size=SIZE).preprocess_volume(path)
    for frames in ("mean", "first", 1, -1):
        processor = UmbrellaVolumeProcessor(volume_size=SIZE, frames=frames)
        torch.testing.assert_close(processor.preprocess_volume(path), expected, rtol=0, atol=0)
    two_channels = torch.rand(2, 8, 8, 8)
    for frames in ("first", "channels"):
        processor = UmbrellaVolumeProcessor(volume_size=(8, 8, 8), volume_channels=2, frames=frames)
        assert processor.preprocess_volume(two_channels).shape == (2, 8, 8, 8)


# --- errors -------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_decoding(monkeypatch):
    """Decoding voxels fails the test: the errors below must come from the header alone."""

    def decode(*args, **kwargs):
        raise AssertionError("the voxels were decoded before the frames were checked")

    monkeypatch.setattr(nib.Nifti1Image, "get_fdata", decode)


def test_default_refuses_several_frames_naming_the_file_and_the_policies(no_decoding):
    with pytest.raises(ValueError, match=r"example4d\.nii\.gz is a 4-D volume with 2 frames") as error:
        UmbrellaVolumeProcessor(volume_size=SIZE).preprocess_volume(EXAMPLE_4D)
    message = str(error.value)
    for policy in ("frames='error'", "'mean'", "'first'", "an index such as 0", "'channels'", "volume_channels=2"):
        assert policy in message, policy
    assert error.value.kind == "multi-frame"


@pytest.mark.parametrize("frames", [2, -3, 100])
def test_an_index_out_of_range_names_the_file_and_the_frame_count(frames, no_decoding):
    with pytest.raises(
        ValueError, match=rf"example4d\.nii\.gz has 2 frames .*frames={frames} is out of range.*0 to 1"
    ):
        UmbrellaVolumeProcessor(volume_size=SIZE, frames=frames).preprocess_volume(EXAMPLE_4D)


def test_channels_with_another_frame_count_says_both_numbers(no_decoding):
    processor = UmbrellaVolumeProcessor(volume_size=SIZE, volume_channels=3, frames="channels")
    with pytest.raises(ValueError, match=r"example4d\.nii\.gz has 2 frames .*volume_channels=3.*volume_channels=2"):
        processor.preprocess_volume(EXAMPLE_4D)


def test_the_voxel_bound_counts_every_frame(monkeypatch):
    one_frame, whole = 128 * 96 * 24, 128 * 96 * 24 * 2
    monkeypatch.setattr(image_processing_umbrella_llava, "MAX_VOXELS", (one_frame + whole) // 2)
    with pytest.raises(ValueError, match=r"example4d\.nii\.gz.*589,824 voxels.*MAX_VOXELS"):
        UmbrellaVolumeProcessor(volume_size=SIZE, frames="first").preprocess_volume(EXAMPLE_4D)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"frames": "last"}, r"`frames` must be one of \('error', 'mean', 'first', 'channels'\) or an int"),
        ({"frames": 1.0}, "`frames` must be one of"),
        ({"frames": True}, "`frames` must be one of"),
        ({"frames": None}, "`frames` must be one of"),
        ({"frames": "channels"}, r"needs `volume_channels` equal to the files' frame count, not 1"),
    ],
)
def test_bad_frames_are_refused_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        UmbrellaVolumeProcessor(**options)


def test_numpy_ints_are_saved_as_ints():
    processor = UmbrellaVolumeProcessor(frames=np.int64(-1))
    assert processor.frames == -1 and type(processor.frames) is int


# --- saving, caching, per-call overrides --------------------------------------------------------------------------


def test_save_and_load_keeps_frames(tmp_path):
    for frames in ("mean", -1):
        processor = UmbrellaVolumeProcessor(volume_size=SIZE, frames=frames)
        processor.save_pretrained(tmp_path / str(frames))
        reloaded = UmbrellaVolumeProcessor.from_pretrained(tmp_path / str(frames))
        assert reloaded.frames == frames and reloaded.to_dict() == processor.to_dict()
        torch.testing.assert_close(reloaded.preprocess_volume(EXAMPLE_4D), processor.preprocess_volume(EXAMPLE_4D))


@pytest.mark.slow
def test_frames_travel_with_the_processor_as_remote_code(tokenizer, tmp_path):
    from umbrella_llava.processing_umbrella_llava import UmbrellaLlavaProcessor

    if UmbrellaLlavaProcessor._auto_class is None:
        UmbrellaLlavaProcessor.register_for_auto_class("AutoProcessor")
    if UmbrellaVolumeProcessor._auto_class is None:
        UmbrellaVolumeProcessor.register_for_auto_class("AutoImageProcessor")
    image_processor = UmbrellaVolumeProcessor(volume_size=SIZE, volume_channels=2, frames="channels")
    processor = UmbrellaLlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=8)
    processor.save_pretrained(tmp_path / "checkpoint")
    overridden = UmbrellaLlavaProcessor.from_pretrained(tmp_path / "checkpoint", frames=-1, volume_channels=1)
    assert overridden.image_processor.frames == -1
    expected = processor(text=["<image>\nDescribe."], images=[[str(EXAMPLE_4D)]], return_tensors="pt")
    torch.save(expected["pixel_values"], tmp_path / "expected.pt")

    result = run_without_package(
        f"""
        import torch
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained({str(tmp_path / "checkpoint")!r}, trust_remote_code=True)
        assert type(processor.image_processor).__module__.startswith("transformers_modules")
        assert processor.image_processor.frames == "channels", processor.image_processor.frames
        batch = processor(text=["<image>\\nDescribe."], images=[[{str(EXAMPLE_4D)!r}]], return_tensors="pt")
        assert torch.equal(batch["pixel_values"], torch.load({str(tmp_path / "expected.pt")!r}))
        print("frames OK")
        """,
        cwd=tmp_path,
    )
    assert "frames OK" in result.stdout


def test_frames_are_a_preprocessing_option_and_part_of_the_cache_key(tmp_path):
    mean = UmbrellaVolumeProcessor(volume_size=SIZE, frames="mean")
    first = UmbrellaVolumeProcessor(volume_size=SIZE, frames="first")
    assert mean.preprocessing_options()["frames"] == "mean"
    cache = VolumeCache(tmp_path / "cache")
    assert cache.entry_path(EXAMPLE_4D, mean) != cache.entry_path(EXAMPLE_4D, first)
    torch.testing.assert_close(cache.get(EXAMPLE_4D, mean), mean.preprocess_volume(EXAMPLE_4D))
    torch.testing.assert_close(cache.get(EXAMPLE_4D, first), first.preprocess_volume(EXAMPLE_4D))
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_per_call_override_and_other_overrides_keep_frames():
    processor = UmbrellaVolumeProcessor(volume_size=SIZE, frames="mean")
    mean = processor.preprocess_volume(EXAMPLE_4D)
    first = UmbrellaVolumeProcessor(volume_size=SIZE, frames="first").preprocess_volume(EXAMPLE_4D)
    torch.testing.assert_close(processor([str(EXAMPLE_4D)], frames="first")["pixel_values"][0, 0], first)
    smaller = processor([str(EXAMPLE_4D)], volume_size=(16, 12, 6))["pixel_values"][0, 0]
    expected = UmbrellaVolumeProcessor(volume_size=(16, 12, 6), frames="mean").preprocess_volume(EXAMPLE_4D)
    torch.testing.assert_close(smaller, expected)
    assert processor.frames == "mean" and not torch.equal(mean, first)
    with pytest.raises(ValueError, match="`frames` must be one of"):
        processor([str(EXAMPLE_4D)], frames="median")


# --- the preview --------------------------------------------------------------------------------------------------


@pytest.fixture
def preview_titles(monkeypatch) -> list[str | None]:
    """The titles that the preview draws above its planes."""
    from umbrella_llava import preview

    titles = []
    render = preview.render_preview

    def recording_render(volume, title=None):
        titles.append(title)
        return render(volume, title=title)

    monkeypatch.setattr(preview, "render_preview", recording_render)
    return titles


def test_preview_names_the_frame_policy_it_applied(preview_titles, tmp_path):
    from umbrella_llava.preview import save_preview

    save_preview(EXAMPLE_4D, tmp_path / "mean.png", UmbrellaVolumeProcessor(volume_size=SIZE, frames="mean"))
    save_preview(EXAMPLE_4D, tmp_path / "last.png", UmbrellaVolumeProcessor(volume_size=SIZE, frames=-1))
    assert preview_titles == [
        "example4d.nii.gz\nframes='mean': the mean of its 2 frames",
        "example4d.nii.gz\nframes=-1: frame 1 of its 2 (counting from 0)",
    ]


def test_preview_command_takes_frames(preview_titles, tmp_path, capsys):
    from umbrella_llava.preview import main

    size = ["--volume_size", *map(str, SIZE)]
    assert main([str(EXAMPLE_4D), "-o", str(tmp_path / "a.png"), *size, "--frames", "channels"]) == 0
    assert "frames='channels': its 2 frames as 2 channels" in capsys.readouterr().out
    assert main([str(EXAMPLE_4D), "-o", str(tmp_path / "b.png"), *size, "--frames", "0", "--title", "run 1"]) == 0
    assert "frames=0: frame 0 of its 2" in capsys.readouterr().out
    assert preview_titles == [
        "example4d.nii.gz\nframes='channels': its 2 frames as 2 channels",
        "run 1\nframes=0: frame 0 of its 2 (counting from 0)",
    ]
    with pytest.raises(SystemExit):
        main([str(EXAMPLE_4D), "--frames", "median"])
    assert "choose one of error, mean, first, channels or an int frame index" in capsys.readouterr().err
    with pytest.raises(ValueError, match="frames='error'"):
        main([str(EXAMPLE_4D), "-o", str(tmp_path / "c.png"), *size])
    assert not os.path.exists(tmp_path / "c.png")


def test_check_data_takes_the_frames_policy(tmp_path, capsys):
    """`umbrella-check-data --frames`: the 4-D example is refused by default, naming the file, and accepted with a
    policy or an index; a policy that is neither is refused by the parser."""
    import json

    from umbrella_llava.check_data import main as check_data_main

    record = {
        "conversations": [
            {"from": "human", "value": "<image>\nIs this an fMRI run?"},
            {"from": "gpt", "value": "Yes."},
        ],
        "image": str(EXAMPLE_4D),
    }
    data = tmp_path / "records.jsonl"
    data.write_text(json.dumps(record) + "\n")
    size = ["--volume_size", *map(str, SIZE)]
    assert check_data_main([str(data), *size]) == 1
    assert "example4d.nii.gz is a 4-D volume with 2 frames" in capsys.readouterr().out
    for policy in ("mean", "1"):
        assert check_data_main([str(data), *size, "--frames", policy]) == 0
        assert "1 valid, 0 invalid" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        check_data_main([str(data), *size, "--frames", "median"])
