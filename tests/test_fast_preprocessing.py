"""The fast volume path: `.nii.gz` files decoded in one pass as stored (then scaled, after resizing), preprocessing on
another device (a GPU) equal to the CPU's, a batch's files decoded in threads, and a GPU preprocessing run refused
where DataLoader worker processes would have to use the GPU."""

import numpy as np
import pytest
import torch
from test_train_script import run_inputs, train_args  # noqa: F401  (a fixture)

from umbrella_llava.data import ConversationDataset, UmbrellaCollator
from umbrella_llava.image_processing_umbrella_llava import (
    UmbrellaVolumeProcessor,
    load_raw_volume,
    load_volume,
    normalize_intensity,
    resize_volume,
)
from umbrella_llava.processing_umbrella_llava import UmbrellaLlavaProcessor
from umbrella_llava.training import build_trainer, parse_arguments

nib = pytest.importorskip("nibabel")

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where one is lent)")
LAS = np.diag([-2.0, 2.0, 2.0, 1.0])


def brain(mni_t1_path) -> np.ndarray:
    """The MNI152 T1 template's voxels (a real brain), as float64."""
    return nib.load(mni_t1_path).get_fdata()


def write_stored(tmp_path, data: np.ndarray, dtype: str, slope: float = 1.0, inter: float = 0.0, name: str = "scan"):
    """`data` stored as `dtype` with the header's intensity scaling, LAS-oriented, as `.nii.gz`."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.dtype(dtype))
    stored = np.round((data - inter) / slope) if np.dtype(dtype).kind in "iu" else (data - inter) / slope
    image = nib.Nifti1Image(stored.astype(dtype), LAS, header)
    image.header.set_slope_inter(slope, inter)
    path = tmp_path / f"{name}.nii.gz"
    image.to_filename(path)
    return path


def nibabel_reference(path) -> torch.Tensor:
    """What nibabel itself reads: its scaled float voxels, brought to RAS+ by nibabel's own reorientation."""
    return torch.from_numpy(np.ascontiguousarray(nib.as_closest_canonical(nib.load(path)).get_fdata())).float()[None]


@pytest.mark.parametrize(
    "dtype, slope, inter",
    [("uint8", 1 / 255, 0.0), ("<i2", 2.5, -10.0), (">i2", 0.5, 3.0), ("<f4", 1.0, 0.0), ("<f8", 2.0, 1.0)],
    ids=["uint8-scaled", "int16-scaled", "int16-big-endian", "float32", "float64-scaled"],
)
def test_one_pass_decoding_reads_what_nibabel_reads(mni_t1_path, tmp_path, dtype, slope, inter):
    data = brain(mni_t1_path) * (254 / brain(mni_t1_path).max()) * slope + inter  # in the stored type's range
    path = write_stored(tmp_path, data, dtype, slope, inter)
    raw = load_raw_volume(path)
    assert raw.voxels.dtype == torch.from_numpy(np.zeros(1, np.dtype(dtype).newbyteorder("="))).dtype
    assert (raw.slope, raw.inter) == pytest.approx((slope, inter))
    volume, spacing = load_volume(path)
    assert spacing == (2.0, 2.0, 2.0)
    torch.testing.assert_close(volume, nibabel_reference(path), rtol=1e-6, atol=1e-4)


