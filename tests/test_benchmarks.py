"""Smoke tests of the benchmarks in their quickest mode, so that they do not rot. No timing is asserted: only that
each benchmark runs and reports the expected fields with finite, positive numbers."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

# `benchmarks` is a folder of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROW_FIELDS = {"benchmark", "case", "metric", "value", "goal", "met", "ours_ms", "baseline_ms"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_rows(rows: list[dict], benchmark: str, count: int) -> None:
    assert len(rows) == count
    for row in rows:
        assert ROW_FIELDS <= set(row), row
        assert row["benchmark"] == benchmark
        assert math.isfinite(row["value"]) and row["value"] > 0, row
        for key in ("ours_ms", "baseline_ms"):
            assert row[key] is None or (math.isfinite(row[key]) and row[key] > 0), row


def test_handwritten_loop_computes_the_native_loss():
    from benchmarks.model_paths import check_same_loss

    native, loop = check_same_loss()
    assert native == pytest.approx(loop, rel=1e-5)


@pytest.mark.parametrize(
    "name, count", [("bench_stock_overhead", 1), ("bench_padding", 1), ("bench_handwritten_loop", 3)]
)
def test_model_path_benchmarks(name, count):
    from benchmarks import model_paths

    assert_rows(getattr(model_paths, name)(quick=True), name.removeprefix("bench_"), count)


def test_memory_point_reports_a_peak():
    from benchmarks.memory import measure_point

    point = measure_point(volumes=1, checkpointing=True, quick=True)
    assert point["peak_mib"] > 0 and point["before_mib"] > 0 and math.isfinite(point["step_peak_mib"])


@pytest.mark.slow
def test_memory_benchmark_in_subprocesses():
    from benchmarks.memory import bench_memory

    rows = bench_memory(quick=True)
    assert_rows(rows, "memory", 1)
    assert all(row["plain_step_peak_mib"] > 0 and row["checkpointed_step_peak_mib"] > 0 for row in rows)


@pytest.mark.slow
def test_data_benchmark():
    pytest.importorskip("monai")
    pytest.importorskip("nilearn")
    from benchmarks.data_pipeline import bench_data

    rows = bench_data(quick=True)
    assert_rows(rows, "data", 4)
    assert rows[0]["ours_volumes_per_s"] > 0 and rows[0]["monai_volumes_per_s"] > 0
    # The comparison runs the same operations on both sides, so the outputs agree to float32 rounding.
    assert rows[0]["largest_abs_difference"] < 1e-4, rows[0]


def test_runner_prints_a_table(capsys, tmp_path):
    from benchmarks.run import main

    report = main(["--quick", "--only", "padding", "--json", str(tmp_path / "out.json")])
    assert (tmp_path / "out.json").exists() and report["machine"]["torch"] == torch.__version__
    assert "| padding |" in capsys.readouterr().out


def test_gpu_script_tiny(tmp_path, capsys):
    from benchmarks.gpu import main

    report = main(["--tiny", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "gpu.json")])
    assert (tmp_path / "gpu.json").exists()
    cases = {row["case"]: row for row in report["results"]}
    # the fast path's fused-loss case needs liger-kernel on a GPU; its compiled cases run with aot_eager on a CPU
    assert set(cases) == {
        "native",
        "native_padded",
        "loop",
        "native_mixed",
        "loop_mixed",
        "compiled",
        "bf16",
        "bf16_compiled",
    }
    assert set(report["compiled_loss_checks"]) == {"compiled", "bf16_compiled"}
    for row in cases.values():
        for key in ("step_ms", "samples_per_s", "text_tokens_per_s", "vision_tokens_per_s", "model_tflops_per_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["case"], key)
    assert [row["volumes_per_sample"] for row in report["memory"]] == [1, 2, 4, 8, 1, 2, 4, 8]
    assert "| native |" in capsys.readouterr().out


def test_gpu_generation_script_tiny(tmp_path):
    from benchmarks.gpu_generation import main

    report = main(["--tiny", "--new-tokens", "4", "--repeats", "1", "--out", str(tmp_path / "generation.json")])
    assert json.loads((tmp_path / "generation.json").read_text())["decode"] == report["decode"]
    cases = [(row["batch"], row["case"]) for row in report["prefill"]]
    assert len(cases) == 6 and {batch for batch, _ in cases} == {1, 4}
    assert [row["case"] for row in report["decode"]["rows"]] == [
        "dynamic cache, eager",
        "static cache, compiled (fullgraph)",
    ]
    assert report["decode"]["token_agreement"] == 1.0  # the compiled decoding step gives the eager tokens
    assert all(row["new_tokens_per_s"] > 0 for row in report["decode"]["rows"])


@pytest.mark.slow
def test_engines_script_runs_umbrella_train_and_reads_its_run(tmp_path):
    from benchmarks.engines import main

    workdir = tmp_path / "engines"
    report = main(
        ["--tiny", "--use-cpu", "--engines", "ddp", "--max-steps", "2", "--workdir", str(workdir)]
        + ["--out", str(tmp_path / "engines.json")]
    )
    run = report["runs"]["ddp"]
    assert run["returncode"] == 0, run.get("log_tail")
    assert len(run["losses"]) == 2 and all(math.isfinite(loss) for loss in run["losses"])
    assert run["saved_folder_problems"] == [] and run["saved_weight_files"] == ["model.safetensors"]
    assert not run["adapter_only"]


@pytest.mark.slow
def test_learning_benchmark_reports_steps_and_held_out_accuracy_per_question_kind():
    pytest.importorskip("nilearn")
    from benchmarks.learning import bench_learning

    (row,) = bench_learning(quick=True)
    assert row["benchmark"] == "learning" and row["case"] == "defaults"
    assert row["value"] == ">25" or 0 < row["value"] <= 25, row
    for kind in ("map", "which_gm"):
        assert f"{kind} " in row["note"] and "chance" in row["note"], row


@pytest.mark.slow
def test_token_budget_benchmark_reports_tokens_learning_time_and_memory_per_merge():
    pytest.importorskip("nilearn")
    from benchmarks.token_budget import bench_token_budget

    rows = bench_token_budget(quick=True)
    assert_rows(rows, "token_budget", 4)
    assert [(row["merge"], row["merger"]) for row in rows] == [
        (1, "none"), (2, "average"), (2, "concat + MLP"), (4, "average")
    ]  # fmt: skip
    assert [row["tokens_per_volume"] for row in rows] == [64, 8, 8, 1]
    for row in rows:
        assert set(row["accuracy"]) == {"map", "which_gm"}, row
        if row["merger"] != "concat + MLP":
            assert row["step_peak_mib"] > 0 and row["ours_ms"] > 0, row


def test_lesion_diagnostics_find_the_lesion_on_the_answers_side():
    """The local task's lesion, read back through the package's processor from RAS and LAS files, lies on the side
    its answer names, and is darker at its core than the same voxels of healthy volumes."""
    pytest.importorskip("nilearn")
    from benchmarks.lesion_diagnostics import diagnose

    report = diagnose("local", count=2)
    assert report["side correct (RAS files, LAS files)"] == {"RAS": "2/2", "LAS": "2/2"}
    assert report["lesion core mean z"] < report["healthy mean z at the lesion core"]["min"]


@pytest.mark.slow
def test_lesion_diagnostics_stages_and_head_run(capsys):
    """The other two checks of `benchmarks.lesion_diagnostics` run from their commands and report what BENCHMARKS.md
    cites: the token contrast at every stage, and train / held-out accuracy of a head."""
    pytest.importorskip("nilearn")
    from benchmarks.lesion_diagnostics import main

    main(["stages", "--count", "2"])
    stages = json.loads(capsys.readouterr().out)
    assert set(stages) == {"task", "patches", "embedder", "tower", "projector"}
    assert all(0 <= stages[stage]["AUC"] <= 1 for stage in ("patches", "projector"))
    main(["head", "--count", "2", "--steps", "2", "--conv-embedding", "--readout", "hemisphere-max"])
    (step,) = json.loads(capsys.readouterr().out)["history"]
    assert step["step"] == 2 and set(step["held_out"]) == {"presence", "side"}


def test_pointing_game_of_a_map_on_the_lesion_is_one_and_elsewhere_zero():
    from benchmarks.relevance import ceiling_level, chance_level, pointing_game

    lesion = torch.zeros(32, 32, 32, dtype=torch.bool)
    lesion[4:12, 4:12, 4:12] = True  # 512 voxels, more than the top 1 % (328)
    elsewhere = torch.zeros(32, 32, 32)
    elsewhere[20:28, 20:28, 20:28] = 1.0
    assert pointing_game(lesion.float(), lesion) == 1.0
    assert pointing_game(elsewhere, lesion) == 0.0
    # A graded map peaking in the lesion, and noise on top: still wholly inside.
    graded = lesion.float() * torch.linspace(1, 2, 32)[None, None, :] + 0.01 * torch.rand(32, 32, 32)
    assert pointing_game(graded, lesion) == 1.0
    # Ties at the threshold count by the lesion's share among them: a constant map scores the lesion's share.
    assert pointing_game(torch.ones(32, 32, 32), lesion) == pytest.approx(512 / 32**3)
    brain = torch.zeros_like(lesion)
    brain[:16] = True
    assert chance_level(lesion, brain) == pytest.approx(512 / (16 * 32 * 32))
    small = torch.zeros_like(lesion)
    small[4:7, 4:7, 4:7] = True  # 27 voxels: at best 27 of the 328 top voxels
    assert ceiling_level(lesion) == 1.0 and ceiling_level(small) == pytest.approx(27 / 328)
    assert pointing_game(small.float(), small) == pytest.approx(27 / 328)


def test_relevance_benchmark_reports_every_method(tmp_path):
    """`benchmarks.relevance` at toy sizes (two training steps): the report has every method's pointing game,
    chance, sanity-check cascade, time and memory, and a figure per method."""
    pytest.importorskip("nilearn")
    pytest.importorskip("captum")
    from benchmarks.relevance import main
    from umbrella_llava.explain import METHODS

    report = main(["--quick", "--out", str(tmp_path / "relevance.json"), "--figures", str(tmp_path)])
    assert json.loads((tmp_path / "relevance.json").read_text())["recommended"] == report["recommended"]
    assert report["recommended"] in METHODS and report["training"][0]["last_step"] == 2
    stages = None
    for method in (*METHODS, "gradient"):  # the package's methods and the plain-gradient reference
        measured = report["methods"][method]
        assert 0 <= measured["pointing_game"]["mean"] <= 1 and 0 < measured["chance"]["mean"] < 1
        assert measured["seconds_per_map"] > 0 and measured["peak_mib_per_map"] >= 0
        cascade = measured["randomisation_spearman"]
        stages = stages or list(cascade)
        assert list(cascade) == stages and stages[0].startswith("LM head") and stages[-1].startswith("embedder")
        assert (tmp_path / f"relevance_{method}.png").stat().st_size > 0
    small = report["small_lesion"]
    assert set(small) >= {"chance", "ceiling", "answered_correctly", *METHODS, "gradient"}
    assert all(0 <= small[method]["top_1pc_in_lesion"]["mean"] <= 1 for method in METHODS)


def test_conv_patch_embedding_gives_each_patch_its_own_token():
    """The hybrid-ViT diagnostic (`add_conv_patch_embedding`) keeps the package's token order: a bright cube inside
    one patch moves that patch's token, in `(h w d)` order over the patch grid, more than any other."""
    from benchmarks.learning import LOCAL_DIAGNOSTICS, add_conv_patch_embedding, build_config, build_processor
    from umbrella_llava import UmbrellaLlavaForConditionalGeneration

    torch.manual_seed(0)
    processor = build_processor(32, 64)
    model = UmbrellaLlavaForConditionalGeneration(build_config(LOCAL_DIAGNOSTICS[0], processor.tokenizer))
    add_conv_patch_embedding(model)
    embeddings = model.model.vision_tower.embeddings
    blank = torch.zeros(1, 1, 32, 32, 32)
    marked = blank.clone()
    marked[0, 0, 3:5, 11:13, 27:29] = 5.0  # inside patch (h, w, d) = (0, 1, 3) of the 4³ grid
    with torch.no_grad():
        moved = (embeddings(marked) - embeddings(blank)).norm(dim=-1)[0]
    assert moved.shape == (64,)
    assert int(moved.argmax()) == 0 * 16 + 1 * 4 + 3
