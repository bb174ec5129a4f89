"""Between the scan's own voxel grid and the grid the model sees: a map made on `pixel_values` (RAS+, resized or
resampled, see `UmbrellaVolumeProcessor.preprocess_volume`) written back in the scan's grid and affine, so that it
overlays the original file in FSLeyes, ITK-SNAP or nilearn.

The processor's steps are geometric maps of voxel indices, so they compose into one affine: the affine of the
model's grid in the scan's world (`grid_affine`). nibabel's `resample_from_to` then samples a map from that grid into
the scan's (trilinear), which undoes the reorientation, the resize (or resampling and crop/pad) in one step.
"""

import os

import numpy as np
import torch

from .image_processing_umbrella_llava import UmbrellaVolumeProcessor, load_image, resampled_shape


def _index_scaling(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The voxel-index map of `resize_volume` (trilinear, `align_corners=False`, field of view kept) from a grid of
    `new` voxels back to one of `old`: index j of the new grid sits at (j + 0.5) * old / new - 0.5 of the old."""
    scale = old / new
    affine = np.diag([*scale, 1.0])
    affine[:3, 3] = 0.5 * scale - 0.5
    return affine


def grid_affine(image, image_processor: UmbrellaVolumeProcessor) -> np.ndarray:
    """The `(4, 4)` affine of the model's voxel grid for `image` (a nibabel image), in the scan's world (mm): voxel
    `(i, j, k)` of `image_processor.preprocess_volume(image)` lies at `grid_affine @ (i, j, k, 1)`.

    Follows `preprocess_volume` step by step: reorientation to RAS+ (nibabel's `io_orientation` and
    `inv_ornt_aff`, the same orientation `load_volume` applies), then either the resize of the field of view to
    `volume_size`, or the resampling to `voxel_spacing` and the centre crop or pad to `volume_size`.
    """
    import nibabel as nib

    shape = tuple(int(n) for n in image.shape[:3])
    orientation = nib.orientations.io_orientation(image.affine)
    ras_order = orientation[:, 0].argsort()
    ras_affine = image.affine @ nib.orientations.inv_ornt_aff(orientation, shape)
    ras_shape = np.array([shape[axis] for axis in ras_order], dtype=float)
    size = np.array(image_processor.volume_size, dtype=float)
    if image_processor.voxel_spacing is None:
        return ras_affine @ _index_scaling(ras_shape, size)
    spacing = nib.affines.voxel_sizes(image.affine)[ras_order]
    resampled = np.array(resampled_shape(ras_shape.astype(int), spacing, image_processor.voxel_spacing), dtype=float)
    crop_or_pad = np.eye(4)
    crop_or_pad[:3, 3] = -((size - resampled) // 2)  # crop_or_pad puts (wanted - current) // 2 voxels before
    return ras_affine @ _index_scaling(ras_shape, resampled) @ crop_or_pad


def to_scan_space(values: torch.Tensor, source, image_processor: UmbrellaVolumeProcessor):
    """A map on the model's grid `values (H, W, D)` (`volume_size`, RAS+) as a NIfTI image in the grid and affine of
    the scan `source` (a NIfTI path, a DICOM series folder, or a nibabel image), sampled trilinearly; zero outside
    the model's field of view.

    Raises:
        ImportError: without scipy, which nibabel's resampling uses (`pip install umbrella_llava[explain]`).
        TypeError: for an array or tensor source, which carries no geometry to return to.
    """
    import nibabel as nib

    try:
        from nibabel.processing import resample_from_to
    except ImportError as error:  # nibabel.processing needs scipy
        raise ImportError(
            "Writing a map in the scan's own grid needs scipy: `pip install 'umbrella_llava[explain]'`."
        ) from error
    if isinstance(source, (str, os.PathLike)):
        image = load_image(source)
    elif isinstance(source, nib.spatialimages.SpatialImage):
        image = source
    else:
        raise TypeError(
            f"A {type(source).__name__} has no affine, so a map cannot be returned to its grid; give the NIfTI file "
            "or DICOM folder."
        )
    values = values.detach().float().cpu().numpy()
    on_grid = nib.Nifti1Image(values, grid_affine(image, image_processor))
    return resample_from_to(on_grid, (tuple(image.shape[:3]), image.affine), order=1, mode="constant", cval=0.0)


__all__ = ["grid_affine", "to_scan_space"]
