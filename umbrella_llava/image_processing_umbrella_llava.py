"""Image processing for UmbrellaLlava: NIfTI volumes and DICOM series of any orientation and spacing → RAS+ tensors
of one size.

This file travels to the Hub as remote code: at the top level it imports only the standard library, torch and
transformers, and siblings with single-dot relative imports. nibabel (to read NIfTI files) and numpy are optional:
arrays and tensors work without nibabel, and a NIfTI path without it is a clear `ImportError`. A folder holding one
DICOM series is read by the sibling `dicom_series.py` (SimpleITK, `pip install umbrella_llava[dicom]`) into a nibabel
image with a RAS affine, and from there takes the same steps as a NIfTI file.

The path of one volume, one small function per step:

    read (`load_volume`: a NIfTI file or a DICOM series folder (`load_image`); decode once, take a 4-D file's frames
          as `frames` says, reorient to RAS+, voxel spacing from the affine)
      ─▶ NaN/±Inf voxels set to 0
      ─▶ spatial: resize the field of view to `volume_size` (trilinear), or, with `voxel_spacing`, resample to that
         spacing and centre-crop/pad to `volume_size`, so that one voxel is always the same number of millimetres
      ─▶ intensity: clip each channel to its `clip_percentiles`, then min-max to [0, 1] or z-score

Every failure to read a file ends here, named: a missing, unreadable, looping or directory path is an `OSError`
subclass, and anything wrong with what the file holds is an [`InvalidVolumeError`] (a `ValueError`), raised before
anything is allocated where the header alone shows it (a zero-length axis, more than `MAX_VOXELS` voxels decoded or
resampled, RGB or complex voxels, a non-finite affine, frames that the `frames` policy refuses).
"""

import errno
import math
import operator
import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from .configuration_umbrella_llava import _as_triple

try:
    import numpy as np
except ImportError:  # numpy is optional: tensors need nothing else
    np = None

try:  # python-isal's igzip (the `fast` extra) decompresses gzip about twice as fast as zlib
    from isal import igzip as _gzip
except ImportError:
    import gzip as _gzip

try:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError
except ImportError:  # nibabel is optional: only NIfTI paths and images need it
    nib = None

NORMALIZATIONS = ("minmax", "zscore", "none")
# What the frames of a 4-D file (fMRI run, diffusion, multi-echo) become; besides these, `frames` may be an int index.
FRAME_POLICIES = ("error", "mean", "first", "channels")
# Centred inputs: a vision path trained from scratch learns from z-scored volumes in far fewer steps than from [0, 1]
# ones, whose common offset it must first learn around (BENCHMARKS.md, "Learning speed"). Converted checkpoints
# write "minmax" into their processor: the base's pixel normalisation is folded into their kernel for [0, 1] inputs.
DEFAULT_NORMALIZATION = "zscore"

# torch.quantile refuses more elements than this; percentiles of a larger volume are taken on an even subsample.
_MAX_QUANTILE_ELEMENTS = 2**24

# The most voxels one volume may hold, as decoded or as resampled to `voxel_spacing` (1 GiB as float32). A whole
# head at 0.5 mm is 2**27 voxels; a header asking for more is far more often damaged (a corrupt dim field, a pixdim
# in micrometres) than real, and decoding it would exhaust memory. Raise it here for larger real volumes.
MAX_VOXELS = 2**28

VolumeInput = Union[str, os.PathLike, torch.Tensor, "np.ndarray", "nib.spatialimages.SpatialImage"]


# ---------------------------------------------------------------------------------------------------------------------
# Reading one volume
# ---------------------------------------------------------------------------------------------------------------------


class InvalidVolumeError(ValueError):
    """A volume that cannot be preprocessed as it is; the message names it and says what to do. `kind` is a short
    reason, used to count skipped records."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def _size_in_words(voxels: int) -> str:
    return f"{voxels:,} voxels, {voxels * 4 / 2**30:,.1f} GiB as float32"


def describe_source(source: Any) -> str:
    """A short name of a volume source for error messages: the file path, or the type and shape of an array."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    filename = source.get_filename() if hasattr(source, "get_filename") else None
    if filename:
        return filename
    return f"<{type(source).__name__} of shape {tuple(getattr(source, 'shape', ()))}>"


def _decode_errors() -> tuple[type[BaseException], ...]:
    # What nibabel and the compression libraries raise for a damaged or foreign file (zlib.error is an OSError).
    return (ImageFileError, HeaderDataError, EOFError, OSError, ValueError)


def load_nifti(path: str | os.PathLike) -> "nib.spatialimages.SpatialImage":
    """Open a `.nii` / `.nii.gz` file (header only; the voxels are decoded later, once).

    Raises:
        FileNotFoundError: if `path` does not exist, or is a symbolic link to nothing.
        IsADirectoryError: if `path` is a folder (e.g. one named `scan.nii.gz`).
        PermissionError: if this user may not read the file.
        OSError: if `path` is a symbolic link loop, or cannot be examined.
        ImportError: if nibabel is not installed.
        InvalidVolumeError: if the file is not a readable NIfTI (or other nibabel) image; the message names the file.
    """
    path = os.fspath(path)
    _check_readable_file(path)
    if nib is None:
        raise ImportError(
            f"Reading the NIfTI file {path} needs nibabel, which is not installed: `pip install nibabel`. "
            "Volumes given as numpy arrays or torch tensors work without it."
        )
    try:
        return nib.load(path)
    except _decode_errors() as err:
        raise InvalidVolumeError(f"{path} is not a readable NIfTI file: {err}", "unreadable file") from err


