"""A PNG of the three orthogonal mid-planes of a preprocessed volume, to check orientation and intensity at a glance.

From Python, `save_preview("sub-01_T1w.nii.gz", "preview.png")`; from the command line,
`umbrella-preview sub-01_T1w.nii.gz --output preview.png` (or `python -m umbrella_llava.preview ...`).

The volume is drawn as the model sees it: after `UmbrellaVolumeProcessor` (RAS+ voxel order, resized, normalised).
Each panel's edges carry the patient's directions (R/L, A/P, S/I), and the colour bar shows the intensity range.
"""

import argparse
import os
from collections.abc import Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .image_processing_umbrella_llava import DEFAULT_NORMALIZATION, NORMALIZATIONS, UmbrellaVolumeProcessor

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


def _label_edges(ax, directions: Sequence[str]) -> None:
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
            _label_edges(ax, directions)
        figure.colorbar(image, ax=list(row), shrink=0.8, label="intensity")
    subtitle = f"shape {tuple(volume.shape)}, range [{float(volume.min()):.3g}, {float(volume.max()):.3g}]"
    figure.suptitle(f"{title}\n{subtitle}" if title else subtitle, fontsize=10)
    return figure


def save_preview(
    volume_or_path,
    png_path: str | os.PathLike,
    image_processor: UmbrellaVolumeProcessor | None = None,
    title: str | None = None,
) -> str:
    """Write the three mid-planes of a preprocessed volume to `png_path`.

    Args:
        volume_or_path: a NIfTI path or a nibabel image, preprocessed with `image_processor` (a default
            `UmbrellaVolumeProcessor()` when `None`); or an array / tensor `(C, H, W, D)` or `(H, W, D)`, drawn as it
            is when `image_processor` is `None` (it is taken as already preprocessed), else preprocessed too.
        png_path: the PNG to write; its folder must exist.
        image_processor: the processor whose output to show.
        title: a line above the planes; the file name when `None` and a path is given.

    Returns:
        `png_path` as a string.
    """
    is_array = isinstance(volume_or_path, torch.Tensor) or hasattr(volume_or_path, "__array_interface__")
    if is_array and image_processor is None:
        volume = torch.as_tensor(volume_or_path)
    else:
        volume = (image_processor or UmbrellaVolumeProcessor()).preprocess_volume(volume_or_path)
    if title is None and isinstance(volume_or_path, (str, os.PathLike)):
        title = os.path.basename(os.fspath(volume_or_path))
    figure = render_preview(volume, title=title)
    FigureCanvasAgg(figure).print_png(os.fspath(png_path))
    return os.fspath(png_path)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="umbrella-preview",
        description="Write a PNG of the sagittal, coronal and axial mid-planes of a NIfTI volume after preprocessing.",
    )
    parser.add_argument("path", help="a .nii or .nii.gz file")
    parser.add_argument("--output", "-o", help="the PNG to write (default: <volume name>_preview.png here)")
    parser.add_argument("--volume_size", type=int, nargs=3, default=[96, 96, 96], metavar=("H", "W", "D"))
    parser.add_argument("--voxel_spacing", type=float, nargs=3, default=None, metavar=("H", "W", "D"), help="mm")
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default=DEFAULT_NORMALIZATION)
    parser.add_argument("--title", default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: `umbrella-preview PATH --output out.png [--volume_size H W D] [--voxel_spacing ...]`."""
    args = _parse_args(argv)
    name = os.path.basename(args.path)
    output = args.output or f"{name.removesuffix('.gz').removesuffix('.nii')}_preview.png"
    processor = UmbrellaVolumeProcessor(
        volume_size=args.volume_size, voxel_spacing=args.voxel_spacing, normalization=args.normalization
    )
    save_preview(args.path, output, image_processor=processor, title=args.title)
    print(f"Wrote {output}")
    return 0


__all__ = ["save_preview", "render_preview", "mid_planes", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
