"""An on-disk cache of preprocessed volumes, so that later epochs do not decode and resample `.nii.gz` files again.

An entry is keyed by the file (resolved path, size, modification time in ns, and its content: for a `.gz` the first
and last 64 KiB, which hold the NIfTI header and the gzip CRC-32 of all the voxels; for any other file, such as an
uncompressed `.nii`, a SHA-256 of all of it, since an edit in place that keeps the size and the modification time
leaves its edges alike; for a DICOM series folder, the same for each of its files, by name: DICOM slices are
uncompressed files, or compressed per frame without a checksum, so each is hashed whole, like a `.nii`, and a slice
added, removed or edited is seen) and by everything that decides the preprocessing (the image processor's options and its
`preprocessing_revision`). Change either and the entry is simply never found again; old entries stay on disk until
the folder is deleted.

What the content hash costs (one core, file in the page cache): 44 ms for a 64 MiB `.nii` (256³ float32), against
0.4 ms for a hit without it and 940 ms to decode and preprocess the same file to 96³, so a hit stays about 20 times
cheaper than a miss. A `.nii.gz` hit is unchanged.

Each entry holds the volume and a CRC-32 of its bytes, checked on every read (0.1 ms at 96³ with python-isal, the
`fast` extra; 0.7 ms with zlib; the SHA-256 it replaced took 2 ms, two thirds of a hit): an entry damaged on disk is
recomputed, with a warning, instead of coming back as a wrong volume. A CRC-32 is what zip and PNG use against
damage; entries are no place for an attacker's bytes in any case (`torch.load(weights_only=True)` reads no code). Entries are written to a temporary file and
moved into place with `os.replace`, so DataLoader workers that preprocess the same volume at once never read a
half-written entry; they are read back with `torch.load(weights_only=True)`. A temporary file whose writer was
killed is removed when a `VolumeCache` is next opened on the folder (at once when its process, on this host, is
gone; after a day otherwise).
"""

import hashlib
import json
import logging
import os
import pickle
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .dicom_series import series_files

try:  # python-isal (the `fast` extra) computes the same CRC-32 as zlib, about six times as fast
    from isal.isal_zlib import crc32 as _crc32
except ImportError:
    from zlib import crc32 as _crc32

logger = logging.getLogger(__name__)

_EDGE_BYTES = 64 * 1024
# Bump when the layout of an entry changes, so that entries of the old layout are not read as the new one.
# 3: a CRC-32 of the volume in place of a SHA-256.
_ENTRY_FORMAT = 3
# A temporary file older than this is taken as left by a killed writer even when its process cannot be checked.
_STALE_TEMPORARY_SECONDS = 24 * 3600
# Keys of `to_dict()` that do not change the preprocessed tensor.
_IRRELEVANT_KEYS = ("auto_map", "processor_class", "_processor_class")


def file_fingerprint(path: Path) -> dict[str, Any]:
    """An identity of a file's content: resolved path, size, mtime (ns), and for a `.gz` file a hash of its first and
    last 64 KiB (`edges`: header and gzip CRC-32), for any other a hash of all of it (`content`). For a folder (a
    DICOM series), the path and the fingerprint of each file the series reader may read (`files`, sorted by name).

    Raises:
        FileNotFoundError: naming the path, if it does not exist.
    """
    if path.is_dir():
        return {"path": str(path), "files": [file_fingerprint(Path(name)) for name in series_files(path)]}
    stat = path.stat()
    fingerprint = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    with open(path, "rb") as file:
        if path.suffix != ".gz":
            digest = hashlib.sha256()
            while chunk := file.read(1 << 20):
                digest.update(chunk)
            return {**fingerprint, "content": digest.hexdigest()}
        digest = hashlib.sha256(file.read(_EDGE_BYTES))
        file.seek(max(stat.st_size - _EDGE_BYTES, 0))
        digest.update(file.read(_EDGE_BYTES))
    return {**fingerprint, "edges": digest.hexdigest()}


