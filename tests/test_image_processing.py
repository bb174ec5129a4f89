"""Volume preprocessing on real brains: orientation, spacing, intensity, bad files, batching, save/load, no nibabel."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, import_blocker

from umbrella_llava.image_processing_umbrella_llava import (
    UmbrellaVolumeProcessor,
    load_volume,
    stack_volumes,
)

nib = pytest.importorskip("nibabel")
from nibabel.testing import data_path as NIBABEL_DATA  # noqa: E402

SMALL = (40, 48, 36)  # not a cube, so that a permutation of the axes cannot go unnoticed


@pytest.fixture(scope="module")
def mni(mni_t1_path) -> "nib.Nifti1Image":
    """The MNI152 T1 template at 2 mm (99, 117, 95), RAS+, in memory."""
    image = nib.load(mni_t1_path)
    return nib.Nifti1Image(image.get_fdata(dtype=np.float32), image.affine)


def write(tmp_path: Path, name: str, data: np.ndarray, affine: np.ndarray) -> Path:
    path = tmp_path / name
    nib.Nifti1Image(data.astype(np.float32), affine).to_filename(path)
    return path


def flipped(image, axis: int) -> "nib.Nifti1Image":
    """The same brain with one voxel axis stored the other way round (e.g. RAS → LAS), and the affine that says so."""
    flip = np.eye(4)
    flip[axis, axis], flip[axis, 3] = -1.0, image.shape[axis] - 1
    return nib.Nifti1Image(np.ascontiguousarray(np.flip(image.get_fdata(), axis)), image.affine @ flip)


def permuted(image, order: tuple[int, int, int]) -> "nib.Nifti1Image":
    """The same brain with its voxel axes stored in another order, and the affine whose columns follow them."""
    affine = image.affine.copy()
    affine[:, :3] = image.affine[:, list(order)]
    return nib.Nifti1Image(np.ascontiguousarray(image.get_fdata().transpose(order)), affine)


@pytest.fixture(params=["subject", "mni"])
def ras_brain(request, mni) -> "nib.Nifti1Image":
    """A real brain in RAS+: nibabel's anatomical scan of a subject (stored LAS on disk), or the MNI152 template
    (symmetric left-right, so the anterior-posterior flips below are what could go wrong there)."""
    if request.param == "mni":
        return mni
    return nib.as_closest_canonical(nib.load(os.path.join(NIBABEL_DATA, "anatomical.nii")))


# --- orientation and geometry ------------------------------------------------------------------------------------


def test_same_brain_stored_las_or_permuted_gives_the_same_tensor(ras_brain, tmp_path):
    processor = UmbrellaVolumeProcessor(volume_size=SMALL)
    stored = {
        "RAS": ras_brain,
        "LAS": flipped(ras_brain, 0),
        "RPS": flipped(ras_brain, 1),
        "SRA": permuted(ras_brain, (2, 0, 1)),
        "PIL": permuted(flipped(flipped(flipped(ras_brain, 0), 1), 2), (1, 2, 0)),
    }
    volumes = {}
    for codes, image in stored.items():
        assert "".join(nib.aff2axcodes(image.affine)) == codes
        volumes[codes] = processor.preprocess_volume(
            write(tmp_path, f"{codes}.nii.gz", image.get_fdata(), image.affine)
        )

    for codes in stored:
        torch.testing.assert_close(volumes[codes], volumes["RAS"], msg=f"stored {codes}")
    # Without the affine the stored voxels really are another picture, so the test cannot pass by luck.
    for codes in ("RPS", "PIL"):
        naive = processor.preprocess_volume(stored[codes].get_fdata())
        assert (naive - volumes["RAS"]).abs().mean() > 0.02


def test_reorientation_matches_nibabel_closest_canonical():
    path = os.path.join(NIBABEL_DATA, "anatomical.nii")  # a real scan stored LAS, big-endian int16
    image = nib.load(path)
    assert nib.aff2axcodes(image.affine) == ("L", "A", "S")
    canonical = nib.as_closest_canonical(image).get_fdata()

    volume, spacing = load_volume(path)

    torch.testing.assert_close(volume[0], torch.from_numpy(canonical).float())
    assert spacing == pytest.approx((2.0, 2.0, 2.0))


def test_same_brain_at_1mm_and_2mm_matches_after_resampling_to_one_spacing(mni_t1_path, tmp_path):
    nilearn_datasets = pytest.importorskip("nilearn.datasets")
    one_mm = tmp_path / "mni_1mm.nii.gz"
    nilearn_datasets.load_mni152_template(resolution=1).to_filename(one_mm)
    processor = UmbrellaVolumeProcessor(volume_size=(64, 72, 64), voxel_spacing=3.0)

    fine, coarse = processor.preprocess_volume(one_mm), processor.preprocess_volume(mni_t1_path)

    assert fine.shape == coarse.shape == (1, 64, 72, 64)
    correlation = torch.corrcoef(torch.stack([fine.flatten(), coarse.flatten()]))[0, 1]
    assert correlation > 0.97


def test_voxel_spacing_keeps_millimetres_and_pads_with_the_background():
    path = os.path.join(NIBABEL_DATA, "anatomical.nii")  # (33, 41, 25) voxels of 2 mm
    processor = UmbrellaVolumeProcessor(volume_size=(80, 96, 64), voxel_spacing=1.0, normalization="minmax")

    volume = processor.preprocess_volume(path)[0]

    # The field of view becomes 66 x 82 x 50 voxels of the new spacing, centred; the margins are the background (0).
    inside = (slice(7, 73), slice(7, 89), slice(7, 57))
    margin = torch.ones_like(volume, dtype=torch.bool)
    margin[inside] = False
    assert volume.shape == (80, 96, 64)
    assert torch.all(volume[margin] == 0)
    for axis in range(3):  # the scan reaches every edge of the inner box
        assert volume[inside].amax(dim=[a for a in range(3) if a != axis]).min() > 0


# --- intensity ---------------------------------------------------------------------------------------------------


def test_nan_inf_and_hot_voxels_do_not_change_the_brain(mni, tmp_path):
    processor = UmbrellaVolumeProcessor(volume_size=SMALL, normalization="minmax")
    data = mni.get_fdata(dtype=np.float32)
    clean = processor.preprocess_volume(write(tmp_path, "clean.nii.gz", data, mni.affine))
    corrupted = data.copy()
    background = np.argwhere(data == 0)
    corrupted[tuple(background[:100].T)] = np.nan
    corrupted[tuple(background[100:200].T)] = np.inf
    corrupted[tuple(background[200:300].T)] = -np.inf
    corrupted[tuple(np.argwhere(data > 0)[::5000].T)] = 1e6  # hot voxels inside the head

    volume = processor.preprocess_volume(write(tmp_path, "corrupted.nii.gz", corrupted, mni.affine))

    assert torch.isfinite(volume).all()
    assert (volume.min(), volume.max()) == (0.0, 1.0)
    assert (volume - clean).abs().mean() < 0.01  # percentile clipping ignores the few hot voxels


@pytest.mark.parametrize("normalization", ["minmax", "zscore", "none"])
def test_constant_and_all_nan_volumes_are_refused_or_with_the_option_give_zeros(normalization, mni, tmp_path):
    options = dict(volume_size=(16, 16, 16), normalization=normalization)
    constant = write(tmp_path, "constant.nii.gz", np.full((20, 20, 20), 7.0, np.float32), mni.affine)
    all_nan = np.full((20, 20, 20), np.nan, np.float32)

    for source, reason in ((constant, "is 7"), (all_nan, "NaN"), (torch.zeros(1, 20, 20, 20), "is 0")):
        with pytest.raises(ValueError, match=f"is blank: .*{reason}.*allow_blank_volumes=True"):
            UmbrellaVolumeProcessor(**options).preprocess_volume(source)
        with pytest.warns(UserWarning, match="is blank"):
            volume = UmbrellaVolumeProcessor(**options, allow_blank_volumes=True).preprocess_volume(source)
        assert torch.isfinite(volume).all()
        if normalization != "none":
            assert torch.all(volume == 0)


def test_zscore_is_zero_mean_unit_std_over_the_foreground(mni):
    volume = UmbrellaVolumeProcessor(volume_size=SMALL, normalization="zscore").preprocess_volume(mni)[0]
    foreground = volume > volume.min()

    assert volume[foreground].mean().abs() < 1e-3
    assert volume[foreground].std(correction=0) == pytest.approx(1.0, abs=1e-3)


def test_input_array_is_not_modified():
    data = np.arange(512, dtype=np.float32).reshape(8, 8, 8)
    data[0] = np.nan
    UmbrellaVolumeProcessor(volume_size=(8, 8, 8)).preprocess_volume(data)
    assert np.isnan(data[0]).all()


# --- frames and bad files ----------------------------------------------------------------------------------------


def test_single_frame_4d_file_is_taken_as_3d(mni, tmp_path):
    processor = UmbrellaVolumeProcessor(volume_size=SMALL)
    data = mni.get_fdata(dtype=np.float32)
    as_4d = processor.preprocess_volume(write(tmp_path, "one_frame.nii.gz", data[..., None], mni.affine))
    torch.testing.assert_close(as_4d, processor.preprocess_volume(mni))


def test_multi_frame_4d_file_is_an_error_naming_it():
    path = os.path.join(NIBABEL_DATA, "example4d.nii.gz")  # (128, 96, 24, 2)
    with pytest.raises(ValueError, match=r"example4d\.nii\.gz.*2 frames"):
        UmbrellaVolumeProcessor().preprocess_volume(path)


def test_missing_file_is_file_not_found_naming_it(tmp_path):
    missing = tmp_path / "sub-07" / "T1w.nii.gz"
    with pytest.raises(FileNotFoundError, match=r"sub-07.T1w\.nii\.gz"):
        UmbrellaVolumeProcessor().preprocess_volume(missing)
    with pytest.raises(FileNotFoundError, match="sub-07"):
        UmbrellaVolumeProcessor()([[str(missing)]])


def test_truncated_and_foreign_files_are_errors_naming_them(mni_t1_path, tmp_path):
    content = mni_t1_path.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(content[: len(content) // 2])
    header_only = tmp_path / "header_only.nii.gz"
    header_only.write_bytes(content[:200])
    text = tmp_path / "notes.nii"
    text.write_text("this is a radiology report, not a volume\n" * 20)
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")

    processor = UmbrellaVolumeProcessor(volume_size=(16, 16, 16))
    for path in (truncated, header_only, text, empty):
        with pytest.raises(ValueError, match=path.name.replace(".", r"\.")):
            processor.preprocess_volume(path)


def test_channel_count_mismatch_names_the_source(mni_t1_path):
    with pytest.raises(ValueError, match=r"Tensor of shape \(2, 8, 8, 8\).*volume_channels=1"):
        UmbrellaVolumeProcessor(volume_size=(8, 8, 8)).preprocess_volume(torch.rand(2, 8, 8, 8))
    with pytest.raises(ValueError, match=f"{mni_t1_path.name}.*1 channel"):
        UmbrellaVolumeProcessor(volume_size=(8, 8, 8), volume_channels=2).preprocess_volume(mni_t1_path)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"volume_size": (0, 8, 8)}, "volume_size"),
        ({"voxel_spacing": (1.0, -1.0, 1.0)}, "voxel_spacing"),
        ({"normalization": "histogram"}, "normalization"),
        ({"clip_percentiles": (99, 1)}, "clip_percentiles"),
        ({"volume_channels": 0}, "volume_channels"),
    ],
)
def test_bad_options_are_refused_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        UmbrellaVolumeProcessor(**options)


# --- the processor: batches, save and load -----------------------------------------------------------------------


def test_ragged_batch_with_an_empty_sample(mni, mni_t1_path):
    processor = UmbrellaVolumeProcessor(volume_size=(16, 16, 16))
    t1 = processor.preprocess_volume(mni_t1_path)

    batch = processor([[mni_t1_path, torch.rand(16, 16, 16)], [], [mni]], return_tensors="pt")

    assert batch["pixel_values"].shape == (3, 2, 1, 16, 16, 16)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["image_mask"].dtype == torch.bool
    assert batch["image_mask"].tolist() == [[True, True], [False, False], [True, False]]
    assert batch["num_images_per_sample"].dtype == torch.int64
    assert batch["num_images_per_sample"].tolist() == [2, 0, 1]
    torch.testing.assert_close(batch["pixel_values"][0, 0], t1)
    torch.testing.assert_close(batch["pixel_values"][2, 0], t1)  # nibabel image in memory == its file
    assert torch.all(batch["pixel_values"][~batch["image_mask"]] == 0)


def test_single_volume_and_flat_list_are_one_sample(mni_t1_path):
    processor = UmbrellaVolumeProcessor(volume_size=(8, 8, 8))
    assert processor(mni_t1_path)["pixel_values"].shape == (1, 1, 1, 8, 8, 8)
    assert processor([mni_t1_path, np.arange(512.0).reshape(8, 8, 8)])["num_images_per_sample"].tolist() == [2]
    assert processor([])["pixel_values"].shape == (1, 0, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="mixture"):
        processor([mni_t1_path, [mni_t1_path]])


def test_multi_channel_volumes():
    processor = UmbrellaVolumeProcessor(volume_size=(8, 8, 8), volume_channels=2, normalization="minmax")
    volume = torch.stack([torch.rand(12, 12, 12), torch.rand(12, 12, 12) * 1000])
    out = processor([[volume]])["pixel_values"]
    assert out.shape == (1, 1, 2, 8, 8, 8)
    # Each channel has its own scale: both span [0, 1], although the second holds values 1000 times larger (joint
    # percentiles would squeeze the first into [0, 0.001]).
    for channel in range(2):
        assert out[0, 0, channel].min() == 0.0 and out[0, 0, channel].max() == 1.0, channel


def test_per_call_options_override_and_unknown_ones_are_refused(mni_t1_path):
    processor = UmbrellaVolumeProcessor(volume_size=(8, 8, 8))
    assert processor([[mni_t1_path]], volume_size=(12, 8, 4))["pixel_values"].shape == (1, 1, 1, 12, 8, 4)
    with pytest.raises(ValueError, match="do_resize"):
        processor([[mni_t1_path]], do_resize=True)


def test_stack_volumes_pads_and_names_the_mismatched_sample():
    stacked = stack_volumes([torch.ones(1, 1, 4, 4, 4), torch.empty(0), torch.ones(3, 1, 4, 4, 4)])
    assert stacked["pixel_values"].shape == (3, 3, 1, 4, 4, 4)
    assert stacked["image_mask"].tolist() == [[True, False, False], [False] * 3, [True] * 3]
    assert stacked["num_images_per_sample"].dtype == torch.long

    assert stack_volumes([torch.empty(0, 1, 4, 4, 4)])["pixel_values"].shape == (1, 0, 1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"Sample 2 has volumes of shape \(1, 8, 8, 8\) but sample 0"):
        stack_volumes([torch.ones(1, 1, 4, 4, 4), torch.empty(0), torch.ones(2, 1, 8, 8, 8)])
    with pytest.raises(ValueError, match="Sample 1: expected volumes"):
        stack_volumes([torch.ones(1, 1, 4, 4, 4), torch.ones(1, 4, 4, 4)])


def test_save_pretrained_round_trip(tmp_path, mni_t1_path):
    processor = UmbrellaVolumeProcessor(
        volume_size=(24, 16, 8), voxel_spacing=(2.0, 2.0, 2.5), normalization="zscore", clip_percentiles=(1, 99)
    )
    processor.save_pretrained(tmp_path)
    loaded = UmbrellaVolumeProcessor.from_pretrained(tmp_path)

    assert loaded.to_dict() == processor.to_dict()
    torch.testing.assert_close(loaded(mni_t1_path)["pixel_values"], processor(mni_t1_path)["pixel_values"])
    assert UmbrellaVolumeProcessor.from_pretrained(tmp_path, volume_size=32).volume_size == [32, 32, 32]


# --- remote code without nibabel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["image_processing_umbrella_llava.py", "dicom_series.py"])
def test_remote_code_imports_only_allowed_libraries(module):
    from transformers.dynamic_module_utils import get_imports

    # The standard library is always there; anything else must be installed on the machine that loads the checkpoint.
    imports = get_imports(REPO_ROOT / "umbrella_llava" / module)
    assert set(imports) <= set(sys.stdlib_module_names) | {"torch", "transformers", "einops"}


@pytest.mark.slow
def test_without_nibabel_arrays_work_and_a_path_is_a_clear_import_error(mni_t1_path):
    code = import_blocker("nibabel") + textwrap.dedent(
        f"""
        import numpy as np, torch
        from umbrella_llava.image_processing_umbrella_llava import UmbrellaVolumeProcessor
        processor = UmbrellaVolumeProcessor(volume_size=(8, 8, 8))
        batch = processor([[torch.rand(12, 12, 12)], [np.random.rand(10, 10, 10)]])
        assert batch["pixel_values"].shape == (2, 1, 1, 8, 8, 8), batch["pixel_values"].shape
        try:
            processor.preprocess_volume({str(mni_t1_path)!r})
        except ImportError as err:
            assert "nibabel" in str(err) and {mni_t1_path.name!r} in str(err), err
        else:
            raise AssertionError("a NIfTI path without nibabel must be an ImportError")
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_an_in_memory_image_is_not_changed_by_preprocessing():
    """`load_volume` hands out a fresh copy: NaN voxels of the caller's own float32 array stay NaN."""
    data = np.random.default_rng(0).random((12, 12, 12), dtype=np.float32)
    data[0, 0, 0] = np.nan
    before = data.copy()
    UmbrellaVolumeProcessor(volume_size=(8, 8, 8)).preprocess_volume(nib.Nifti1Image(data, np.diag([2.0, 2, 2, 1])))
    np.testing.assert_array_equal(data, before)
