"""A PNG of the three orthogonal mid-planes of a preprocessed volume, to check orientation and intensity at a glance.

From Python, `save_preview("sub-01_T1w.nii.gz", "preview.png")`; from the command line,
`umbrella-preview sub-01_T1w.nii.gz --output preview.png` (or `python -m umbrella_llava.preview ...`). A folder
holding one DICOM series is drawn the same way (`umbrella-preview dicom/sub-01_t1/`).

The volume is drawn as the model sees it: after `UmbrellaVolumeProcessor` (RAS+ voxel order, resized, normalised).
Each panel's edges carry the patient's directions (R/L, A/P, S/I), and the colour bar shows the intensity range. For a
4-D file, the title says what the processor's `frames` policy made of its frames (`--frames` on the command line).
"""

import argparse
import os
from collections.abc import Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .image_processing_umbrella_llava import (
    DEFAULT_NORMALIZATION,
    FRAME_POLICIES,
    NORMALIZATIONS,
    UmbrellaVolumeProcessor,
    load_nifti,
)

# Each plane of a RAS+ volume (H: L→R, W: P→A, D: I→S): the axis it cuts, and the directions at the
# (left, right, bottom, top) edges of the panel, drawn with the first remaining axis horizontal and `origin="lower"`.
PLANES = (
    ("sagittal", 0, ("P", "A", "I", "S")),
    ("coronal", 1, ("L", "R", "I", "S")),
    ("axial", 2, ("L", "R", "P", "A")),
)


