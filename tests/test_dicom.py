"""A folder holding one DICOM series is a volume wherever a NIfTI path is: the processor, records, the pipeline, the
volume cache, umbrella-preview and umbrella-check-data.

The series are written in the tests with pydicom (`umbrella_llava.dicom_writer`) from a real brain, nilearn's MNI152
T1 at 4 mm (50 × 59 × 48 voxels, integer intensities), as int16 with a rescale slope and intercept, with a bright marker in the left
hemisphere: the volume read from the folder must be the NIfTI's (within the int16 quantisation) and the marker must
stay in the left half of the RAS+ H axis, whatever the slice orientation.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import run_without_package

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("SimpleITK")

from umbrella_llava import UmbrellaLlavaProcessor, UmbrellaVolumeProcessor  # noqa: E402
from umbrella_llava.dicom_writer import oblique_affine, write_dicom_series  # noqa: E402
from umbrella_llava.image_processing_umbrella_llava import InvalidVolumeError, load_volume  # noqa: E402
from umbrella_llava.volume_cache import VolumeCache  # noqa: E402

# The marker: a 3³ block at voxel (12, 30, 24) of the 4 mm brain, x = -50 mm, in the left hemisphere.
MARKER = (12, 30, 24)
# (stored axes of the series: columns, rows, slices; rotation in degrees about a world axis, 0 R, 1 A, 2 S)
LAYOUTS = {
    "axial": (("L", "P", "S"), 0.0, 2),
    "sagittal oblique": (("P", "I", "R"), 20.0, 0),
    "coronal oblique": (("L", "I", "A"), 15.0, 2),
}


@pytest.fixture(scope="module")
def brain() -> nib.Nifti1Image:
    """The MNI152 T1 at 4 mm with a bright marker in the left hemisphere (RAS+ voxel order, as nilearn ships it)."""
    nilearn_datasets = pytest.importorskip("nilearn.datasets")
    template = nilearn_datasets.load_mni152_template(resolution=2)
    # Integer intensities, as a scanner's: nilearn's resampling leaves values of 1e-7 in the background, which int16
    # storage makes 0, and the z-score's foreground (above the minimum) would then differ.
    data = np.round(1000 * template.get_fdata(dtype=np.float32)[::2, ::2, ::2])
    i, j, k = MARKER
    data[i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2] = 3 * data.max()
    image = nib.Nifti1Image(data, template.affine @ np.diag([2.0, 2.0, 2.0, 1.0]))
    assert image.affine[0, 3] + 4 * i < 0  # x < 0: left
    return image


@pytest.fixture(scope="module")
def series(brain, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Each layout as (DICOM series folder, the NIfTI file it was written from)."""
    root = tmp_path_factory.mktemp("dicom")
    written = {}
    for name, (axcodes, degrees, axis) in LAYOUTS.items():
        image = nib.Nifti1Image(brain.get_fdata(dtype=np.float32), oblique_affine(brain, degrees, axis))
        nifti = root / f"{name.replace(' ', '_')}.nii.gz"
        image.to_filename(nifti)
        folder = root / name.replace(" ", "_")
        write_dicom_series(image, folder, axcodes=axcodes)
        written[name] = (folder, nifti)
    return written


def quantisation(folder: Path) -> float:
    """Half the rescale slope of a written series: the largest error int16 storage leaves."""
    return float(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).RescaleSlope) / 2


def copy_series(folder: Path, destination: Path) -> list[Path]:
    shutil.copytree(folder, destination)
    return sorted(destination.iterdir())


def edit(path: Path, **attributes) -> None:
    dataset = pydicom.dcmread(path)
    for key, value in attributes.items():
        setattr(dataset, key, value)
    dataset.save_as(path)


