"""The mid-plane preview: orientation of the planes, a valid PNG, and the command line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from umbrella_llava.image_processing_umbrella_llava import UmbrellaVolumeProcessor
from umbrella_llava.preview import PLANES, main, mid_planes, save_preview

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk."""
    header = path.read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE and header[12:16] == b"IHDR"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_planes_put_each_direction_on_its_labelled_edge():
    volume = torch.zeros(9, 9, 9)
    volume[4:, 4:, 4:] = 1.0  # a block in the Right, Anterior, Superior corner, through the mid-planes
    sagittal, coronal, axial = mid_planes(volume)
    directions = {name: edges for name, _, edges in PLANES}

    # With origin="lower", the last column is the right edge and the last row the top edge of the panel.
    assert directions["sagittal"][1::2] == ("A", "S") and sagittal[-1, -1] == 1 and sagittal[0, 0] == 0
    assert directions["coronal"][1::2] == ("R", "S") and coronal[-1, -1] == 1 and coronal[0, 0] == 0
    assert directions["axial"][1::2] == ("R", "A") and axial[-1, -1] == 1 and axial[0, 0] == 0


def test_save_preview_of_a_path_writes_a_png(mni_t1_path, tmp_path):
    png = Path(save_preview(mni_t1_path, tmp_path / "preview.png", UmbrellaVolumeProcessor(volume_size=(48, 56, 48))))
    width, height = png_size(png)
    assert 600 <= width <= 2000 and 200 <= height <= 1500
    assert 10_000 < png.stat().st_size < 2_000_000


def test_save_preview_of_a_multichannel_tensor_has_a_row_per_channel(tmp_path):
    one = Path(save_preview(torch.rand(1, 16, 16, 16), tmp_path / "one.png", title="random"))
    two = Path(save_preview(torch.rand(2, 16, 16, 16), tmp_path / "two.png"))
    assert png_size(two)[1] > 1.5 * png_size(one)[1]


def test_main_writes_the_png(mni_t1_path, tmp_path, capsys):
    output = tmp_path / "cli.png"
    assert main([str(mni_t1_path), "--output", str(output), "--volume_size", "32", "32", "32"]) == 0
    assert png_size(output)[0] > 0 and str(output) in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        main([str(tmp_path / "nope.nii.gz")])


@pytest.mark.slow
def test_command_line(mni_t1_path, tmp_path):
    output = tmp_path / "cli.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "umbrella_llava.preview", str(mni_t1_path), "--output", str(output)]
    command += ["--volume_size", "40", "48", "40", "--voxel_spacing", "4", "4", "4"]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert png_size(output)[0] > 0
