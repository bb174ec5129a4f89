"""Which DICOM series reader to build on: `python -m benchmarks.dicom_readers [--repeats 5]`.

nilearn's MNI152 T1 template (2 mm, 99×117×95 voxels, a real brain) is written as DICOM series with pydicom
(`umbrella_llava.dicom_writer`: int16 with a rescale slope and intercept) in three layouts: an axial stack (LPS, the
usual scanner order), a sagittal stack, and a sagittal stack rotated 20° about the L-R axis (oblique). Each candidate
reads each series back, with its own geometry, into voxels and a RAS affine; both are brought to nibabel's closest
canonical (RAS+) layout and compared with the NIfTI the series was written from:

- voxel error: the largest absolute difference of any voxel (the int16 quantisation alone is at most half the
  rescale slope, 1.5e-5 here);
- affine error: the largest absolute difference of any affine entry, in mm;
- read time: the median over `--repeats` rounds of reading the folder into voxels and affine in memory, including
  whatever files the reader writes; the readers run interleaved (each once per round, in rotating order), and
  "× SimpleITK" is the median over rounds of each one's time over SimpleITK's in the same round.

Candidates, each only if it installs: SimpleITK (`ImageSeriesReader` over `GetGDCMSeriesFileNames`), dcm2niix (the
pip package's binary, writing a NIfTI to a temporary folder), dicom2nifti (`dicom_series_to_nifti`), highdicom
(`get_volume_from_series` over pydicom datasets). Beside them, the package's own `load_volume(folder)` is timed: it reads
every header first to refuse a series that is not one volume, then reads with SimpleITK.
"""

import argparse
import functools
import glob
import importlib.metadata
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from umbrella_llava.dicom_writer import oblique_affine, write_dicom_series
from umbrella_llava.image_processing_umbrella_llava import load_volume

from .common import format_table, interleaved_timings, paired_ratio

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
Reader = Callable[[Path], tuple[np.ndarray, np.ndarray]]


def read_simpleitk(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    voxels = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)  # ITK's (z, y, x) → (x, y, z)
    affine = np.eye(4)
    affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return np.asarray(voxels, dtype=np.float32), _LPS_TO_RAS @ affine


