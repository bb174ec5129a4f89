"""An on-disk cache of preprocessed volumes, so that later epochs do not decode and resample `.nii.gz` files again.

An entry is keyed by the file (resolved path, size, modification time in ns, and the first and last 64 KiB, which
for a `.nii.gz` hold the NIfTI header and the gzip CRC-32 of all the voxels) and by everything that decides the
preprocessing (the image processor's options and its `preprocessing_revision`). Change either and the entry is simply
never found again; old entries stay on disk until the folder is deleted.

Entries are written to a temporary file and moved into place with `os.replace`, so DataLoader workers that preprocess
the same volume at once never read a half-written entry; they are read back with `torch.load(weights_only=True)`.
"""

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

_EDGE_BYTES = 64 * 1024
# Keys of `to_dict()` that do not change the preprocessed tensor.
_IRRELEVANT_KEYS = ("auto_map", "processor_class", "_processor_class")


def file_fingerprint(path: Path) -> dict[str, Any]:
    """A cheap identity of a file's content: resolved path, size, mtime (ns) and a hash of its first and last 64 KiB.

    Raises:
        FileNotFoundError: naming the path, if it does not exist.
    """
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        digest.update(file.read(_EDGE_BYTES))
        file.seek(max(stat.st_size - _EDGE_BYTES, 0))
        digest.update(file.read(_EDGE_BYTES))
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "edges": digest.hexdigest()}


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

    def entry_path(self, source_path: str | os.PathLike, image_processor: Any) -> Path:
        """The file that holds (or will hold) the preprocessed `source_path`."""
        key = {"file": file_fingerprint(Path(source_path).resolve()), **preprocessing_fingerprint(image_processor)}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.cache_dir / f"{digest}.pt"

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
        try:
            return torch.load(entry, weights_only=True)
        except (OSError, EOFError, RuntimeError, pickle.UnpicklingError):
            pass  # not cached yet, or damaged (e.g. the disk was full): preprocess again and replace it
        volume = image_processor.preprocess_volume(source_path)
        self._write(entry, volume)
        return volume

    def _write(self, entry: Path, volume: torch.Tensor) -> None:
        descriptor, temporary = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{entry.stem}.", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "wb") as file:
                torch.save(volume.contiguous(), file)
            os.replace(temporary, entry)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


__all__ = ["VolumeCache", "file_fingerprint", "preprocessing_fingerprint"]
