"""`umbrella-explain` on a saved model: the answer, a map per scan in the scan's own grid and affine, and a picture."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from umbrella_llava.explain_command import main

pytest.importorskip("captum")
pytest.importorskip("scipy")


@pytest.fixture
def saved_model(volume_sensitive_model, tiny_processor, tmp_path):
    folder = tmp_path / "model"
    volume_sensitive_model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    return folder


def test_explain_writes_the_answer_and_a_map_per_scan_in_its_own_grid(saved_model, mni_volume_paths, tmp_path):
    t1 = nib.load(mni_volume_paths["T1"])
    las = tmp_path / "t1_las.nii.gz"  # stored right to left: the map must come back in this grid, not RAS
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = t1.shape[0] - 1
    nib.Nifti1Image(np.asarray(t1.dataobj)[::-1].copy(), t1.affine @ flip).to_filename(las)
    out = tmp_path / "out"
    args = ["--model", str(saved_model), "--volume", str(las), "--volume", str(mni_volume_paths["GM"])]
    args += ["--question", "Which scan is the grey-matter map?", "--output_dir", str(out), "--n_steps", "4"]
    assert main(args) == 0

    answer = (out / "answer.txt").read_text().strip()
    assert answer and json.loads((out / "explanation.json").read_text())["answer"] == answer
    for index, scan in enumerate([las, mni_volume_paths["GM"]]):
        relevance, original = nib.load(out / f"relevance_{index}.nii.gz"), nib.load(scan)
        assert relevance.shape == original.shape[:3] and np.allclose(relevance.affine, original.affine)
        assert np.asarray(relevance.dataobj).max() > 0
        png = (out / f"relevance_{index}.png").read_bytes()
        assert png.startswith(b"\x89PNG")

    # The map of the LAS file is the RAS file's map mirrored: the same world positions.
    ras_out = tmp_path / "ras"
    main([*args[:3], str(mni_volume_paths["T1"]), *args[4:-4], "--output_dir", str(ras_out), "--n_steps", "4"])
    in_las = np.asarray(nib.load(out / "relevance_0.nii.gz").dataobj)
    in_ras = np.asarray(nib.load(ras_out / "relevance_0.nii.gz").dataobj)
    assert np.allclose(in_las[::-1], in_ras, rtol=1e-3, atol=1e-6 * in_ras.max())
    assert not torch.equal(torch.from_numpy(in_las.copy()), torch.from_numpy(in_ras))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where one is lent)")
def test_explain_on_a_gpu_writes_the_maps_it_writes_on_the_cpu(saved_model, mni_volume_paths, tmp_path):
    args = ["--model", str(saved_model), "--volume", str(mni_volume_paths["T1"]), "--question", "Which scan is this?"]
    for device in ("cpu", "cuda"):
        assert main([*args, "--output_dir", str(tmp_path / device), "--device", device]) == 0
    on_cpu, on_gpu = (np.asarray(nib.load(tmp_path / d / "relevance_0.nii.gz").dataobj) for d in ("cpu", "cuda"))
    assert (tmp_path / "cuda" / "answer.txt").read_text() == (tmp_path / "cpu" / "answer.txt").read_text()
    assert np.allclose(on_gpu, on_cpu, rtol=1e-2, atol=1e-3 * np.abs(on_cpu).max())