def mid_planes(volume: torch.Tensor) -> list[torch.Tensor]:
    """The sagittal, coronal and axial mid-planes of one channel `(H, W, D)`, each `(rows, columns)` ready for
    `imshow(origin="lower")`: sagittal `(D, W)`, coronal `(D, H)`, axial `(W, H)`."""
    return [volume.select(axis, volume.shape[axis] // 2).T for _, axis, _ in PLANES]


def label_edges(ax, directions: Sequence[str]) -> None:
    """Write the patient's directions `(left, right, bottom, top)` at the edges of a panel `ax` (see `PLANES`)."""
    left, right, bottom, top = directions
    style = {"color": "yellow", "fontsize": 11, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)


def render_preview(volume: torch.Tensor, title: str | None = None) -> Figure:
    """A figure with one row per channel of a preprocessed volume `(C, H, W, D)` (or `(H, W, D)`), RAS+ order."""
    volume = volume.detach().float().cpu()
    if volume.ndim == 3:
        volume = volume.unsqueeze(0)
    if volume.ndim != 4:
        raise ValueError(f"Expected a volume (C, H, W, D) or (H, W, D), got shape {tuple(volume.shape)}.")
    channels = volume.shape[0]
    figure = Figure(figsize=(10, 3.4 * channels + 0.6), layout="constrained")
    axes = figure.subplots(channels, 3, squeeze=False)
    for channel, row in zip(volume, axes):
        low, high = float(channel.min()), float(channel.max())
        for ax, plane, (name, _, directions) in zip(row, mid_planes(channel), PLANES):
            image = ax.imshow(plane.numpy(), cmap="gray", origin="lower", vmin=low, vmax=high, aspect="equal")
            ax.set_title(f"{name} (voxels {tuple(plane.shape[::-1])})", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            label_edges(ax, directions)
        figure.colorbar(image, ax=list(row), shrink=0.8, label="intensity")
    subtitle = f"shape {tuple(volume.shape)}, range [{float(volume.min()):.3g}, {float(volume.max()):.3g}]"
    figure.suptitle(f"{title}\n{subtitle}" if title else subtitle, fontsize=10)
    return figure


def frames_label(source, image_processor: UmbrellaVolumeProcessor) -> str | None:
    """What `image_processor.frames` makes of `source`, a path or nibabel image of several frames, in words for the
    title (e.g. "frames='mean': the mean of its 2 frames"); `None` for a 3-D file, a DICOM series (always one 3-D
    volume), an array or a tensor."""
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        return None
    if isinstance(source, (str, os.PathLike)):
        source = load_nifti(source)  # the header only
    shape = tuple(source.shape) if hasattr(source, "dataobj") else ()
    if len(shape) != 4 or shape[3] == 1:
        return None
    count, frames = shape[3], image_processor.frames
    if frames == "mean":
        applied = f"the mean of its {count} frames"
    elif frames == "channels":
        applied = f"its {count} frames as {count} channels"
    else:
        applied = f"frame {0 if frames == 'first' else frames % count} of its {count} (counting from 0)"
    return f"frames={frames!r}: {applied}"


def save_preview(
    volume_or_path,
    png_path: str | os.PathLike,
    image_processor: UmbrellaVolumeProcessor | None = None,
    title: str | None = None,
) -> str:
    """Write the three mid-planes of a preprocessed volume to `png_path`.

    Args:
        volume_or_path: a NIfTI path, a DICOM series folder or a nibabel image, preprocessed with `image_processor` (a default
            `UmbrellaVolumeProcessor()` when `None`); or an array / tensor `(C, H, W, D)` or `(H, W, D)`, drawn as it
            is when `image_processor` is `None` (it is taken as already preprocessed), else preprocessed too.
        png_path: the PNG to write; its folder must exist.
        image_processor: the processor whose output to show.
        title: a line above the planes; the file name when `None` and a path is given. For a file of several
            frames, a line saying what the processor's `frames` made of them follows (see `frames_label`).

    Returns:
        `png_path` as a string.
    """
    is_array = isinstance(volume_or_path, torch.Tensor) or hasattr(volume_or_path, "__array_interface__")
    frames = None
    if is_array and image_processor is None:
        volume = torch.as_tensor(volume_or_path)
    else:
        image_processor = image_processor or UmbrellaVolumeProcessor()
        volume = image_processor.preprocess_volume(volume_or_path)
        frames = frames_label(volume_or_path, image_processor)
    if title is None and isinstance(volume_or_path, (str, os.PathLike)):
        title = os.path.basename(os.path.normpath(volume_or_path))
    title = "\n".join(line for line in (title, frames) if line) or None
    figure = render_preview(volume, title=title)
    FigureCanvasAgg(figure).print_png(os.fspath(png_path))
    return os.fspath(png_path)


def frames_argument(value: str) -> str | int:
    """A `--frames` flag's value: one of FRAME_POLICIES, or an int frame index (umbrella-preview, umbrella-check-data)."""
    if value in FRAME_POLICIES:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"choose one of {', '.join(FRAME_POLICIES)} or an int frame index, not {value!r}"
        ) from None


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="umbrella-preview",
        description="Write a PNG of the sagittal, coronal and axial mid-planes of a NIfTI volume or a DICOM series "
        "after preprocessing.",
    )
    parser.add_argument("path", help="a .nii or .nii.gz file, or a folder holding one DICOM series")
    parser.add_argument("--output", "-o", help="the PNG to write (default: <volume name>_preview.png here)")
    parser.add_argument("--volume_size", type=int, nargs=3, default=[96, 96, 96], metavar=("H", "W", "D"))
    parser.add_argument("--voxel_spacing", type=float, nargs=3, default=None, metavar=("H", "W", "D"), help="mm")
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default=DEFAULT_NORMALIZATION)
    parser.add_argument(
        "--frames",
        type=frames_argument,
        default="error",
        help=f"what the frames of a 4-D file become: one of {', '.join(FRAME_POLICIES)}, or a frame index (-1: the "
        "last); 'channels' also sets the channel count to the frame count. Default: error",
    )
    parser.add_argument("--title", default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: `umbrella-preview PATH --output out.png [--volume_size H W D] [--voxel_spacing ...]`."""
    args = _parse_args(argv)
    name = os.path.basename(os.path.normpath(args.path))
    output = args.output or f"{name.removesuffix('.gz').removesuffix('.nii')}_preview.png"
    volume_channels = 1
    if args.frames == "channels":  # one channel per frame: as many channels as this file has frames
        if os.path.isdir(args.path):
            raise SystemExit(f"umbrella-preview: {args.path} is a DICOM series folder, one 3-D volume without frames.")
        shape = load_nifti(args.path).shape
        if len(shape) != 4 or shape[3] == 1:
            raise SystemExit(f"umbrella-preview: {args.path} has shape {shape}, no frames to make channels of.")
        volume_channels = shape[3]
    processor = UmbrellaVolumeProcessor(
        volume_size=args.volume_size,
        voxel_spacing=args.voxel_spacing,
        normalization=args.normalization,
        volume_channels=volume_channels,
        frames=args.frames,
    )
    save_preview(args.path, output, image_processor=processor, title=args.title)
    frames = frames_label(args.path, processor)
    print(f"Wrote {output}" + (f" ({frames})" if frames else ""))
    return 0


__all__ = [
    "PLANES",
    "label_edges",
    "save_preview",
    "render_preview",
    "mid_planes",
    "frames_argument",
    "frames_label",
    "main",
]

if __name__ == "__main__":
    raise SystemExit(main())
