"""The on-disk cache of preprocessed volumes: same tensor on a hit, no decoding, and a changed file is noticed."""

import os
import time

import numpy as np
import pytest
import torch

from umbrella_llava.image_processing_umbrella_llava import UmbrellaVolumeProcessor
from umbrella_llava.volume_cache import VolumeCache, file_fingerprint

nib = pytest.importorskip("nibabel")


class CountingProcessor(UmbrellaVolumeProcessor):
    """Counts how often a volume is really decoded and preprocessed."""

    calls = 0

    def preprocess_volume(self, source):
        type(self).calls += 1
        return super().preprocess_volume(source)


@pytest.fixture
def processor():
    CountingProcessor.calls = 0
    return CountingProcessor(volume_size=(32, 32, 32))


@pytest.fixture
def scan(mni_t1_path, tmp_path):
    """A copy of the MNI152 T1 that the test may rewrite."""
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(mni_t1_path.read_bytes())
    return path


def test_hit_returns_the_same_tensor_without_decoding_and_much_faster(processor, scan, tmp_path):
    cache = VolumeCache(tmp_path / "cache")

    start = time.perf_counter()
    first = cache.get(scan, processor)
    miss_seconds = time.perf_counter() - start
    hit_seconds = []
    for _ in range(3):
        start = time.perf_counter()
        again = cache.get(str(scan), processor)
        hit_seconds.append(time.perf_counter() - start)

    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(first, processor.preprocess_volume(scan), rtol=0, atol=0)
    assert CountingProcessor.calls == 2  # the miss and the reference above; the hits decoded nothing
    assert min(hit_seconds) < miss_seconds / 5, (miss_seconds, hit_seconds)
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".pt"]  # no temporary file left behind


def test_a_rewritten_file_is_preprocessed_again(processor, scan, tmp_path):
    cache = VolumeCache(tmp_path / "cache")
    before = cache.get(scan, processor)

    image = nib.load(scan)  # the same header, the brain mirrored front to back
    nib.Nifti1Image(np.ascontiguousarray(image.get_fdata()[:, ::-1]), image.affine, image.header).to_filename(scan)
    after = cache.get(scan, processor)

    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, processor.preprocess_volume(scan), rtol=0, atol=0)


def test_fingerprint_sees_new_content_behind_the_same_size_and_mtime(tmp_path):
    # A copy tool can keep the size and the modification time. The last bytes of a .nii.gz are the gzip CRC-32 of
    # all voxels and its first bytes hold the NIfTI header, so hashing both edges still tells the files apart.
    content = np.random.default_rng(0).bytes(1_000_000)
    for name, edited in (("tail.nii.gz", content[:-5] + b"CRC32"), ("head.nii.gz", b"sizeof" + content[6:])):
        original, changed = tmp_path / "original.nii.gz", tmp_path / name
        original.write_bytes(content)
        changed.write_bytes(edited)
        for path in (original, changed):
            os.utime(path, ns=(10**18, 10**18))
        before, after = file_fingerprint(original), file_fingerprint(changed)
        assert (before["size"], before["mtime_ns"]) == (after["size"], after["mtime_ns"])
        assert before["edges"] != after["edges"]


@pytest.mark.parametrize(
    "option", [{"volume_size": (24, 24, 24)}, {"normalization": "minmax"}, {"clip_percentiles": (2, 98)}]
)
def test_each_option_alone_is_another_entry(processor, scan, tmp_path, option):
    """One option changed at a time (same shape for all but volume_size): the entry of the other options is not
    handed out."""
    cache = VolumeCache(tmp_path / "cache")
    cache.get(scan, processor)
    other_processor = CountingProcessor(**{**processor.preprocessing_options(), **option})
    other = cache.get(scan, other_processor)
    assert CountingProcessor.calls == 2
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    torch.testing.assert_close(other, other_processor.preprocess_volume(scan))


def test_a_damaged_entry_is_replaced(processor, scan, tmp_path):
    cache = VolumeCache(tmp_path / "cache")
    expected = cache.get(scan, processor)
    cache.entry_path(scan, processor).write_bytes(b"not a tensor")
    torch.testing.assert_close(cache.get(scan, processor), expected, rtol=0, atol=0)
    torch.testing.assert_close(cache.get(scan, processor), expected, rtol=0, atol=0)


def test_an_entry_whose_voxels_changed_on_disk_fails_its_checksum_and_is_recomputed(processor, scan, tmp_path):
    """Damage that still loads (a voxel's bytes changed, the entry's checksum not): the checksum catches it."""
    cache = VolumeCache(tmp_path / "cache")
    expected = cache.get(scan, processor)
    entry = cache.entry_path(scan, processor)
    stored = torch.load(entry, weights_only=True)
    stored["volume"].view(-1)[1000] += 0.5
    torch.save(stored, entry)
    with pytest.warns(UserWarning, match="fails its checksum"):
        torch.testing.assert_close(cache.get(scan, processor), expected, rtol=0, atol=0)
    torch.testing.assert_close(cache.get(scan, processor), expected, rtol=0, atol=0)


def test_errors_are_not_cached(processor, tmp_path):
    cache = VolumeCache(tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        cache.get(tmp_path / "missing.nii.gz", processor)
    bad = tmp_path / "bad.nii"
    bad.write_text("not a volume")
    with pytest.raises(ValueError, match="bad.nii"):
        cache.get(bad, processor)
    assert list((tmp_path / "cache").iterdir()) == []
