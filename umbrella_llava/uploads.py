"""Uploaded files → the scans a model reads: NIfTI files as they are, a `.zip` of one DICOM series unpacked (its size
checked before anything is written, no member leaving its folder) to the folder of its series. Used by the web app
(`app.py`); every refusal is an `UploadError` whose message names the file and says what to upload instead."""

import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

DEFAULT_MAX_UPLOAD_MB = 512
VOLUME_SUFFIXES = (".nii", ".nii.gz")
UPLOAD_HELP = "a NIfTI file (.nii, .nii.gz) or a .zip of one DICOM series"


class UploadError(ValueError):
    """An upload or question the page cannot answer; the message names the file and says what to do."""


def _megabytes(size: int) -> str:
    return f"{size / 2**20:,.1f} MB"


def _dicom_folder_of_zip(path: Path, name: str, workdir: Path, max_bytes: int) -> Path:
    """Unpack the zip `path` into a new folder of `workdir` and return the one folder holding its DICOM files.

    Raises:
        UploadError: for a damaged zip, one that unpacks to more than `max_bytes`, a member whose path leaves the
            folder, or no folder (or several folders) of DICOM files.
    """
    from .dicom_series import dicom_files

    target = Path(tempfile.mkdtemp(prefix="dicom_", dir=workdir))
    try:
        with zipfile.ZipFile(path) as archive:
            members = [info for info in archive.infolist() if not info.is_dir()]
            unpacked = sum(info.file_size for info in members)
            if unpacked > max_bytes:  # before anything is written: a zip bomb stays packed
                raise UploadError(
                    f"{name} unpacks to {_megabytes(unpacked)}, over the upload limit of {_megabytes(max_bytes)} "
                    "(umbrella-app --max_upload_mb)."
                )
            for info in members:
                destination = (target / info.filename).resolve()
                if not destination.is_relative_to(target.resolve()):
                    raise UploadError(
                        f"{name} holds {info.filename!r}, a path outside the zip's folder; not unpacked."
                    )
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source, open(destination, "wb") as copy:
                    copy.write(source.read())
    except zipfile.BadZipFile as error:
        raise UploadError(f"{name} is not a readable zip file ({error}); upload {UPLOAD_HELP}.") from None
    folders = sorted({Path(p).parent for p in target.rglob("*") if p.is_file()})
    series = [folder for folder in folders if "__MACOSX" not in folder.parts and dicom_files(folder)]
    if not series:
        raise UploadError(f"{name} holds no DICOM files (none is marked 'DICM'); upload {UPLOAD_HELP}.")
    if len(series) > 1:
        listed = ", ".join(f"{folder.relative_to(target).as_posix() or '.'}/" for folder in series)
        raise UploadError(
            f"{name} holds DICOM files in {len(series)} folders ({listed}); zip one series per file and upload each."
        )
    return series[0]


def scan_sources(
    paths: Sequence[str | os.PathLike], workdir: str | os.PathLike, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
) -> list[tuple[str, str]]:
    """The uploaded files as `(name shown, path the loader reads)`: a NIfTI file as it is, a zip unpacked into a
    folder of `workdir` (the folder of its one DICOM series).

    Raises:
        UploadError: for a file over `max_upload_mb`, a file that is neither NIfTI nor zip, or a zip that is not
            one DICOM series (see `_dicom_folder_of_zip`).
    """
    max_bytes = int(max_upload_mb * 2**20)
    sources = []
    for path in map(Path, paths):
        name = path.name
        size = path.stat().st_size
        if size > max_bytes:
            raise UploadError(
                f"{name} is {_megabytes(size)}, over the upload limit of {_megabytes(max_bytes)} (umbrella-app "
                "--max_upload_mb)."
            )
        if name.lower().endswith(VOLUME_SUFFIXES):
            sources.append((name, str(path)))
        elif name.lower().endswith(".zip"):
            sources.append((name, str(_dicom_folder_of_zip(path, name, Path(workdir), max_bytes))))
        else:
            raise UploadError(f"{name} is not a volume; upload {UPLOAD_HELP}.")
    return sources


__all__ = ["DEFAULT_MAX_UPLOAD_MB", "UPLOAD_HELP", "UploadError", "VOLUME_SUFFIXES", "scan_sources"]
