"""Write a NIfTI (nibabel) image as a DICOM series with pydicom: the round-trip fixture of the DICOM tests and of
`benchmarks/dicom_readers.py`, so that a series can be checked against the NIfTI it came from.

One file per slice, MR Image Storage, int16 voxels with a rescale slope and intercept (so that a reader must apply
them), and the geometry of the image's own affine: `ImageOrientationPatient`, `ImagePositionPatient` and
`PixelSpacing` in DICOM's LPS patient coordinates. The stored voxel layout is chosen with `axcodes` (nibabel's
orientation codes of the columns, rows and slices: `("L", "P", "S")` is a scanner's usual axial stack,
`("P", "I", "R")` a sagittal one), by an exact reordering of the voxels; an oblique series is an image whose affine is
rotated (`oblique_affine`).

This module is not part of reading volumes; it needs pydicom (`pip install umbrella_llava[dicom]` or `[test]`).
"""

import math
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

# Rescaled voxels span at most this many int16 steps, leaving room below 32767 for rounding.
_INT16_STEPS = 32000
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def oblique_affine(image: nib.spatialimages.SpatialImage, degrees: float, axis: int = 0) -> np.ndarray:
    """The affine `(4, 4)` of `image` rotated by `degrees` about the world axis `axis` (0: R, 1: A, 2: S) through
    the centre of its field of view, so that the same voxels lie obliquely in the scanner."""
    angle = math.radians(degrees)
    other = [a for a in range(3) if a != axis]
    rotation = np.eye(4)
    rotation[np.ix_(other, other)] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    centre = image.affine @ np.array([*(np.array(image.shape[:3]) - 1) / 2, 1.0])
    to_centre, back = np.eye(4), np.eye(4)
    to_centre[:3, 3], back[:3, 3] = -centre[:3], centre[:3]
    return back @ rotation @ to_centre @ image.affine


def write_dicom_series(
    image: nib.spatialimages.SpatialImage,
    folder: str | os.PathLike,
    axcodes: Sequence[str] = ("L", "P", "S"),
    series_description: str = "T1w",
    series_instance_uid: str | None = None,
    transfer_syntax_uid: str | None = None,
    series_number: int = 1,
) -> list[Path]:
    """Write the 3-D `image` to `folder` (created if missing) as one DICOM series, one file per slice.

    Args:
        image: a 3-D nibabel image; its affine (RAS mm) gives the series' geometry.
        folder: where the files `slice_0000.dcm`, ... go.
        axcodes: the directions in which the columns, rows and slices of the stored series increase.
        series_description: the series' `SeriesDescription`.
        series_instance_uid: its `SeriesInstanceUID` (a new one when `None`).
        transfer_syntax_uid: a compressed transfer syntax to encode the pixels with (e.g. pydicom's `RLELossless`;
            others need pydicom's encoder plugins), or `None` for uncompressed explicit VR little endian.
        series_number: its `SeriesNumber`.

    Returns:
        The files written, in slice order.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt(tuple(axcodes))
    )
    image = image.as_reoriented(ornt)
    data = np.asarray(image.get_fdata(dtype=np.float64))
    low, high = float(data.min()), float(data.max())
    slope = (high - low) / _INT16_STEPS if high > low else 1.0
    stored = np.round((data - low) / slope).astype(np.int16)

    affine = _RAS_TO_LPS @ image.affine  # voxel (column, row, slice) → LPS mm
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_direction, column_direction = affine[:3, 0] / spacing[0], affine[:3, 1] / spacing[1]
    study, frame_of_reference = generate_uid(), generate_uid()
    series_instance_uid = series_instance_uid or generate_uid()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(stored.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_instance_uid
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PatientName, ds.PatientID, ds.Modality, ds.Manufacturer = "MNI152", "mni152", "MR", "umbrella_llava"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = series_description, series_number, index + 1
        ds.ImageOrientationPatient = [float(v) for v in (*row_direction, *column_direction)]
        ds.ImagePositionPatient = [float(v) for v in affine @ np.array([0, 0, index, 1.0])][:3]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows, between columns
        ds.SliceThickness = ds.SpacingBetweenSlices = float(spacing[2])
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:.10g}", f"{low:.10g}", "US"
        ds.PixelData = np.ascontiguousarray(stored[:, :, index].T).tobytes()  # pixel (row, column)
        if transfer_syntax_uid is not None:
            ds.compress(transfer_syntax_uid, generate_instance_uid=False)
        path = folder / f"slice_{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


__all__ = ["oblique_affine", "write_dicom_series"]