def geometry(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position, row direction, slice normal) of a file, in LPS."""
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    orientation = np.array(dataset.ImageOrientationPatient, dtype=float).reshape(2, 3)
    return np.array(dataset.ImagePositionPatient, dtype=float), orientation[0], np.cross(*orientation)


# ---------------------------------------------------------------------------------------------------------------------
# The volume of a series is the volume of its NIfTI
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_series_gives_the_volume_of_its_nifti_and_left_stays_left(series, layout):
    folder, nifti = series[layout]
    volume, spacing = load_volume(folder)
    expected, expected_spacing = load_volume(nifti)
    assert volume.shape == expected.shape == (1, 50, 59, 48)
    assert spacing == pytest.approx(expected_spacing, abs=1e-4)
    assert float((volume - expected).abs().max()) <= quantisation(folder) * 1.01
    # The marker, the brightest voxels, lies in the left half along H (Left → Right).
    h, w, d = np.unravel_index(int(volume[0].argmax()), volume.shape[1:])
    assert (h, w, d) == (11, 29, 23)  # the marker's first voxel, where the NIfTI has it
    assert h < volume.shape[1] / 2


def test_the_processor_gives_the_same_pixel_values_for_the_series_and_its_nifti(series):
    processor = UmbrellaVolumeProcessor(volume_size=(24, 24, 24))
    for folder, nifti in series.values():
        batch = processor([[folder], [nifti]])
        torch.testing.assert_close(batch["pixel_values"][0], batch["pixel_values"][1], atol=1e-3, rtol=0)
        preprocessed = batch["pixel_values"][0, 0, 0]
        assert np.unravel_index(int(preprocessed.argmax()), preprocessed.shape)[0] < 12  # left half


def test_file_names_do_not_decide_the_slice_order(series, tmp_path):
    folder, nifti = series["sagittal oblique"]
    paths = copy_series(folder, tmp_path / "renamed")
    for index, path in enumerate(paths):  # the last slice gets the first name
        path.rename(path.with_name(f"IM{len(paths) - index:05d}"))
    torch.testing.assert_close(load_volume(tmp_path / "renamed")[0], load_volume(folder)[0], atol=0, rtol=0)


def test_each_slice_has_its_own_rescale_slope(series, tmp_path):
    """Some scanners write one slope and intercept per slice: each file's own must be applied, in float, even when
    the first file's (slope 1, intercept 0 here) would make its voxels integers."""
    folder, nifti = series["axial"]
    paths = copy_series(folder, tmp_path / "slopes")
    for path, (slope, intercept) in zip(paths[::2], [(1, 0), *[(0.3, -5)] * len(paths)]):
        dataset = pydicom.dcmread(path)
        values = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
        dataset.RescaleSlope, dataset.RescaleIntercept = str(slope), str(intercept)
        dataset.PixelData = np.round((values - intercept) / slope).astype(np.int16).tobytes()
        dataset.save_as(path)
    volume, expected = load_volume(tmp_path / "slopes")[0], load_volume(nifti)[0]
    # Re-encoded voxels are off by half their new step (at most 0.5) on top of the first encoding's error.
    assert float((volume - expected).abs().max()) <= 0.5 + quantisation(folder) * 1.01


