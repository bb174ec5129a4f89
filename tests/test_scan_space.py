"""A map made on the model's grid goes back to the scan's own grid and affine: stored LAS, oblique, or resampled to
a voxel spacing, a marker in the scan comes back where it was."""

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from umbrella_llava.image_processing_umbrella_llava import UmbrellaVolumeProcessor
from umbrella_llava.scan_space import grid_affine, to_scan_space

pytest.importorskip("scipy")


def marked_scan(mni_t1_path, storage: str) -> tuple[nib.Nifti1Image, tuple[int, int, int]]:
    """The MNI T1 with a bright 3³ marker in the left hemisphere, stored as `storage`; and the marker's voxel."""
    image = nib.load(mni_t1_path)
    data = np.asarray(image.dataobj, dtype=np.float32).copy()
    marker = (30, 60, 50)  # RAS+ voxel order in the MNI file: x = 30 of 99 is left of the midline
    data[tuple(slice(c - 1, c + 2) for c in marker)] = data.max() * 3
    affine = image.affine.copy()
    if storage == "LAS":  # first axis stored right to left
        data, affine = (
            data[::-1].copy(),
            affine @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
        )
        marker = (image.shape[0] - 1 - marker[0], *marker[1:])
    elif storage == "oblique":  # rotated 20° about the z axis, and axes stored as (y, x, z)
        angle = math.radians(20)
        rotation = np.array(
            [
                [math.cos(angle), -math.sin(angle), 0, 0],
                [math.sin(angle), math.cos(angle), 0, 0],
                [0, 0, 1, 0],
                [0, 0, 0, 1],
            ]
        )
        swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        data, affine = data.transpose(1, 0, 2).copy(), rotation @ affine @ swap
        marker = (marker[1], marker[0], marker[2])
    return nib.Nifti1Image(data, affine), marker


@pytest.mark.parametrize("storage", ["RAS", "LAS", "oblique"])
@pytest.mark.parametrize("voxel_spacing", [None, 3.0])
def test_a_map_returns_to_the_scan_grid_where_the_scan_put_it(mni_t1_path, storage, voxel_spacing):
    scan, marker = marked_scan(mni_t1_path, storage)
    processor = UmbrellaVolumeProcessor(
        volume_size=(48, 48, 48), voxel_spacing=voxel_spacing, normalization="none", clip_percentiles=None
    )
    on_grid = processor.preprocess_volume(scan)[0]
    back = to_scan_space(on_grid, scan, processor)
    assert back.shape == scan.shape and np.allclose(back.affine, scan.affine)
    found = np.unravel_index(np.argmax(np.asarray(back.dataobj)), back.shape)
    assert max(abs(int(f) - m) for f, m in zip(found, marker)) <= 2, (found, marker)
    # The whole brain comes back, not only the marker.
    original, returned = np.asarray(scan.dataobj), np.asarray(back.dataobj)
    inside = returned != 0
    assert np.corrcoef(original[inside], returned[inside])[0, 1] > 0.9


def test_the_grid_affine_is_the_processors_resampling(mni_t1_path):
    # Each voxel of the model's grid, mapped to the world and back into the scan, reads the value the processor put
    # there: checked on the grid's centre voxel for a LAS scan.
    scan, _ = marked_scan(mni_t1_path, "LAS")
    processor = UmbrellaVolumeProcessor(volume_size=(33, 39, 31), normalization="none", clip_percentiles=None)
    affine = grid_affine(scan, processor)
    on_grid = processor.preprocess_volume(scan)[0]
    centre = np.array([16, 19, 15, 1.0])
    scan_voxel = np.linalg.solve(scan.affine, affine @ centre)[:3]
    assert np.allclose(scan_voxel, np.round(scan_voxel), atol=1e-6)  # 99/33 etc.: centres align exactly
    value = np.asarray(scan.dataobj)[tuple(np.round(scan_voxel).astype(int))]
    assert torch.isclose(on_grid[16, 19, 15], torch.tensor(float(value)), rtol=1e-4)


def test_an_array_has_no_grid_to_return_to():
    with pytest.raises(TypeError, match="has no affine"):
        to_scan_space(torch.zeros(4, 4, 4), np.zeros((4, 4, 4)), UmbrellaVolumeProcessor(volume_size=(4, 4, 4)))


def test_a_map_returns_to_a_dicom_series_grid(mni_t1_path, tmp_path):
    """A DICOM series folder is a scan like a NIfTI file: its own grid is the series' (here stored sagittally)."""
    pytest.importorskip("pydicom")
    pytest.importorskip("SimpleITK")
    from umbrella_llava.dicom_writer import write_dicom_series
    from umbrella_llava.image_processing_umbrella_llava import load_image

    scan, _ = marked_scan(mni_t1_path, "RAS")
    folder = tmp_path / "series"
    write_dicom_series(scan, folder, axcodes=("P", "S", "L"))  # sagittal slices: columns to P, rows to S, slices to L
    series = load_image(folder)
    processor = UmbrellaVolumeProcessor(volume_size=(48, 48, 48), normalization="none", clip_percentiles=None)
    back = to_scan_space(processor.preprocess_volume(folder)[0], folder, processor)
    assert back.shape == series.shape[:3] and np.allclose(back.affine, series.affine)
    # The marker, found in the series' own voxels, is where the map's maximum comes back.
    series_data = np.asarray(series.dataobj)
    marker = np.unravel_index(np.argmax(series_data), series_data.shape)
    found = np.unravel_index(np.argmax(np.asarray(back.dataobj)), back.shape)
    assert max(abs(int(f) - int(m)) for f, m in zip(found, marker)) <= 2, (found, marker)
