"""A folder holding one DICOM series → a nibabel image with a RAS affine, in memory, so that it becomes a volume by
exactly the steps a NIfTI file takes (`image_processing_umbrella_llava._ras_voxels`: RAS+ voxel order and spacing
from the affine, then resize and normalise).

SimpleITK reads the series (`ImageSeriesReader`, GDCM underneath): voxels with each file's rescale slope and intercept
applied, and the geometry from `ImageOrientationPatient`, `ImagePositionPatient` and `PixelSpacing` (DICOM's LPS
patient coordinates, turned into RAS here). Its GDCM decodes the compressed transfer syntaxes too (JPEG, JPEG
lossless, JPEG-LS, JPEG 2000, RLE). It was chosen by measurement (BENCHMARKS.md, "DICOM readers").

SimpleITK reads a series with missing slices or uneven spacing without complaint (ITK prints a warning to stderr and
spreads the slices evenly), and a folder with a localizer mixed in fails deep inside ITK. So the headers are read
first, and a folder that cannot be one volume is an `InvalidVolumeError` naming it and saying why (`kind` in
brackets): several series ("several dicom series"), one 2-D image ("2-d dicom"), a multi-frame file ("multi-frame
dicom"), slices of another orientation or size ("mixed dicom slices"), slices without position or orientation ("no
dicom geometry"), two slices at one position ("duplicate dicom slices"), a gap ("missing dicom slices"), uneven
spacing ("uneven dicom spacing"), slices that do not stack along their normal, as with a gantry tilt ("sheared dicom
series"), colour pixels ("rgb voxels"), or pixels SimpleITK cannot decode ("undecodable voxels").

This file travels to the Hub as remote code beside `image_processing_umbrella_llava.py`: numpy, nibabel and SimpleITK
are imported only where they are needed, inside `try` (`pip install umbrella_llava[dicom]` for SimpleITK).
"""

import os
import stat
from collections import Counter
from dataclasses import dataclass
from types import ModuleType

from .image_processing_umbrella_llava import InvalidVolumeError

try:
    import numpy as np
except ImportError:  # the image processor works on tensors without numpy; a DICOM folder needs it
    np = None

try:
    import nibabel as nib
except ImportError:
    nib = None

INSTALL_HINT = "pip install umbrella_llava[dicom]"
# Files that sit in DICOM folders without being images of the series.
_NOT_SLICES = {"dicomdir"}
# Slice geometry tolerances: directions are unit vectors; positions are in mm, relative to the median slice spacing.
_DIRECTION_TOLERANCE = 1e-3
_SPACING_TOLERANCE = 0.01  # a spacing more than 1 % off the median is uneven
_GAP_FACTOR = 1.5  # ... and one at least 1.5 times the median is a missing slice


@dataclass(frozen=True)
class SliceHeader:
    """What the header of one DICOM file says, read before any pixel is decoded."""

    path: str
    series_uid: str
    description: str
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row direction, column direction (LPS)
    position: tuple[float, ...] | None  # ImagePositionPatient of the first pixel (LPS, mm)
    size: tuple[int, int, int]  # columns, rows, frames
    samples_per_pixel: int


def series_files(folder: str | os.PathLike) -> list[str]:
    """The candidate files of a series folder: its regular files, not hidden, not in subfolders, sorted by name.

    Raises:
        PermissionError / OSError: naming the folder, when it cannot be listed.
    """
    folder = os.fspath(folder)
    try:
        names = sorted(os.listdir(folder))
    except PermissionError:
        raise PermissionError(f"DICOM series folder {folder} exists but this user may not list it.") from None
    paths = [os.path.join(folder, name) for name in names if not name.startswith(".")]
    return [path for path in paths if _is_regular_file(path)]


def _is_regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # a link to nothing, a loop
        return False