@pytest.mark.parametrize("codec", ["RLELossless", "JPEGLSLossless"])
def test_compressed_series_are_decoded(brain, series, codec, tmp_path):
    """SimpleITK's GDCM decodes compressed transfer syntaxes itself; RLE is written by pydicom alone, JPEG-LS needs
    pyjpegls to write it (not to read it)."""
    if codec == "JPEGLSLossless":
        pytest.importorskip("jpeg_ls", reason="writing JPEG-LS with pydicom needs pyjpegls")
    folder, nifti = series["axial"]
    transfer_syntax = getattr(pydicom.uid, codec)
    image = nib.load(nifti)
    write_dicom_series(image, tmp_path / codec, transfer_syntax_uid=transfer_syntax)
    stored = pydicom.dcmread(next((tmp_path / codec).iterdir()), stop_before_pixels=True)
    assert stored.file_meta.TransferSyntaxUID == transfer_syntax
    torch.testing.assert_close(load_volume(tmp_path / codec)[0], load_volume(folder)[0], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Series that are not one volume: each an error naming the folder and saying why
# ---------------------------------------------------------------------------------------------------------------------


def refused(folder: Path, kind: str, *phrases: str) -> InvalidVolumeError:
    with pytest.raises(InvalidVolumeError) as error:
        load_volume(folder)
    assert error.value.kind == kind, error.value
    assert str(folder) in str(error.value)
    for phrase in phrases:
        assert phrase in str(error.value)
    return error.value


def test_several_series_in_one_folder_are_listed(series, brain, tmp_path):
    folder = tmp_path / "two"
    write_dicom_series(brain, folder, series_instance_uid="1.2.3.4", series_description="T1w MPRAGE")
    write_dicom_series(brain, folder / "other", series_instance_uid="1.2.3.5", series_description="FLAIR")
    for path in (folder / "other").iterdir():
        path.rename(folder / f"flair_{path.name}")
    (folder / "other").rmdir()
    refused(folder, "several dicom series", "holds 2 series", "1.2.3.4 'T1w MPRAGE': 48 files", "1.2.3.5 'FLAIR': 48")


def test_a_missing_slice_is_refused(series, tmp_path):
    paths = copy_series(series["axial"][0], tmp_path / "gap")
    paths[20].unlink()
    paths[21].unlink()
    refused(tmp_path / "gap", "missing dicom slices", "slice_0019.dcm and slice_0022.dcm", "about 2 slice(s)")


def test_a_duplicate_slice_is_refused(series, tmp_path):
    paths = copy_series(series["axial"][0], tmp_path / "twice")
    shutil.copy(paths[7], tmp_path / "twice" / "copy_of_slice_7.dcm")
    refused(tmp_path / "twice", "duplicate dicom slices", "occur twice", "copy_of_slice_7.dcm")


def test_uneven_slice_spacing_is_refused(series, tmp_path):
    paths = copy_series(series["coronal oblique"][0], tmp_path / "uneven")
    for path in paths[30:]:  # one step of 1.3 slice spacings
        position, _, normal = geometry(path)
        edit(path, ImagePositionPatient=[float(v) for v in position + 0.3 * 4.0 * normal])
    # The coronal series' slices are stored Posterior → Anterior, against their normal; the step is 4 - 1.2 mm.
    refused(tmp_path / "uneven", "uneven dicom spacing", "4 mm apart", "2.8 mm between slice_0030.dcm and slice_0029")


def test_a_localizer_mixed_into_the_series_is_refused(series, brain, tmp_path):
    paths = copy_series(series["axial"][0], tmp_path / "scout")
    uid = pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
    localizer = write_dicom_series(brain, tmp_path / "sagittal", axcodes=("P", "I", "R"), series_instance_uid=uid)
    shutil.copy(localizer[25], tmp_path / "scout" / "localizer.dcm")
    refused(tmp_path / "scout", "mixed dicom slices", "48 slices share one orientation", "localizer.dcm")


def test_one_2d_image_is_not_a_volume(series, tmp_path):
    (tmp_path / "single").mkdir()
    shutil.copy(next(series["axial"][0].iterdir()), tmp_path / "single")
    refused(tmp_path / "single", "2-d dicom", "one 2-D image", "50 × 59 pixels")


def test_slices_that_do_not_stack_along_their_normal_are_refused(series, tmp_path):
    paths = copy_series(series["axial"][0], tmp_path / "tilt")
    for index, path in enumerate(paths):  # a gantry tilt: each slice 0.5 mm further along its rows
        position, row, _ = geometry(path)
        edit(path, ImagePositionPatient=[float(v) for v in position + 0.5 * index * row])
    refused(tmp_path / "tilt", "sheared dicom series", "gantry tilt")


def test_slices_without_geometry_are_refused(series, tmp_path):
    paths = copy_series(series["axial"][0], tmp_path / "capture")
    dataset = pydicom.dcmread(paths[3])
    del dataset.ImagePositionPatient
    dataset.save_as(paths[3])
    refused(tmp_path / "capture", "no dicom geometry", "1 of its 48 files", "slice_0003.dcm")


def test_a_multi_frame_file_is_refused_with_what_to_do(series, tmp_path):
    (tmp_path / "enhanced").mkdir()
    dataset = pydicom.dcmread(next(series["axial"][0].iterdir()))
    dataset.NumberOfFrames = 2
    dataset.PixelData = dataset.PixelData * 2
    dataset.save_as(tmp_path / "enhanced" / "volume.dcm")
    refused(tmp_path / "enhanced", "multi-frame dicom", "2 frames", "dcm2niix")


def test_a_folder_without_dicom_files_says_so(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.txt").write_text("not a scan")
    with pytest.raises(IsADirectoryError, match="is a directory, not a NIfTI file, and holds no DICOM files") as error:
        UmbrellaVolumeProcessor(volume_size=8).preprocess_volume(folder)
    assert str(folder) in str(error.value) and "one DICOM series" in str(error.value)


def test_without_simpleitk_a_series_asks_for_the_extra(series, monkeypatch):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # `import SimpleITK` raises ImportError
    folder = series["axial"][0]
    with pytest.raises(ImportError, match=r"pip install umbrella_llava\[dicom\]") as error:
        load_volume(folder)
    assert str(folder) in str(error.value)


# ---------------------------------------------------------------------------------------------------------------------
# Everywhere a NIfTI path is: the cache, records, check-data, preview, the pipeline, remote code
# ---------------------------------------------------------------------------------------------------------------------


def test_the_volume_cache_keys_a_folder_by_its_files(series, tmp_path):
    folder = tmp_path / "cached"
    paths = copy_series(series["axial"][0], folder)
    processor = UmbrellaVolumeProcessor(volume_size=(16, 16, 16))
    cache = VolumeCache(tmp_path / "cache")
    entry = cache.entry_path(folder, processor)
    volume = cache.get(folder, processor)
    assert entry.is_file() and cache.entry_path(folder, processor) == entry
    torch.testing.assert_close(cache.get(folder, processor), volume, atol=0, rtol=0)
    torch.testing.assert_close(volume, processor.preprocess_volume(folder), atol=0, rtol=0)

    stat = paths[5].stat()
    data = bytearray(paths[5].read_bytes())
    data[-1] ^= 0xFF  # a voxel edited in place, size and modification time kept
    paths[5].write_bytes(bytes(data))
    os.utime(paths[5], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache.entry_path(folder, processor) != entry
    paths[6].unlink()
    with pytest.raises(InvalidVolumeError, match="missing slices"):
        cache.get(folder, processor)


def write_records(path: Path, volumes: list[Path]) -> Path:
    records = [
        {
            "task_id": f"r{index}",
            "task_type": "T1",
            "images": [{"path": str(volume)}],
            "conversations": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which side is marked?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "left"}]},
            ],
        }
        for index, volume in enumerate(volumes)
    ]
    path.write_text("\n".join(json.dumps(record) for record in records))
    return path