def load_image(path: str | os.PathLike) -> "nib.spatialimages.SpatialImage":
    """Open a volume path as a nibabel image: a `.nii` / `.nii.gz` file (header only; voxels decoded later, once), or
    a folder holding one DICOM series (read whole into memory, float32, with a RAS affine from the series' geometry;
    see `dicom_series.read_dicom_series`).

    Raises:
        IsADirectoryError: if `path` is a folder that holds no DICOM file.
        ImportError: for a DICOM folder without SimpleITK (the message says `pip install umbrella_llava[dicom]`), or
            a NIfTI file without nibabel.
        InvalidVolumeError: naming the file or folder, for a file that is not a readable NIfTI, or a folder that is
            not one DICOM volume (several series, missing or duplicate slices, uneven spacing, a localizer mixed in,
            one 2-D image, undecodable pixels; `kind` says which).
        FileNotFoundError, PermissionError, OSError: see `load_nifti`.
    """
    if os.path.isdir(path):
        from .dicom_series import read_dicom_series  # here, not above: it imports InvalidVolumeError from this file

        return read_dicom_series(path, max_voxels=MAX_VOXELS)
    return load_nifti(path)


def _check_readable_file(path: str) -> None:
    """Raise an `OSError` that says what the path is, when it is not a regular file this process can read."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileNotFoundError(
                f"Volume file {path} is a symbolic link to {os.readlink(path)}, which does not exist."
            ) from None
        raise FileNotFoundError(f"Volume file not found: {path}") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(
                errno.ELOOP, f"Volume file {path} is a symbolic link loop (it never reaches a file); fix the link"
            ) from None
        raise OSError(err.errno, f"Cannot examine the volume file {path}: {err.strerror}") from None
    if stat.S_ISDIR(status.st_mode):
        raise IsADirectoryError(
            f"Volume path {path} is a directory, not a NIfTI file; name the .nii / .nii.gz file itself, or a folder "
            "of one DICOM series (read by load_image and load_volume)."
        )
    if not stat.S_ISREG(status.st_mode):
        raise OSError(f"Volume path {path} is not a regular file (a device, socket or pipe); name a NIfTI file.")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise PermissionError(
            f"Volume file {path} exists but this user may not read it; make it readable (chmod a+r) or run as a "
            "user who can."
        ) from None


def _check_image(
    image: "nib.spatialimages.SpatialImage",
    name: str,
    frames: str | int = "error",
    volume_channels: int | None = None,
) -> None:
    """Refuse, from the header alone and before any voxel is decoded, an image that cannot become a volume.
    `frames` and `volume_channels` are those of `load_volume`."""
    shape = tuple(int(n) for n in image.shape)
    if len(shape) not in (3, 4):
        raise InvalidVolumeError(
            f"{name} has shape {shape}; expected a 3-D volume (H, W, D) or a 4-D file of frames (H, W, D, frames).",
            "wrong shape",
        )
    if min(shape) < 1:
        raise InvalidVolumeError(
            f"{name}: its header gives shape {shape}, with a zero-length axis, so it holds no voxels; the dim field "
            "is damaged or the file was written empty. Re-export the scan.",
            "empty",
        )
    if len(shape) == 4 and shape[3] > 1:
        _check_frames(shape, name, frames, volume_channels)
    voxels = math.prod(shape)  # all frames: the whole file is decoded, once, whatever `frames` keeps
    if voxels > MAX_VOXELS:
        raise InvalidVolumeError(
            f"{name}: its header gives shape {shape}, {_size_in_words(voxels)}, more than MAX_VOXELS = "
            f"{MAX_VOXELS:,}; the dim field is probably damaged. Re-export the scan, or raise "
            "image_processing_umbrella_llava.MAX_VOXELS if it is truly that large.",
            "too large",
        )
    dtype = image.get_data_dtype()
    if dtype.fields is not None:
        raise InvalidVolumeError(
            f"{name} holds RGB (or other multi-field) voxels of dtype {dtype}, not intensities; convert it to one "
            "grey-scale channel (e.g. the luminance) and save it again.",
            "rgb voxels",
        )
    if dtype.kind == "c":
        raise InvalidVolumeError(
            f"{name} holds complex voxels ({dtype}); taking the real part would drop the imaginary part silently. "
            "Save the magnitude (numpy.abs) or the phase as a real-valued file.",
            "complex voxels",
        )
    affine = image.affine
    if affine is None or not np.isfinite(affine).all():
        raise InvalidVolumeError(
            f"{name} has a non-finite affine (NaN or Inf in its qform/sform), so its orientation and voxel spacing "
            f"are unknown: {None if affine is None else affine.tolist()}. Fix the header's sform/qform.",
            "bad affine",
        )


def _check_frames(shape: tuple[int, ...], name: str, frames: str | int, volume_channels: int | None) -> None:
    """Refuse a file of `shape[3] > 1` frames that the policy `frames` cannot turn into one volume."""
    count = shape[3]
    if frames == "error":
        raise InvalidVolumeError(
            f"{name} is a 4-D volume with {count} frames (shape {shape}), and the volume processor's frames='error' "
            "(the default) refuses several frames. Choose what they become with UmbrellaVolumeProcessor(frames=...): "
            f"'mean' (their mean), 'first', an index such as 0 (-1 for the last), or 'channels' (one channel per "
            f"frame, with volume_channels={count}); or split the frames into separate 3-D files.",
            "multi-frame",
        )
    if frames == "channels" and volume_channels is not None and count != volume_channels:
        raise InvalidVolumeError(
            f"{name} has {count} frames (shape {shape}), but frames='channels' needs as many frames as "
            f"volume_channels={volume_channels}. Set volume_channels={count} (and the model's), or choose "
            "frames='mean', 'first' or an index.",
            "wrong channels",
        )
    if isinstance(frames, int) and not -count <= frames < count:
        raise InvalidVolumeError(
            f"{name} has {count} frames (shape {shape}), so frames={frames} is out of range; choose an index from 0 "
            f"to {count - 1}, or from -{count} to -1 to count from the last frame.",
            "frame out of range",
        )


def _take_frames(data: "np.ndarray", frames: str | int, slope: float = 1.0, inter: float = 0.0) -> "np.ndarray":
    """What the frames of decoded voxels `(H, W, D, T)` become under `frames` (already checked against T), as
    `(C, H, W, D)`: C = T for `"channels"`, else 1. A single frame (T = 1) is the volume under every policy. Only
    `"mean"` computes: it averages the scaled values (`stored * slope + inter`) into float32."""
    if data.shape[3] == 1 or frames == "channels":
        return np.moveaxis(data, 3, 0)
    if frames == "mean":  # summed in float64 for long runs; numpy casts in chunks, so no float64 copy of all frames
        return (data.mean(axis=3, dtype=np.float64) * slope + inter).astype(np.float32)[None]
    index = 0 if frames == "first" else frames
    return data[None, ..., index]


@dataclass
class RawVolume:
    """A volume's voxels as its file stores them, with what turns them into RAS+ float32: read on the CPU (the
    decoding), turned into a volume on any device (the arithmetic). Moving the stored values (often int16) to a GPU
    moves half the bytes of float32 ones, and the conversion, scaling and reordering then run there.

    Attributes:
        voxels: `(C, H, W, D)` in the file's axis order, its stored dtype (float32 where frames were averaged).
        slope, inter: the file's intensity scaling, `value = stored * slope + inter`.
        flips: the stored axes (1-3) reversed on the way to RAS+.
        ras_order: the permutation of the (flipped) axes 1-3 that gives RAS+ order.
        spacing: voxel spacing along RAS (H, W, D) in mm, or `None` (arrays and tensors).
    """

    voxels: torch.Tensor
    slope: float = 1.0
    inter: float = 0.0
    flips: tuple[int, ...] = ()
    ras_order: tuple[int, ...] = (1, 2, 3)
    spacing: tuple[float, float, float] | None = None

    def to_volume(self, device: str | torch.device | None = None, scaled: bool = True) -> torch.Tensor:
        """The float32 RAS+ volume `(C, H, W, D)` on `device` (the voxels' own when `None`), a fresh tensor the
        caller may change in place; strided rather than contiguous where the file's order is not RAS+. With
        `scaled=False` the intensity scaling is left to [`apply_scaling`], which may then run on fewer voxels: it is
        affine, so it commutes with trilinear resizing."""
        voxels = self.voxels.to(device=device, non_blocking=True)
        if voxels.device.type == "cpu" and np is not None and voxels.dtype != torch.bfloat16:
            # numpy converts in the stored layout and asks the kernel for huge pages for a large result: on one core
            # several times faster than torch's conversion into freshly faulted pages (profiled on MNI brains).
            volume = torch.from_numpy(voxels.numpy().astype(np.float32))
        else:
            volume = torch.empty_like(voxels, dtype=torch.float32).copy_(voxels)
        if scaled:
            volume = self.apply_scaling(volume)
        if self.flips:
            volume = volume.flip(self.flips)
        return volume.permute(0, *self.ras_order)

    def apply_scaling(self, volume: torch.Tensor) -> torch.Tensor:
        """`volume * slope + inter`, in place."""
        if self.slope != 1.0:
            volume.mul_(self.slope)
        if self.inter != 0.0:
            volume.add_(self.inter)
        return volume

    @property
    def may_hold_non_finite(self) -> bool:
        """Whether the values can be NaN or ±Inf: stored integers cannot."""
        return self.voxels.is_floating_point() or not (math.isfinite(self.slope) and math.isfinite(self.inter))


def _stored_voxels(image: "nib.spatialimages.SpatialImage") -> "np.ndarray | None":
    """The voxels of an image read from a file (or a file's bytes) as stored, unscaled: a `.gz` file on disk is read
    whole and decompressed at once (with python-isal's igzip when installed, zlib's speed otherwise), then viewed
    without a copy, instead of nibabel's stream of small reads; an uncompressed file is memory-mapped and bytes are
    read by nibabel. `None` for an image built in memory from an array (nibabel hands out its array)."""
    proxy = image.dataobj
    if not isinstance(proxy, nib.arrayproxy.ArrayProxy):
        return None
    path = proxy.file_like
    if not (isinstance(path, (str, os.PathLike)) and os.fspath(path).endswith(".gz")):
        return np.asanyarray(proxy.get_unscaled())
    with open(path, "rb") as file:
        buffer = _gzip.decompress(file.read())
    count = math.prod(proxy.shape)
    return np.frombuffer(buffer, dtype=proxy.dtype, count=count, offset=proxy.offset).reshape(
        proxy.shape, order=proxy.order
    )


def _as_tensor(array: "np.ndarray") -> torch.Tensor:
    """A tensor over `array` (no copy where it can be): native byte order, and a dtype torch holds."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if array.dtype.kind not in "iufb" or array.dtype in (np.uint32, np.uint64):
        array = array.astype(np.float64)  # only exotic stored types; torch converts what is left
    with warnings.catch_warnings():  # a decompressed buffer is read-only; it is only ever read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _raw_ras_voxels(
    image: "nib.spatialimages.SpatialImage",
    name: str,
    frames: str | int = "error",
    volume_channels: int | None = None,
) -> RawVolume:
    """Decode a 3-D or 4-D image once, as stored, take its frames as `frames` says, and note the flips and
    permutation that bring it to RAS+ (every frame by the same, from the one affine) and its voxel spacing along
    (H, W, D) in mm, from the affine's column norms. The volume's H runs Left→Right, W Posterior→Anterior,
    D Inferior→Superior."""
    _check_image(image, name, frames, volume_channels)
    shape = tuple(image.shape)
    orientation = nib.orientations.io_orientation(image.affine)
    if np.isnan(orientation).any():
        raise InvalidVolumeError(
            f"{name} has a degenerate affine, so its orientation is unknown:\n{image.affine}", "bad affine"
        )
    slope, inter = 1.0, 0.0
    try:
        data = _stored_voxels(image)
        if data is not None:
            slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)
        else:
            data = image.get_fdata(dtype=np.float32, caching="unchanged")
            if isinstance(image.dataobj, np.ndarray) and np.shares_memory(data, image.dataobj):
                # A float32 image held in memory hands out its own array; later steps work in place on what they get.
                data = data.copy()
        data = data.reshape(*shape[:3], -1)
        averaged = frames == "mean" and data.shape[3] > 1
        data = _take_frames(data, frames, slope, inter)
        if averaged:
            slope, inter = 1.0, 0.0  # applied before averaging
    except (*_decode_errors(), MemoryError) as err:
        raise InvalidVolumeError(
            f"Could not decode the voxels of {name} (truncated or damaged file?): {type(err).__name__}: {err}",
            "undecodable voxels",
        ) from err
    # Input axis i becomes RAS axis orientation[i, 0], reversed where orientation[i, 1] is -1.
    flips = tuple(axis + 1 for axis, (_, sign) in enumerate(orientation) if sign < 0)
    ras_order = [int(axis) for axis in orientation[:, 0].argsort()]
    spacing = nib.affines.voxel_sizes(image.affine)
    return RawVolume(
        voxels=_as_tensor(data),
        slope=slope,
        inter=inter,
        flips=flips,
        ras_order=tuple(axis + 1 for axis in ras_order),
        spacing=tuple(float(spacing[axis]) for axis in ras_order),
    )