def dicom_files(folder: str | os.PathLike) -> list[str]:
    """The files of `folder` (see `series_files`) marked as DICOM files: "DICM" after the 128-byte preamble, as
    every DICOM file written to media must be. Files without the mark (notes, JSON sidecars) are ignored, and so is
    a DICOMDIR index."""
    found = []
    for path in series_files(folder):
        if os.path.basename(path).lower() in _NOT_SLICES:
            continue
        try:
            with open(path, "rb") as file:
                file.seek(128)
                if file.read(4) == b"DICM":
                    found.append(path)
        except OSError:
            continue
    return found


def _import_simpleitk(folder: str) -> ModuleType:
    try:
        import SimpleITK as sitk
    except ImportError:
        raise ImportError(
            f"{folder} is a DICOM series folder, and reading DICOM needs SimpleITK, which is not installed: "
            f"`{INSTALL_HINT}`."
        ) from None
    return sitk


def _needs_numpy(folder: str) -> None:
    if np is None or nib is None:
        raise ImportError(f"Reading the DICOM series {folder} needs numpy and nibabel: `{INSTALL_HINT}`.")


def _floats(text: str) -> tuple[float, ...] | None:
    try:
        return tuple(float(value) for value in text.split("\\"))
    except ValueError:
        return None


def read_slice_header(sitk: ModuleType, path: str, folder: str) -> SliceHeader:
    """The header of one DICOM file (no pixels decoded), read with SimpleITK's `ImageFileReader`."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise InvalidVolumeError(
            f"DICOM series {folder}: the file {os.path.basename(path)} is marked as DICOM but its header cannot be "
            f"read ({' '.join(str(err).split())[-200:]}); remove or replace it.",
            "unreadable file",
        ) from err

    def tag(key: str) -> str:
        return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""

    orientation, position = _floats(tag("0020|0037")), _floats(tag("0020|0032"))
    size = tuple(int(n) for n in reader.GetSize()) + (1,) * (3 - reader.GetDimension())
    return SliceHeader(
        path=path,
        series_uid=tag("0020|000e"),
        description=tag("0008|103e"),
        orientation=orientation if orientation is not None and len(orientation) == 6 else None,
        position=position if position is not None and len(position) == 3 else None,
        size=size[:3],
        samples_per_pixel=reader.GetNumberOfComponents(),
    )


def _one_series(headers: list[SliceHeader], folder: str) -> None:
    series = Counter(header.series_uid for header in headers)
    if len(series) == 1:
        return
    descriptions = {header.series_uid: header.description for header in headers}
    listed = "; ".join(
        f"{uid or '(no SeriesInstanceUID)'} {descriptions[uid]!r}: {count} files" for uid, count in series.items()
    )
    raise InvalidVolumeError(
        f"DICOM series folder {folder} holds {len(series)} series ({listed}). A volume is one series: put each "
        "series in its own folder and name that folder.",
        "several dicom series",
    )


def _one_volume_of_slices(headers: list[SliceHeader], folder: str) -> None:
    """Refuse a series that is not a stack of single-frame grey-scale slices of one orientation and size."""
    if len(headers) == 1 and headers[0].size[2] == 1:
        raise InvalidVolumeError(
            f"DICOM series folder {folder} holds one 2-D image ({os.path.basename(headers[0].path)}, "
            f"{headers[0].size[0]} × {headers[0].size[1]} pixels), not a volume; name the folder of a 3-D series.",
            "2-d dicom",
        )
    multi_frame = [header for header in headers if header.size[2] > 1]
    if multi_frame:
        raise InvalidVolumeError(
            f"DICOM series folder {folder}: {os.path.basename(multi_frame[0].path)} is a multi-frame (enhanced) DICOM "
            f"file of {multi_frame[0].size[2]} frames, whose per-frame geometry is not read here; convert the series "
            "to NIfTI with dcm2niix (`pip install dcm2niix`) and name the .nii.gz.",
            "multi-frame dicom",
        )
    colour = [header for header in headers if header.samples_per_pixel != 1]
    if colour:
        raise InvalidVolumeError(
            f"DICOM series folder {folder}: {os.path.basename(colour[0].path)} has {colour[0].samples_per_pixel} "
            "samples per pixel (colour), not grey-scale intensities; a volume is one grey-scale series.",
            "rgb voxels",
        )
    no_geometry = [header for header in headers if header.orientation is None or header.position is None]
    if no_geometry:
        raise InvalidVolumeError(
            f"DICOM series folder {folder}: {len(no_geometry)} of its {len(headers)} files (e.g. "
            f"{os.path.basename(no_geometry[0].path)}) have no ImageOrientationPatient or ImagePositionPatient, so "
            "where their slices lie is unknown (a secondary capture or a screenshot?). Remove them.",
            "no dicom geometry",
        )
    groups: list[list[SliceHeader]] = []  # slices of one orientation (within tolerance) and size
    for header in headers:
        group = next((group for group in groups if _same_layout(group[0], header)), None)
        if group is None:
            groups.append([header])
        else:
            group.append(header)
    if len(groups) > 1:
        majority = max(groups, key=len)
        odd = [header for group in groups if group is not majority for header in group]
        names = ", ".join(os.path.basename(header.path) for header in odd[:5]) + (" ..." if len(odd) > 5 else "")
        first = majority[0]
        raise InvalidVolumeError(
            f"DICOM series folder {folder}: {len(majority)} slices share one orientation "
            f"{[round(v, 4) for v in first.orientation]} and size {first.size[0]} × {first.size[1]}, but {len(odd)} "
            f"differ ({names}); a localizer or scout image mixed into the series? Remove the files that are not "
            "slices of the volume.",
            "mixed dicom slices",
        )


def _same_layout(first: SliceHeader, second: SliceHeader) -> bool:
    difference = max(abs(a - b) for a, b in zip(first.orientation, second.orientation))
    return first.size == second.size and difference <= _DIRECTION_TOLERANCE


def sorted_slices(headers: list[SliceHeader], folder: str) -> list[SliceHeader]:
    """The slices of one orientation in order along their normal (row × column direction), after refusing
    duplicate positions, gaps, uneven spacing and positions that do not stack along the normal.

    Raises:
        InvalidVolumeError: naming the folder and the files where the stack breaks.
    """
    orientation = np.array(headers[0].orientation).reshape(2, 3)
    normal = np.cross(orientation[0], orientation[1])
    positions = np.array([header.position for header in headers])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    headers, positions, along = [headers[i] for i in order], positions[order], along[order]
    steps = np.diff(along)
    spacing = float(np.median(steps))

    def between(index: int) -> str:
        first, second = headers[index], headers[index + 1]
        return (
            f"{os.path.basename(first.path)} and {os.path.basename(second.path)} (at {along[index]:.4g} and "
            f"{along[index + 1]:.4g} mm along the slice normal)"
        )

    tolerance = max(_SPACING_TOLERANCE * spacing, 1e-3)
    duplicates = np.flatnonzero(steps < tolerance)
    if len(duplicates):
        raise InvalidVolumeError(
            f"DICOM series folder {folder}: {len(duplicates)} slice position(s) occur twice, e.g. "
            f"{between(int(duplicates[0]))}. A copied file, or several echoes or time points in one series: keep "
            "one file per position (or split the echoes / time points into their own folders).",
            "duplicate dicom slices",
        )
    gaps = np.flatnonzero(steps >= _GAP_FACTOR * spacing)
    if len(gaps):
        missing = int(round(float(steps[gaps].sum()) / spacing)) - len(gaps)
        raise InvalidVolumeError(
            f"DICOM series folder {folder} has missing slices: the slices are {spacing:.4g} mm apart, but "
            f"{len(gaps)} gap(s) are wider, e.g. between {between(int(gaps[0]))}; about {missing} slice(s) are "
            "missing. Copy the whole series again.",
            "missing dicom slices",
        )
    uneven = np.flatnonzero(np.abs(steps - spacing) > tolerance)
    if len(uneven):
        raise InvalidVolumeError(
            f"DICOM series folder {folder} has uneven slice spacing: the slices are {spacing:.4g} mm apart (the "
            f"median), but {len(uneven)} step(s) differ by more than 1 %, e.g. {steps[uneven[0]]:.4g} mm between "
            f"{between(int(uneven[0]))}. A volume needs evenly spaced slices; resample the series (dcm2niix does) "
            "and name the NIfTI.",
            "uneven dicom spacing",
        )
    offsets = positions - positions[0] - np.outer(along - along[0], normal)
    if len(headers) > 1 and float(np.abs(offsets).max()) > max(tolerance, 0.05):
        raise InvalidVolumeError(
            f"DICOM series folder {folder}: its slices do not stack along their normal (the positions move up to "
            f"{float(np.abs(offsets).max()):.3g} mm sideways, as with a gantry tilt), so the voxels are sheared; "
            "convert the series with dcm2niix, which corrects a gantry tilt, and name the NIfTI.",
            "sheared dicom series",
        )
    return headers


def read_dicom_series(folder: str | os.PathLike, max_voxels: int | None = None) -> "nib.Nifti1Image":
    """Read the one DICOM series of `folder` into memory as a nibabel image: float32 voxels `(columns, rows,
    slices)` with rescale slope and intercept applied, and a RAS affine `(4, 4)` in mm.

    Args:
        folder: a folder whose DICOM files (see `dicom_files`) are the slices of one series.
        max_voxels: refuse, from the headers and before any pixel is decoded, a series of more voxels.

    Raises:
        IsADirectoryError: if no file of `folder` is a DICOM file.
        ImportError: if SimpleITK (or numpy / nibabel) is not installed; the message says `pip install
            umbrella_llava[dicom]`.
        InvalidVolumeError: naming the folder and the reason, for a folder that is not one volume (see the module's
            docstring for the list and each `kind`).
    """
    folder = os.fspath(folder)
    files = dicom_files(folder)
    if not files:
        raise IsADirectoryError(
            f"Volume path {folder} is a directory, not a NIfTI file, and holds no DICOM files (none is marked "
            "'DICM' after the 128-byte preamble); name the .nii / .nii.gz file itself, or a folder of one DICOM "
            "series."
        )
    sitk = _import_simpleitk(folder)
    _needs_numpy(folder)
    headers = [read_slice_header(sitk, path, folder) for path in files]
    _one_series(headers, folder)
    _one_volume_of_slices(headers, folder)
    headers = sorted_slices(headers, folder)
    columns, rows, _ = headers[0].size
    voxels = columns * rows * len(headers)
    if max_voxels is not None and voxels > max_voxels:
        raise InvalidVolumeError(
            f"DICOM series folder {folder} has {len(headers)} slices of {columns} × {rows}, {voxels:,} voxels, more "
            f"than MAX_VOXELS = {max_voxels:,}; raise image_processing_umbrella_llava.MAX_VOXELS if it is truly "
            "that large.",
            "too large",
        )

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([header.path for header in headers])
    # float32 whatever the first file's type: slopes may differ from slice to slice (Philips writes one per slice).
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise InvalidVolumeError(
            f"Could not decode the pixels of the DICOM series {folder} (a damaged file, or a transfer syntax that "
            f"SimpleITK's GDCM cannot decode): {' '.join(str(err).split())[-300:]}",
            "undecodable voxels",
        ) from err
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # ITK's (slice, row, column) → (column, row, slice)
    affine = np.eye(4)
    affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    affine[:2] *= -1  # LPS → RAS
    return nib.Nifti1Image(data, affine)


__all__ = ["SliceHeader", "dicom_files", "read_dicom_series", "series_files", "sorted_slices"]