def preprocessing_fingerprint(image_processor: Any) -> dict[str, Any]:
    """Everything about `image_processor` that decides its output: its serialised options and its revision."""
    options = {key: value for key, value in image_processor.to_dict().items() if key not in _IRRELEVANT_KEYS}
    return {"options": options, "revision": getattr(image_processor, "preprocessing_revision", None)}


class VolumeCache:
    """Preprocessed volumes `(C, H, W, D)` stored as `.pt` files under `cache_dir`, one per (file, preprocessing).

    Args:
        cache_dir: folder for the entries; created if missing. Safe to share between processes.
    """

    def __init__(self, cache_dir: str | os.PathLike):
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temporaries()

    def entry_path(self, source_path: str | os.PathLike, image_processor: Any) -> Path:
        """The file that holds (or will hold) the preprocessed `source_path`."""
        key = {
            "file": file_fingerprint(Path(source_path).resolve()),
            **preprocessing_fingerprint(image_processor),
            "format": _ENTRY_FORMAT,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.cache_dir / f"{digest}.pt"

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files of writers that were killed: at once when the writer was a process of this
        host that is gone, otherwise once older than a day (a writer on another host cannot be asked).

        Returns:
            The files removed.
        """
        removed = []
        host = socket.gethostname()
        for temporary in self.cache_dir.glob(".*.tmp"):
            try:
                _, pid, rest = temporary.name[1:].split(".", 2)
                writer_host = rest.rsplit(".", 2)[0]
                age = time.time() - temporary.stat().st_mtime
            except (ValueError, OSError):
                continue
            if (writer_host == host and pid.isdigit() and not _process_alive(int(pid))) or (
                age > _STALE_TEMPORARY_SECONDS
            ):
                temporary.unlink(missing_ok=True)
                removed.append(temporary)
        if removed:
            logger.info("Removed %d temporary files left by killed writers in %s", len(removed), self.cache_dir)
        return removed

    def get(self, source_path: str | os.PathLike, image_processor: Any) -> torch.Tensor:
        """`image_processor.preprocess_volume(source_path)`, read from the cache when this file was already
        preprocessed with the same options.

        Returns:
            float32 tensor `(C, H, W, D)`.

        Raises:
            Whatever `preprocess_volume` raises (FileNotFoundError, ValueError naming the file); errors are not
            cached.
        """
        entry = self.entry_path(source_path, image_processor)
        volume = self._read(entry, source_path)
        if volume is not None:
            return volume
        volume = image_processor.preprocess_volume(source_path)
        self._write(entry, volume)
        return volume

    def _read(self, entry: Path, source_path: str | os.PathLike) -> torch.Tensor | None:
        """The volume of `entry`, or `None` when there is none or it is damaged (which warns)."""
        try:
            stored = torch.load(entry, weights_only=True)
        except FileNotFoundError:
            return None
        except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as error:
            problem = f"does not load ({type(error).__name__}: {error})"
        else:
            if isinstance(stored, dict) and stored.get("crc32") == _checksum(stored.get("volume")):
                return stored["volume"]
            problem = "fails its checksum"
        warnings.warn(
            f"Volume cache entry {entry} (of {source_path}) {problem}; the disk may be damaged. Preprocessing the "
            "volume again.",
            stacklevel=3,
        )
        return None

    def _write(self, entry: Path, volume: torch.Tensor) -> None:
        volume = volume.contiguous()
        descriptor, temporary = tempfile.mkstemp(
            dir=self.cache_dir, prefix=f".{entry.stem}.{os.getpid()}.{socket.gethostname()}.", suffix=".tmp"
        )
        try:
            with os.fdopen(descriptor, "wb") as file:
                torch.save({"volume": volume, "crc32": _checksum(volume)}, file)
            os.replace(temporary, entry)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _checksum(volume: Any) -> int | None:
    """CRC-32 of the volume's bytes (the same value from python-isal and zlib)."""
    if not isinstance(volume, torch.Tensor):
        return None
    return _crc32(volume.contiguous().view(torch.uint8).numpy())


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


__all__ = ["VolumeCache", "file_fingerprint", "preprocessing_fingerprint"]