def load_raw_volume(source: VolumeInput, frames: str | int = "error", volume_channels: int | None = None) -> RawVolume:
    """Read one volume's voxels as stored, with what turns them into a float32 tensor `(C, H, W, D)` in RAS+ voxel
    order where the source has an affine ([`RawVolume.to_volume`], on any device).

    Args:
        source: a `.nii` / `.nii.gz` path (`str` or `os.PathLike`), the path of a folder holding one DICOM series, a
            nibabel image, or a numpy array / torch tensor of shape `(H, W, D)` or channel-first `(C, H, W, D)`.
            Arrays and tensors carry no geometry: they are taken as already RAS+ and already at the processor's voxel
            spacing.
        frames: what the frames of a file or nibabel image `(H, W, D, T)` with T > 1 become (see
            `UmbrellaVolumeProcessor`): `"error"`, `"mean"`, `"first"`, an int index (negative counts from the
            last frame) or `"channels"`. Arrays and tensors are unaffected.
        volume_channels: with `frames="channels"`, the frame count a file must have (checked from its header);
            `None` accepts any.

    Returns:
        [`RawVolume`]: the voxels `(C, H, W, D)` as stored, on the CPU for files (C is 1, or their frame count with
        `frames="channels"`), where they are for a tensor; the voxel spacing along (H, W, D) in mm, or `None` for
        arrays and tensors. The voxels may share memory with the source: `to_volume` copies.

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError, OSError, ImportError: see `load_nifti` and
            `load_image`.
        InvalidVolumeError: naming the source, for anything wrong with what it holds (see `_check_image`: several
            frames that `frames` refuses or cannot index, a frame count other than `volume_channels` with
            `frames="channels"`, a shape that is neither 3-D nor 4-D, a zero-length axis, more than `MAX_VOXELS`
            (all frames counted), RGB or complex voxels, a non-finite affine), and for any other failure of the
            decoder.
        TypeError: for any other kind of source.
    """
    name = describe_source(source)
    try:
        if isinstance(source, (str, os.PathLike)):
            source = load_image(source)
        if nib is not None and isinstance(source, nib.spatialimages.SpatialImage):
            return _raw_ras_voxels(source, name, frames, volume_channels)
    except (InvalidVolumeError, OSError, ImportError):
        raise
    except Exception as err:  # whatever else a decoder raises, so that the file is always named
        raise InvalidVolumeError(
            f"Could not read the volume {name}: {type(err).__name__}: {err}", "unreadable file"
        ) from err
    if getattr(source, "dtype", None) is not None and (
        source.is_complex() if isinstance(source, torch.Tensor) else source.dtype.kind == "c"
    ):
        raise InvalidVolumeError(
            f"{name} holds complex values; taking the real part would drop the imaginary part silently. Pass the "
            "magnitude (abs) or the phase.",
            "complex voxels",
        )
    if isinstance(source, torch.Tensor):
        volume = source.detach()
    elif np is not None and isinstance(source, np.ndarray):
        if source.dtype.fields is not None:
            raise InvalidVolumeError(
                f"{name} holds RGB (or other multi-field) values of dtype {source.dtype}; pass one grey-scale "
                "channel, or the fields as channels (C, H, W, D).",
                "rgb voxels",
            )
        volume = _as_tensor(source)
    else:
        raise TypeError(
            f"Cannot read a volume from {type(source).__name__}; give a NIfTI path, a nibabel image, a numpy array "
            "or a torch tensor."
        )
    if volume.ndim == 3:
        volume = volume.unsqueeze(0)
    if volume.ndim != 4:
        raise InvalidVolumeError(
            f"{name}: expected a volume (H, W, D) or (C, H, W, D), got {volume.ndim} dimensions.", "wrong shape"
        )
    return RawVolume(voxels=volume)