def test_a_record_may_name_a_series_folder(series, tiny_processor, tmp_path):
    from umbrella_llava.data import ConversationDataset

    folder, nifti = series["sagittal oblique"]
    dataset = ConversationDataset(write_records(tmp_path / "train.jsonl", [folder, nifti]), tiny_processor)
    from_series, from_nifti = dataset[0]["pixel_values"], dataset[1]["pixel_values"]
    assert from_series.shape == (1, 1, 16, 16, 16)
    torch.testing.assert_close(from_series, from_nifti, atol=1e-3, rtol=0)


def test_check_data_passes_a_series_and_names_a_broken_one(series, tmp_path, capsys):
    from umbrella_llava.check_data import main

    broken = tmp_path / "broken_series"
    copy_series(series["axial"][0], broken)[10].unlink()
    good = write_records(tmp_path / "good.jsonl", [series["axial"][0], series["coronal oblique"][0]])
    assert main([str(good), "--volume_size", "16", "16", "16"]) == 0
    assert "2 records read, 2 valid, 0 invalid" in capsys.readouterr().out
    bad = write_records(tmp_path / "bad.jsonl", [series["axial"][0], broken])
    assert main([str(bad), "--volume_size", "16", "16", "16"]) == 1
    report = capsys.readouterr().out
    (invalid,) = [line for line in report.splitlines() if line.startswith("INVALID")]
    assert str(broken) in invalid and "missing slices" in invalid
    assert "1 invalid (missing dicom slices: 1)" in report