def read_dcm2niix(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    with tempfile.TemporaryDirectory() as output:
        subprocess.run(
            [shutil.which("dcm2niix") or "dcm2niix", "-z", "n", "-b", "n", "-f", "volume", "-o", output, str(folder)],
            check=True,
            capture_output=True,
        )
        paths = glob.glob(os.path.join(output, "*.nii"))
        if len(paths) != 1:  # dcm2niix splits a series it cannot make one volume of, and says so only on stdout
            raise ValueError(f"dcm2niix wrote {len(paths)} NIfTI files for one series")
        (path,) = paths
        image = nib.load(path)
        return image.get_fdata(dtype=np.float32), image.affine


def read_dicom2nifti(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import dicom2nifti

    image = dicom2nifti.convert_dicom.dicom_series_to_nifti(str(folder), None, reorient_nifti=False)["NII"]
    return image.get_fdata(dtype=np.float32), image.affine


def read_highdicom(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import highdicom
    import pydicom

    datasets = [pydicom.dcmread(path) for path in sorted(folder.iterdir())]
    volume = highdicom.get_volume_from_series(datasets, dtype=np.float32)
    # highdicom's array is (slices, rows, columns) and its affine maps those indices to LPS mm.
    return np.asarray(volume.array), _LPS_TO_RAS @ volume.affine


READERS: dict[str, tuple[str, Reader]] = {
    "SimpleITK": ("SimpleITK", read_simpleitk),
    "dcm2niix": ("dcm2niix", read_dcm2niix),
    "dicom2nifti": ("dicom2nifti", read_dicom2nifti),
    "highdicom": ("highdicom", read_highdicom),
}


def available(module: str) -> str | None:
    """The installed version of `module` (a Python package, or the dcm2niix binary), or `None`."""
    if module == "dcm2niix":
        if shutil.which("dcm2niix") is None:
            return None
        banner = subprocess.run(["dcm2niix", "-v"], capture_output=True, text=True).stdout
        return banner.strip().splitlines()[-1] if banner.strip() else "installed"
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def errors(voxels: np.ndarray, affine: np.ndarray, reference: nib.Nifti1Image) -> tuple[float, float]:
    """(largest voxel error, largest affine error in mm) of a reader's output against `reference`, both in RAS+."""
    read = nib.as_closest_canonical(nib.Nifti1Image(voxels, affine))
    expected = nib.as_closest_canonical(reference)
    if read.shape != expected.shape:
        return float("inf"), float("inf")
    voxel_error = np.abs(read.get_fdata(dtype=np.float32) - expected.get_fdata(dtype=np.float32)).max()
    return float(voxel_error), float(np.abs(read.affine - expected.affine).max())


def write_series(image: nib.Nifti1Image, root: Path) -> dict[str, tuple[Path, nib.Nifti1Image | None]]:
    """Every series of the table under `root`: its folder, and the NIfTI it must equal (`None` for a damaged one)."""
    from pydicom.uid import RLELossless

    oblique = nib.Nifti1Image(np.asanyarray(image.dataobj), oblique_affine(image, 20.0, axis=0))
    layouts = {
        "axial": (image, ("L", "P", "S"), None),
        "sagittal": (image, ("P", "I", "R"), None),
        "oblique sagittal (20°)": (oblique, ("P", "I", "R"), None),
        "axial, RLE lossless": (image, ("L", "P", "S"), RLELossless),
        "axial, slice 40 missing": (image, ("L", "P", "S"), None),
    }
    series = {}
    for index, (layout, (source, axcodes, syntax)) in enumerate(layouts.items()):
        folder = root / f"series_{index}"
        paths = write_dicom_series(source, folder, axcodes=axcodes, transfer_syntax_uid=syntax)
        if "missing" in layout:
            paths[40].unlink()
            source = None
        series[layout] = (folder, source)
    return series


def bench_dicom_readers(repeats: int = 5) -> list[dict]:
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=2)
    image = nib.Nifti1Image(template.get_fdata(dtype=np.float32), template.affine)
    versions = {name: available(module) for name, (module, _) in READERS.items()}
    readers = {name: reader for name, (_, reader) in READERS.items() if versions[name] is not None}
    rows = [{"reader": name, "note": "not installed"} for name, version in versions.items() if version is None]
    with tempfile.TemporaryDirectory() as root:
        for layout, (folder, source) in write_series(image, Path(root)).items():
            read = {}
            for name, reader in readers.items():
                row = {"reader": f"{name} {versions[name]}", "series": layout, "note": ""}
                rows.append(row)
                try:
                    voxels, affine = reader(folder)
                except Exception as error:  # a reader that refuses is a row of the table, not the end of the run
                    row["note"] = f"refused: {type(error).__name__}: {' '.join(str(error).split())}"[:110]
                    continue
                if source is None:
                    row["note"] = f"read, shape {voxels.shape}"
                    continue
                voxel_error, affine_error = errors(voxels, affine, source)
                row.update({"voxel error": voxel_error, "affine error (mm)": affine_error})
                read[row["reader"]] = (row, functools.partial(reader, folder))
            if not read:
                continue
            package = {"reader": "umbrella_llava load_volume", "series": layout}
            package["note"] = "header checks + SimpleITK + RAS+ order (its voxels are checked in tests/test_dicom.py)"
            rows.append(package)
            read[package["reader"]] = (package, functools.partial(load_volume, folder))
            # Interleaved, so that the machine's load falls on every reader alike; the ratio is to the first reader.
            times = interleaved_timings({name: call for name, (_, call) in read.items()}, repeats, warmup=0)
            baseline = next(iter(read))
            for name, (row, _) in read.items():
                row["read (ms)"] = 1000 * statistics.median(times[name])
                row["× SimpleITK"] = paired_ratio(times, name, baseline)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per reader and series (median reported)")
    args = parser.parse_args(argv)
    rows = bench_dicom_readers(args.repeats)
    columns = ["reader", "series", "voxel error", "affine error (mm)", "read (ms)", "× SimpleITK", "note"]
    print(format_table(rows, columns))
    return rows


if __name__ == "__main__":
    main()