def test_averaged_frames_are_scaled_before_the_mean(mni_t1_path, tmp_path):
    data = brain(mni_t1_path)
    frames = np.stack([data, 0.5 * data, 0.25 * data], axis=-1)
    path = write_stored(tmp_path, frames, "<i2", slope=0.5, inter=2.0)
    volume, _ = load_volume(path, frames="mean")
    canonical = nib.as_closest_canonical(nib.load(path)).get_fdata().mean(axis=-1)
    expected = torch.from_numpy(np.ascontiguousarray(canonical)).float()[None]
    torch.testing.assert_close(volume, expected, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("normalization", ["none", "minmax"])
def test_scaling_after_the_resize_gives_the_volume_scaled_before_it(mni_t1_path, tmp_path, normalization):
    """The file's scaling is applied to the resized volume (fewer voxels): trilinear weights sum to one, so it is the
    volume that scaling every stored voxel first gives."""
    path = write_stored(tmp_path, brain(mni_t1_path) * 3.0 + 100.0, "<i2", slope=3.0, inter=100.0)
    processor = UmbrellaVolumeProcessor(volume_size=(40, 48, 36), normalization=normalization)
    expected = normalize_intensity(
        resize_volume(nibabel_reference(path), (40, 48, 36)), normalization, processor.clip_percentiles
    )
    torch.testing.assert_close(processor.preprocess_volume(path), expected, rtol=1e-5, atol=1e-4)


def test_preprocessing_on_the_cpu_by_name_is_the_default(mni_t1_path):
    processor = UmbrellaVolumeProcessor(volume_size=(32, 32, 32))
    torch.testing.assert_close(
        processor.preprocess_volume(mni_t1_path, device="cpu"), processor.preprocess_volume(mni_t1_path)
    )


@needs_gpu
@pytest.mark.parametrize("volume_size, voxel_spacing", [((96, 96, 96), None), ((64, 64, 64), 3.0)])
def test_gpu_preprocessing_equals_the_cpu_on_real_brains(mni_volume_paths, tmp_path, volume_size, voxel_spacing):
    las = write_stored(tmp_path, brain(mni_volume_paths["T1"]) * 2.0, "<i2", slope=2.0, name="las")
    processor = UmbrellaVolumeProcessor(volume_size=volume_size, voxel_spacing=voxel_spacing)
    for path in [*mni_volume_paths.values(), las]:
        on_gpu = processor.preprocess_volume(path, device="cuda")
        assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32
        torch.testing.assert_close(on_gpu.cpu(), processor.preprocess_volume(path), rtol=1e-4, atol=1e-5)


@needs_gpu
def test_a_dataset_preprocessed_on_the_gpu_batches_what_the_cpu_batches(run_inputs):  # noqa: F811
    processor = UmbrellaLlavaProcessor.from_pretrained(run_inputs["checkpoint"])
    on_cpu = ConversationDataset(run_inputs["train"], processor)
    on_gpu = ConversationDataset(run_inputs["train"], processor, preprocess_device="cuda")
    items = range(4)
    expected = UmbrellaCollator(processor)([on_cpu[i] for i in items])
    batch = UmbrellaCollator(processor, decode_threads=4)([on_gpu[i] for i in items])
    assert batch["pixel_values"].device.type == "cuda"
    torch.testing.assert_close(batch["pixel_values"].cpu(), expected["pixel_values"], rtol=1e-4, atol=1e-5)
    assert torch.equal(batch["image_mask"], expected["image_mask"])


def test_decode_threads_give_the_batch_one_thread_gives(run_inputs):  # noqa: F811
    processor = UmbrellaLlavaProcessor.from_pretrained(run_inputs["checkpoint"])
    dataset = ConversationDataset(run_inputs["train"], processor)
    items = range(len(dataset))  # text-only, one- and two-volume records
    expected = UmbrellaCollator(processor)([dataset[i] for i in items])
    batch = UmbrellaCollator(processor, decode_threads=3)([dataset[i] for i in items])
    assert batch.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(batch[key], value), key
    with pytest.raises(ValueError, match="decode_threads"):
        UmbrellaCollator(processor, decode_threads=0)


def test_gpu_preprocessing_in_worker_processes_is_refused_before_training(run_inputs, tmp_path):  # noqa: F811
    args = train_args(run_inputs, tmp_path, "--preprocess_device", "cuda", "--dataloader_num_workers", "2")
    with pytest.raises(ValueError, match=r"--dataloader_num_workers 0 \(not 2\) and --decode_threads"):
        build_trainer(*parse_arguments(args))


def test_a_dataset_read_in_a_worker_process_refuses_a_gpu(run_inputs, monkeypatch):  # noqa: F811
    import umbrella_llava.data.dataset as dataset_module

    processor = UmbrellaLlavaProcessor.from_pretrained(run_inputs["checkpoint"])
    dataset = ConversationDataset(run_inputs["train"], processor, preprocess_device="cuda")
    monkeypatch.setattr(dataset_module, "get_worker_info", lambda: object())  # as inside a DataLoader worker
    with pytest.raises(RuntimeError, match="dataloader_num_workers=0"):
        dataset[0]["pixel_values"]