def load_volume(
    source: VolumeInput, frames: str | int = "error", volume_channels: int | None = None
) -> tuple[torch.Tensor, tuple[float, float, float] | None]:
    """Read one volume as a float32 tensor `(C, H, W, D)` on the CPU, in RAS+ voxel order where the source has an
    affine: [`load_raw_volume`], turned into a volume.

    Returns:
        `(volume, spacing)`: the volume `(C, H, W, D)` float32 on the CPU (C is 1 for files, or their frame count
        with `frames="channels"`), and the voxel spacing along (H, W, D) in mm, or `None` for arrays and tensors.
        The tensor is always a fresh copy (the caller may change it in place) and may be strided rather than
        contiguous.
    """
    raw = load_raw_volume(source, frames, volume_channels)
    return raw.to_volume("cpu"), raw.spacing


# ---------------------------------------------------------------------------------------------------------------------
# Spatial and intensity steps, on tensors (C, H, W, D)
# ---------------------------------------------------------------------------------------------------------------------


def resize_volume(volume: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear resize of `(C, H, W, D)` to `(C, *size)`; the field of view is kept, the voxel spacing changes."""
    if tuple(volume.shape[1:]) == tuple(size):
        return volume
    # NIfTI voxels arrive in Fortran order; interpolating in memory order is 3x faster than copying them first.
    memory_order = sorted(range(3), key=lambda axis: -volume.stride(axis + 1))
    spatial = [axis + 1 for axis in memory_order]
    resized = F.interpolate(
        volume.permute(0, *spatial).unsqueeze(0),
        size=[size[axis] for axis in memory_order],
        mode="trilinear",
        align_corners=False,
    ).squeeze(0)
    return resized.permute(0, *[spatial.index(axis) + 1 for axis in range(1, 4)]).contiguous()


def resample_to_spacing(
    volume: torch.Tensor, spacing: Sequence[float], target_spacing: Sequence[float]
) -> torch.Tensor:
    """Trilinear resampling of `(C, H, W, D)` from voxel `spacing` to `target_spacing` (mm); the field of view in mm
    is kept, so the shape becomes `resampled_shape(...)`."""
    return resize_volume(volume, resampled_shape(volume.shape[1:], spacing, target_spacing))


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """The spatial shape `(H, W, D)` a volume of `shape` voxels of `spacing` mm takes at `target_spacing` mm:
    round(H * spacing_H / target_H), ..., at least one voxel per axis."""
    return tuple(max(1, round(n * old / new)) for n, old, new in zip(shape, spacing, target_spacing))


def blank_reason(volume: torch.Tensor) -> str | None:
    """Why a raw `(C, H, W, D)` volume holds no image (every voxel of a channel NaN/±Inf, or all one value), or
    `None` when each channel has at least two distinct finite values."""
    for channel, voxels in enumerate(volume):
        which = f"channel {channel} of it" if len(volume) > 1 else "it"
        # Reduce in memory order (NIfTI voxels arrive in Fortran order; a strided reduction is several times slower),
        # and look for non-finite voxels only when the extremes say there are some (NaN and ±Inf reach them).
        order = sorted(range(voxels.dim()), key=lambda axis: -voxels.stride(axis))
        voxels = voxels.permute(order)
        low, high = voxels.aminmax()
        if not (torch.isfinite(low) and torch.isfinite(high)):
            finite = torch.isfinite(voxels)
            if not finite.any():
                return f"every voxel of {which} is NaN or ±Inf"
            low, high = voxels[finite].aminmax()
        if low == high:
            return f"every finite voxel of {which} is {float(low):g} (a constant image)"
    return None


def crop_or_pad(volume: torch.Tensor, size: Sequence[int], fill: torch.Tensor) -> torch.Tensor:
    """Centre-crop or pad `(C, H, W, D)` to `(C, *size)`; padding takes `fill`, shape `(C, 1, 1, 1)`."""
    pads = []
    for current, wanted in zip(reversed(volume.shape[1:]), reversed(tuple(size))):
        before = (wanted - current) // 2
        pads += [before, wanted - current - before]  # negative pads crop
    return F.pad(volume - fill, pads) + fill


def _percentiles(volume: torch.Tensor, percentiles: Sequence[float]) -> torch.Tensor:
    """Per-channel percentiles of `(C, H, W, D)`, shape `(len(percentiles), C, 1, 1, 1)`."""
    flat = volume.flatten(1)
    stride = math.ceil(flat.shape[1] * flat.shape[0] / _MAX_QUANTILE_ELEMENTS)
    q = torch.tensor([p / 100 for p in percentiles], dtype=flat.dtype, device=flat.device)
    return torch.quantile(flat[:, ::stride], q, dim=1)[..., None, None, None]


def normalize_intensity(
    volume: torch.Tensor, normalization: str, clip_percentiles: Sequence[float] | None
) -> torch.Tensor:
    """Robust per-channel intensity scale of a finite `(C, H, W, D)` volume.

    Each channel is first clipped to its `clip_percentiles` (low, high), computed over the whole volume, so that a
    few hot or dark voxels do not set the scale. Then:

    - `"minmax"`: the clipped range maps to [0, 1] (the background of an MRI, at or below the low percentile, is 0);
    - `"zscore"`: zero mean and unit variance over the foreground, the voxels above the low clip value (all voxels
      when there are none), so that the amount of air around the head does not change the scale;
    - `"none"`: clipping only.

    A constant channel becomes 0 in both scales, never NaN.
    """
    if clip_percentiles is not None:
        low, high = _percentiles(volume, clip_percentiles)
        volume = volume.clamp(min=low, max=high)
    else:
        low = volume.amin(dim=(1, 2, 3), keepdim=True)
        high = volume.amax(dim=(1, 2, 3), keepdim=True)
    if normalization == "minmax":
        return (volume - low) / (high - low).clamp_min(1e-8) * (high > low)
    if normalization == "zscore":
        foreground = volume > low
        foreground = torch.where(foreground.flatten(1).any(1)[:, None, None, None], foreground, True)
        count = foreground.sum(dim=(1, 2, 3), keepdim=True)
        mean = (volume * foreground).sum(dim=(1, 2, 3), keepdim=True) / count
        std = (((volume - mean) * foreground).square().sum(dim=(1, 2, 3), keepdim=True) / count).sqrt()
        return (volume - mean) / std.clamp_min(1e-8) * (std > 0)
    return volume


# ---------------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------------


def stack_volumes(volumes_per_sample: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack the volumes of a batch whose samples hold different numbers of volumes.

    Args:
        volumes_per_sample: one tensor `(n_i, C, H, W, D)` per sample; `n_i` may be 0 (a text-only sample), and an
            empty tensor of any shape with a leading 0 is accepted for it.

    Returns:
        `pixel_values` `(B, N, C, H, W, D)` with `N = max(n_i)` and zeros in the padded slots, `image_mask` `(B, N)`
        bool (True for a real volume), and `num_images_per_sample` `(B,)` int64.

    Raises:
        ValueError: naming the sample, if a sample is not `(n_i, C, H, W, D)` or its volumes differ in shape from an
            earlier sample's; or if no sample is 5-D, so the volume shape cannot be known.
    """
    reference = None  # (index, (C, H, W, D), dtype, device) of the first sample that has volumes
    for index, volumes in enumerate(volumes_per_sample):
        is_empty = volumes.ndim >= 1 and volumes.shape[0] == 0
        if volumes.ndim != 5 and not is_empty:
            raise ValueError(f"Sample {index}: expected volumes (n, C, H, W, D), got shape {tuple(volumes.shape)}.")
        if is_empty:
            continue
        if reference is None:
            reference = (index, tuple(volumes.shape[1:]), volumes.dtype, volumes.device)
        elif tuple(volumes.shape[1:]) != reference[1]:
            raise ValueError(
                f"Sample {index} has volumes of shape {tuple(volumes.shape[1:])} but sample {reference[0]} has "
                f"{reference[1]}; all volumes of a batch must be preprocessed to the same (C, H, W, D)."
            )
    if reference is None:  # no sample has a volume: the shape comes from an empty (0, C, H, W, D) tensor
        shaped = [volumes for volumes in volumes_per_sample if volumes.ndim == 5]
        if not shaped:
            raise ValueError(
                "Cannot stack a batch without volumes unless an empty sample is a (0, C, H, W, D) tensor."
            )
        reference = (0, tuple(shaped[0].shape[1:]), shaped[0].dtype, shaped[0].device)
    _, volume_shape, dtype, device = reference

    counts = torch.tensor([len(volumes) for volumes in volumes_per_sample], dtype=torch.long)
    max_count = int(counts.max())
    # On the volumes' device: volumes preprocessed on a GPU are batched there.
    pixel_values = torch.zeros((len(volumes_per_sample), max_count, *volume_shape), dtype=dtype, device=device)
    for index, volumes in enumerate(volumes_per_sample):
        if len(volumes):
            pixel_values[index, : len(volumes)] = volumes
    image_mask = torch.arange(max_count)[None, :] < counts[:, None]
    return {"pixel_values": pixel_values, "image_mask": image_mask, "num_images_per_sample": counts}


def _is_volume(item: Any) -> bool:
    return not isinstance(item, (list, tuple))


def _as_batch(images: Any) -> list[list[VolumeInput]]:
    """Nest `images` as a batch of samples: one volume → one sample; a list of volumes → one sample; a list of
    lists → a batch (an empty inner list is a sample without volumes; `[]` is one sample without volumes)."""
    if _is_volume(images):
        return [[images]]
    if all(_is_volume(item) for item in images):
        return [list(images)]
    if not all(isinstance(item, (list, tuple)) and all(map(_is_volume, item)) for item in images):
        raise ValueError(
            "`images` must be one volume, a list of volumes (one sample), or a list with one list of volumes per "
            "sample; got a mixture or deeper nesting."
        )
    return [list(sample) for sample in images]


# ---------------------------------------------------------------------------------------------------------------------
# The image processor
# ---------------------------------------------------------------------------------------------------------------------


class UmbrellaVolumeKwargs(ImagesKwargs, total=False):
    """The options of [`UmbrellaVolumeProcessor`], so that processors and `from_pretrained(..., **kwargs)` pass them."""

    volume_size: int | list[int] | tuple[int, ...]
    volume_channels: int
    voxel_spacing: float | list[float] | tuple[float, ...] | None
    normalization: str
    clip_percentiles: list[float] | tuple[float, ...] | None
    allow_blank_volumes: bool
    frames: str | int


def _mm(values: Sequence[float]) -> str:
    return " × ".join(f"{v:g}" for v in values)


def _as_spacing(value: float | Sequence[float] | None) -> list[float] | None:
    if value is None:
        return None
    spacing = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise ValueError(f"`voxel_spacing` must be three positive numbers of mm (H, W, D) or None, got {value}.")
    return spacing


def _as_percentiles(value: Sequence[float] | None) -> list[float] | None:
    if value is None:
        return None
    percentiles = [float(v) for v in value]
    if len(percentiles) != 2 or not 0 <= percentiles[0] < percentiles[1] <= 100:
        raise ValueError(f"`clip_percentiles` must be (low, high) with 0 <= low < high <= 100 or None, got {value}.")
    return percentiles


def _as_frames(value: str | int, volume_channels: int) -> str | int:
    if isinstance(value, str) and value in FRAME_POLICIES:
        policy = value
    elif isinstance(value, str) or isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(
            f"`frames` must be one of {FRAME_POLICIES} or an int frame index (negative counts from the last frame, "
            f"as in Python), got {value!r}; for example frames='mean', or frames=0 for the first frame."
        )
    else:
        policy = operator.index(value)  # numpy ints too; saved as a plain int
    if policy == "channels" and volume_channels == 1:
        raise ValueError(
            "`frames='channels'` makes each frame of a 4-D file a channel, so it needs `volume_channels` equal to "
            "the files' frame count, not 1; set volume_channels (and the model's), or choose frames='mean', 'first' "
            "or an index."
        )
    return policy


class UmbrellaVolumeProcessor(BaseImageProcessor):
    r"""
    Turns 3-D volumes (NIfTI paths, folders of one DICOM series, nibabel images, arrays, tensors) into the
    `pixel_values (B, N, C, H, W, D)`, `image_mask (B, N)` and `num_images_per_sample (B,)` that
    [`UmbrellaLlavaForConditionalGeneration`] takes.

    Files, DICOM series (from their ImageOrientationPatient, ImagePositionPatient and PixelSpacing) and nibabel images
    are reoriented to RAS+ from their affine, so the same brain stored LAS, or with its axes permuted, gives the same
    tensor (rotations are snapped to the closest axes; nothing is interpolated for orientation). Arrays and tensors are taken as RAS+ already.

    Args:
        volume_size (`tuple[int, int, int]`, defaults to `(96, 96, 96)`):
            Spatial size (H, W, D) of a preprocessed volume, in voxels; the model config's `volume_size`.
        volume_channels (`int`, defaults to 1):
            Channels C per volume; NIfTI files give 1, arrays and tensors `(C, H, W, D)` must match.
        voxel_spacing (`tuple[float, float, float]`, *optional*):
            If set, volumes are resampled to this spacing in mm (from the affine of a file) and centre-cropped or
            padded (with each channel's minimum) to `volume_size`, so one voxel is always the same size in mm. If
            `None`, the whole field of view is resized to `volume_size`, whatever its size in mm.
        normalization (`str`, defaults to `"zscore"`):
            `"zscore"` (zero mean, unit variance over the foreground), `"minmax"` (to [0, 1]) or `"none"`, after
            clipping; see `normalize_intensity`.
        clip_percentiles (`tuple[float, float]`, *optional*, defaults to `(0.5, 99.5)`):
            Per-channel percentiles to clip to before normalising; `None` clips nothing (min-max then uses the
            extremes).
        allow_blank_volumes (`bool`, defaults to `False`):
            A blank volume (a channel all NaN/±Inf or all one value, or a file whose field of view resampling to
            `voxel_spacing` collapses to one voxel along an axis) holds no image, so by default it is an
            [`InvalidVolumeError`] naming it. With `True` it is preprocessed as zeros, with a warning naming it.
        frames (`str` or `int`, defaults to `"error"`):
            What a file (or nibabel image) of several frames `(H, W, D, T)` becomes, such as an fMRI run, a diffusion
            series or a multi-echo scan: `"error"` refuses it, naming the file; `"mean"` takes the mean over the
            frames; `"first"` frame 0; an int takes that frame, negative counting from the last as in Python (-1 is
            the last; out of range is an error naming the file and its frame count); `"channels"` makes the T frames
            the channels of one volume, for `volume_channels == T` (another T is an error naming both). Frames are
            chosen on the decoded voxels, before the one reorientation to RAS+ that every frame shares. 3-D files and
            4-D files of one frame are one volume whatever this says; arrays and tensors are unaffected.

    NaN and ±Inf voxels are set to 0 before anything else: the output is always finite.

    Raises:
        ValueError: at construction, for a bad option (`frames` not a policy or an int, or `"channels"` with
            `volume_channels=1`).
        InvalidVolumeError: at call time, naming the volume, for a volume with another channel count than
            `volume_channels`, a blank volume (unless allowed), a resampled size over `MAX_VOXELS`, or anything
            `load_volume` refuses.
        OSError (FileNotFoundError, IsADirectoryError, PermissionError): naming the path it cannot read.
    """

    model_input_names = ["pixel_values", "image_mask", "num_images_per_sample"]
    valid_kwargs = UmbrellaVolumeKwargs
    # Bump when the output for the same options changes, so that caches of preprocessed volumes are not reused.
    # 2: the file's intensity scaling is applied after the resize (the same volume up to float rounding).
    preprocessing_revision = 2

    def __init__(
        self,
        volume_size: int | Sequence[int] = (96, 96, 96),
        volume_channels: int = 1,
        voxel_spacing: float | Sequence[float] | None = None,
        normalization: str = DEFAULT_NORMALIZATION,
        clip_percentiles: Sequence[float] | None = (0.5, 99.5),
        allow_blank_volumes: bool = False,
        frames: str | int = "error",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.volume_size = list(_as_triple(volume_size, "volume_size"))
        if int(volume_channels) < 1:
            raise ValueError(f"`volume_channels` must be at least 1, got {volume_channels}.")
        self.volume_channels = int(volume_channels)
        self.voxel_spacing = _as_spacing(voxel_spacing)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"`normalization` must be one of {NORMALIZATIONS}, got {normalization!r}.")
        self.normalization = normalization
        self.clip_percentiles = _as_percentiles(clip_percentiles)
        self.allow_blank_volumes = bool(allow_blank_volumes)
        self.frames = _as_frames(frames, self.volume_channels)

    def preprocessing_options(self) -> dict[str, Any]:
        """The options that decide the output of `preprocess_volume`, JSON-serialisable."""
        return {
            "volume_size": self.volume_size,
            "volume_channels": self.volume_channels,
            "voxel_spacing": self.voxel_spacing,
            "normalization": self.normalization,
            "clip_percentiles": self.clip_percentiles,
            "allow_blank_volumes": self.allow_blank_volumes,
            "frames": self.frames,
        }

    def preprocess_volume(self, source: VolumeInput, device: str | torch.device | None = None) -> torch.Tensor:
        """Preprocess one volume.

        Args:
            source: a NIfTI path, a nibabel image, or an array / tensor `(H, W, D)` or `(C, H, W, D)` (see
                `load_raw_volume`).
            device: where the arithmetic runs (the CPU by default). The file is decoded on the CPU; its stored
                values go to `device`, where conversion, RAS+ reordering, resizing and normalisation run, and the
                result stays there. A GPU gives the CPU's volume within float tolerance (tested on MNI brains).

        Returns:
            float32 tensor `(C, H, W, D)` = `(volume_channels, *volume_size)` on `device`, finite, normalised.
        """
        name = describe_source(source)
        raw = load_raw_volume(source, self.frames, self.volume_channels)
        # Scaled after resizing (fewer voxels; the scaling is affine, so it commutes with trilinear interpolation).
        volume, spacing = raw.to_volume("cpu" if device is None else device, scaled=False), raw.spacing
        if volume.shape[0] != self.volume_channels:
            raise InvalidVolumeError(
                f"{name} has {volume.shape[0]} channel(s) but this processor expects "
                f"volume_channels={self.volume_channels}; arrays and tensors are read channel-first (C, H, W, D), "
                "and a file gives one channel (or, with frames='channels', one per frame).",
                "wrong channels",
            )
        # Stored integers are checked as they are (a quarter of the bytes for uint8), floats once converted.
        blank = blank_reason(volume if raw.voxels.is_floating_point() else raw.voxels)
        if blank is not None:  # the message gives the file's own values
            blank = blank_reason(raw.apply_scaling(volume.clone()))
        if raw.may_hold_non_finite:
            volume = torch.nan_to_num_(volume, nan=0.0, posinf=0.0, neginf=0.0)
        if self.voxel_spacing is None:
            self._check_blank(name, blank)
            volume = raw.apply_scaling(resize_volume(volume, self.volume_size))
            return normalize_intensity(volume, self.normalization, self.clip_percentiles).contiguous()
        if spacing is not None:
            size = resampled_shape(volume.shape[1:], spacing, self.voxel_spacing)
            field_of_view = " × ".join(f"{n * mm:.3g}" for n, mm in zip(volume.shape[1:], spacing))
            if math.prod(size) > MAX_VOXELS:  # bounded before interpolate allocates it
                raise InvalidVolumeError(
                    f"{name}: resampling its {tuple(volume.shape[1:])} voxels of {_mm(spacing)} mm to voxel_spacing "
                    f"{_mm(self.voxel_spacing)} mm gives {size}, {_size_in_words(math.prod(size))}, more than "
                    f"MAX_VOXELS = {MAX_VOXELS:,}. A field of view of {field_of_view} mm is not a head: the header's "
                    "pixdim/affine is probably in micrometres or otherwise wrong; fix it.",
                    "too large",
                )
            if blank is None and min(size) < 2:
                blank = (
                    f"its field of view ({field_of_view} mm) is less than two voxels of voxel_spacing "
                    f"{_mm(self.voxel_spacing)} mm along an axis, so resampling collapses it to {size} (is the "
                    "header's pixdim in metres or otherwise wrong?)"
                )
            self._check_blank(name, blank)
            volume = resize_volume(volume, size)
        else:
            self._check_blank(name, blank)
        volume = normalize_intensity(raw.apply_scaling(volume), self.normalization, self.clip_percentiles)
        background = volume.amin(dim=(1, 2, 3), keepdim=True)
        return crop_or_pad(volume, self.volume_size, fill=background).contiguous()

    def _check_blank(self, name: str, reason: str | None) -> None:
        if reason is None:
            return
        if not self.allow_blank_volumes:
            raise InvalidVolumeError(
                f"{name} is blank: {reason}. It would train as an all-zero tensor. Fix or drop the file, or pass "
                "allow_blank_volumes=True to the volume processor to train on it as zeros.",
                "blank volume",
            )
        warnings.warn(f"{name} is blank: {reason}; it becomes zeros (allow_blank_volumes=True).", stacklevel=3)

    def preprocess(self, images: Any, return_tensors: str | None = None, **kwargs) -> BatchFeature:
        """Preprocess the volumes of a batch of samples.

        Args:
            images: a list with one list of volumes per sample (`[[t1, t2], [], [t1]]`; a sample may have none), or,
                for a single sample, one volume or a flat list of volumes. A volume is anything `preprocess_volume`
                takes.
            return_tensors: `"pt"` (or `None`: torch tensors too), or `"np"`.
            **kwargs: per-call overrides of the constructor's options (`volume_size`, `voxel_spacing`, ...).

        Returns:
            [`BatchFeature`] with `pixel_values` `(B, N, C, H, W, D)` float32, N the most volumes in a sample and
            zeros in the padded slots; `image_mask` `(B, N)` bool; `num_images_per_sample` `(B,)` int64.
        """
        processor = self._with_overrides(kwargs)
        empty = torch.zeros((0, processor.volume_channels, *processor.volume_size))
        volumes_per_sample = [
            torch.stack([processor.preprocess_volume(source) for source in sample]) if sample else empty
            for sample in _as_batch(images)
        ]
        return BatchFeature(data=stack_volumes(volumes_per_sample), tensor_type=return_tensors)

    def _with_overrides(self, kwargs: dict[str, Any]) -> "UmbrellaVolumeProcessor":
        overrides = {key: value for key, value in kwargs.items() if value is not None}
        unknown = sorted(set(overrides) - set(self.preprocessing_options()))
        if unknown:
            raise ValueError(
                f"{type(self).__name__} does not take {unknown}; its options are {list(self.preprocessing_options())}."
            )
        return type(self)(**{**self.preprocessing_options(), **overrides}) if overrides else self


__all__ = ["InvalidVolumeError", "UmbrellaVolumeProcessor", "stack_volumes", "load_volume", "load_image", "load_nifti"]
