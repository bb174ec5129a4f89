"""A picture of a relevance map: the three orthogonal planes through its maximum, the map over the scan, labelled
with the patient's directions as `umbrella-preview` labels them."""

import os

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .preview import PLANES, label_edges


def quoted_for_title(text: str, width: int = 48) -> str:
    """`text` quoted for a figure title, cut to `width` characters, with unprintable characters escaped."""
    text = text.replace("\ufffd", "?")  # bytes a tokenizer could not decode
    text = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def planes_through(volume: torch.Tensor, point: tuple[int, int, int]) -> list[torch.Tensor]:
    """The sagittal, coronal and axial planes of `volume (H, W, D)` (RAS+) through voxel `point`, each ready for
    `imshow(origin="lower")` as `preview.mid_planes` lays them out."""
    return [volume.select(axis, point[axis]).T for _, axis, _ in PLANES]


def render_relevance(volume: torch.Tensor, relevance: torch.Tensor, title: str | None = None) -> Figure:
    """A figure of `relevance (H, W, D)` over the scan `volume (C, H, W, D)` or `(H, W, D)` (its first channel), both
    on the model's grid (RAS+): the planes through the map's maximum, the scan in grey, the map in a heat colour
    where it exceeds a tenth of its maximum, and a cross at the maximum."""
    volume = volume.detach().float().cpu()
    scan = volume[0] if volume.ndim == 4 else volume
    relevance = relevance.detach().float().cpu()
    if relevance.shape != scan.shape:
        raise ValueError(f"The map {tuple(relevance.shape)} and the scan {tuple(scan.shape)} differ in shape.")
    peak = tuple(int(i) for i in torch.unravel_index(relevance.argmax(), relevance.shape))
    top = float(relevance.max())
    figure = Figure(figsize=(10, 3.8), layout="constrained")
    axes = figure.subplots(1, 3)
    low, high = float(scan.min()), float(scan.max())
    heat = None
    for ax, scan_plane, map_plane, (name, axis, directions) in zip(
        axes, planes_through(scan, peak), planes_through(relevance, peak), PLANES
    ):
        ax.imshow(scan_plane.numpy(), cmap="gray", origin="lower", vmin=low, vmax=high, aspect="equal")
        shown = map_plane.masked_fill(map_plane < 0.1 * top, float("nan")) if top > 0 else map_plane
        heat = ax.imshow(shown.numpy(), cmap="hot", origin="lower", vmin=0, vmax=top or 1, alpha=0.6, aspect="equal")
        column, row = [peak[a] for a in range(3) if a != axis]
        ax.plot([column], [row], marker="+", color="cyan", markersize=12, markeredgewidth=1.5)
        ax.set_title(f"{name}, slice {peak[axis]} of {scan.shape[axis]}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        label_edges(ax, directions)
    figure.colorbar(heat, ax=list(axes), shrink=0.8, label="relevance")
    subtitle = f"planes through the maximum, voxel {peak} of {tuple(scan.shape)} (RAS+, the model's grid)"
    figure.suptitle(f"{title}\n{subtitle}" if title else subtitle, fontsize=10)
    return figure


def save_relevance_figure(
    volume: torch.Tensor, relevance: torch.Tensor, png_path: str | os.PathLike, title: str | None = None
) -> str:
    """Write `render_relevance(volume, relevance, title)` to `png_path`; returns it as a string."""
    FigureCanvasAgg(render_relevance(volume, relevance, title)).print_png(os.fspath(png_path))
    return os.fspath(png_path)


__all__ = ["planes_through", "quoted_for_title", "render_relevance", "save_relevance_figure"]