def test_preview_of_a_series_folder(series, tmp_path):
    from umbrella_llava.preview import main

    folder = series["coronal oblique"][0]
    output = tmp_path / "series_preview.png"
    assert main([f"{folder}/", "--output", str(output), "--volume_size", "48", "48", "48"]) == 0
    assert output.read_bytes().startswith(b"\x89PNG")


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory) -> Path:
    """A saved tiny model and processor (16³ volumes), which carry their code, dicom_series.py included."""
    from conftest import tiny_config

    from umbrella_llava import UmbrellaLlavaForConditionalGeneration

    folder = tmp_path_factory.mktemp("dicom_checkpoint") / "checkpoint"
    torch.manual_seed(0)
    UmbrellaLlavaForConditionalGeneration(tiny_config(tokenizer)).save_pretrained(folder)
    processor = UmbrellaLlavaProcessor(
        image_processor=UmbrellaVolumeProcessor(volume_size=16), tokenizer=tokenizer, image_seq_length=8
    )
    processor.save_pretrained(folder)
    assert (folder / "dicom_series.py").is_file()
    return folder


def test_the_pipeline_reads_a_series_folder(series, checkpoint):
    pytest.importorskip("PIL", reason="transformers' image-text-to-text pipeline requires Pillow")
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(checkpoint), trust_remote_code=True, max_new_tokens=4)
    assert type(pipe).__module__.startswith("transformers_modules")  # the checkpoint's own code, dicom_series too
    folder, nifti = series["axial"]

    def answer_to_chat(path: Path) -> list[int]:
        content = [{"type": "image", "path": str(path)}, {"type": "text", "text": "Side?"}]
        return pipe(text=[[{"role": "user", "content": content}]], return_tensors=True)[0][0][
            "generated_token_ids"
        ].tolist()

    assert answer_to_chat(folder) == answer_to_chat(nifti)
    assert pipe(str(folder), text="<image> Side?") == pipe(str(nifti), text="<image> Side?")


@pytest.mark.slow
def test_a_saved_processor_reads_a_series_without_the_package(series, checkpoint, tmp_path):
    folder = series["sagittal oblique"][0]
    expected = UmbrellaLlavaProcessor.from_pretrained(checkpoint).image_processor(folder)["pixel_values"]
    torch.save(expected, tmp_path / "expected.pt")
    run_without_package(
        f"""
        import torch
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        pixel_values = processor.image_processor({str(folder)!r})["pixel_values"]
        torch.testing.assert_close(pixel_values, torch.load({str(tmp_path / "expected.pt")!r}), atol=0, rtol=0)
        """,
        cwd=tmp_path,
    )


def test_a_checkpoint_needs_dicom_series_py_only_when_its_image_processor_imports_it(tmp_path):
    import umbrella_llava
    from umbrella_llava.hub import REMOTE_CODE_FILES, _missing_code_files

    for name in REMOTE_CODE_FILES:
        shutil.copy(Path(umbrella_llava.__file__).parent / name, tmp_path / name)
    assert _missing_code_files(tmp_path) == []
    (tmp_path / "dicom_series.py").unlink()
    assert _missing_code_files(tmp_path) == ["dicom_series.py"]
    # A checkpoint saved before DICOM support: its image processor imports no dicom_series, and it loads without one.
    image_processing = tmp_path / "image_processing_umbrella_llava.py"
    source = image_processing.read_text()
    image_processing.write_text(source.replace("from .dicom_series import read_dicom_series", "pass"))
    assert _missing_code_files(tmp_path) == []
