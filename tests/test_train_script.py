"""scripts/train.py and umbrella_llava.training: the CLI end to end on real brain volumes, what each train mode
trains, resuming on the same loss curve, DDP with two CPU processes, generation accuracy, and bad input."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, run_without_package, tiny_config
from test_modeling import make_batch
from transformers import LlavaConfig, Trainer, TrainerCallback

from umbrella_llava import UmbrellaLlavaForConditionalGeneration, evaluation
from umbrella_llava.checkpoints import damaged_weight_files
from umbrella_llava.distributed import check_distributed_launch
from umbrella_llava.evaluation import accuracy_metrics, evaluate_generation, generation_prompt, normalize_answer
from umbrella_llava.image_processing_umbrella_llava import UmbrellaVolumeProcessor
from umbrella_llava.processing_umbrella_llava import UmbrellaLlavaProcessor
from umbrella_llava.training import GenerationEvaluationError, ModelArguments, build_trainer, main, parse_arguments

TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train.py"


def single_volume_record(index: int, volume: str, answer: str) -> dict:
    return {
        "task_id": f"t1-{index}",
        "task_type": "T1",
        "images": [{"path": volume, "token": "<image>", "modality": "T1"}],
        "conversations": [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "Is this a T1-weighted brain MRI?"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
    }


def comparison_record(index: int, first: str, second: str, answer: str) -> dict:
    return {
        "task_id": f"t2-{index}",
        "task_type": "T2",
        "images": [{"path": first}, {"path": second}],
        "conversations": [
            {"role": "system", "content": "You are a helpful radiology assistant."},
            {"role": "user", "content": "<image>\n<image>\nWhich scan is brighter?"},
            {"role": "assistant", "content": answer},
        ],
    }


TEXT_ONLY_RECORD = {
    "id": "text-only",
    "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "Yes."}],
}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="session")
def run_inputs(tmp_path_factory, tokenizer, mni_volume_paths) -> dict[str, Path]:
    """A tiny UmbrellaLlava checkpoint (model + processor + code) and train / eval JSONL on the MNI152 templates.

    The training set has 8 records (single-volume T1 questions, two-volume T2 comparisons, one text-only record, so
    that a batch without volumes occurs); the eval set has 2 T1 and 1 T2 records.
    """
    root = tmp_path_factory.mktemp("train_script")
    for name, path in mni_volume_paths.items():
        shutil.copy(path, root / f"{name.lower()}.nii.gz")
    torch.manual_seed(0)
    checkpoint = root / "checkpoint"
    UmbrellaLlavaForConditionalGeneration(tiny_config(tokenizer)).save_pretrained(checkpoint)
    UmbrellaLlavaProcessor(
        image_processor=UmbrellaVolumeProcessor(volume_size=(16, 16, 16)), tokenizer=tokenizer, image_seq_length=8
    ).save_pretrained(checkpoint)
    train = [
        single_volume_record(0, "t1.nii.gz", "Yes."),
        single_volume_record(1, "gm.nii.gz", "No."),
        comparison_record(0, "t1.nii.gz", "gm.nii.gz", "The first."),
        TEXT_ONLY_RECORD,
        single_volume_record(2, "wm.nii.gz", "No."),
        comparison_record(1, "wm.nii.gz", "t1.nii.gz", "The second."),
        single_volume_record(3, "t1.nii.gz", "Yes."),
        single_volume_record(4, "gm.nii.gz", "No."),
    ]
    evaluation = [
        single_volume_record(10, "t1.nii.gz", "Yes."),
        single_volume_record(11, "wm.nii.gz", "No."),
        comparison_record(10, "gm.nii.gz", "t1.nii.gz", "The second."),
    ]
    return {
        "root": root,
        "checkpoint": checkpoint,
        "train": write_jsonl(root / "train.jsonl", train),
        "eval": write_jsonl(root / "eval.jsonl", evaluation),
        "cache": root / "volume_cache",
    }


def train_args(run_inputs, output_dir: Path, *extra: str, eval_data: bool = False) -> list[str]:
    args = [
        "--model_name_or_path", str(run_inputs["checkpoint"]),
        "--train_data", str(run_inputs["train"]),
        "--output_dir", str(output_dir),
        "--cache_dir", str(run_inputs["cache"]),
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "4",
        "--logging_steps", "1",
        "--learning_rate", "1e-3",
        "--use_cpu",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--dataloader_num_workers", "0",
    ]  # fmt: skip
    if eval_data:
        args += ["--eval_data", str(run_inputs["eval"])]
    return args + list(extra)


def with_checkpoint(args: list[str], checkpoint: Path) -> list[str]:
    args = list(args)
    args[args.index("--model_name_or_path") + 1] = str(checkpoint)
    return args


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def step_losses(log_history: list[dict]) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}


# ---------------------------------------------------------------------------------------------------------------------
# The CLI end to end
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_trains_writes_complete_remote_code_checkpoints_and_reports_generation_accuracy(run_inputs, tmp_path):
    output_dir = tmp_path / "run"
    args = train_args(
        run_inputs, output_dir, "--train_mode", "embedder_projector", "--max_steps", "2", "--save_steps", "2",
        eval_data=True,
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), *args], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "train_mode=embedder_projector:" in result.stdout and "parameters trainable" in result.stdout

    checkpoint = output_dir / "checkpoint-2"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"].startswith("modeling_umbrella_llava.")
    processor_config = json.loads((checkpoint / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_umbrella_llava.UmbrellaLlavaProcessor"}
    for name in (
        "model.safetensors",
        "modeling_umbrella_llava.py",
        "configuration_umbrella_llava.py",
        "processing_umbrella_llava.py",
        "image_processing_umbrella_llava.py",
        "dicom_series.py",
        "tokenizer.json",
        "chat_template.jinja",
        "trainer_state.json",
        "optimizer.pt",
    ):
        assert (checkpoint / name).is_file(), name

    report = json.loads((output_dir / "eval_generation.json").read_text())
    assert set(report["metrics"]) == {"eval_accuracy_T1", "eval_accuracy_T2", "eval_accuracy_overall"}
    assert {task: counts["total"] for task, counts in report["per_task"].items()} == {"T1": 2, "T2": 1}
    assert [r["record"] for r in report["results"]] == ["t1-10", "t1-11", "t2-10"]
    assert report["results"][2]["reference"] == "The second."
    assert report["results"][2]["prompt"].endswith("Which scan is brighter?<|im_end|>\n<|im_start|>assistant\n")
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert any("eval_accuracy_overall" in entry for entry in state["log_history"])

    # The checkpoint is complete: it loads and runs where umbrella_llava cannot be imported.
    run_without_package(
        f"""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        checkpoint = {str(checkpoint)!r}
        model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
        assert type(model).__name__ == "UmbrellaLlavaForConditionalGeneration", type(model)
        assert type(processor).__name__ == "UmbrellaLlavaProcessor", type(processor)
        batch = processor(text="<image>\\nIs this a T1?", images=[{str(run_inputs["root"] / "t1.nii.gz")!r}],
                          return_tensors="pt")
        assert torch.isfinite(model(**batch).logits).all()
        """,
        cwd=tmp_path,
    )


def test_a_failing_generation_evaluation_leaves_the_trained_model_saved(run_inputs, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (raised by the test)")

    monkeypatch.setattr(evaluation, "evaluate_generation", out_of_memory)
    output_dir = tmp_path / "run"
    args = train_args(
        run_inputs, output_dir, "--train_mode", "embedder", "--max_steps", "1", "--save_strategy", "no",
        eval_data=True,
    )  # fmt: skip
    with pytest.raises(
        GenerationEvaluationError, match=rf"the model is saved in {re.escape(str(output_dir))}, .*CUDA out of memory"
    ):
        main(args)

    saved = UmbrellaLlavaForConditionalGeneration.from_pretrained(output_dir).state_dict()
    initial = UmbrellaLlavaForConditionalGeneration.from_pretrained(run_inputs["checkpoint"]).state_dict()
    trained = {name for name in saved if not torch.equal(saved[name], initial[name])}
    assert trained and all(name.startswith("model.vision_tower.embeddings.") for name in trained)
    assert UmbrellaLlavaProcessor.from_pretrained(output_dir).image_seq_length == 8
    assert "trust_remote_code=True" in (output_dir / "README.md").read_text()
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 1


# ---------------------------------------------------------------------------------------------------------------------
# What each train mode trains
# ---------------------------------------------------------------------------------------------------------------------

EXPECTED_TRAINABLE = {
    "embedder": lambda name: name.startswith("model.vision_tower.embeddings."),
    "embedder_projector": lambda name: name.startswith(
        ("model.vision_tower.embeddings.", "model.multi_modal_projector.")
    ),
    "full": lambda name: True,
}


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


@pytest.mark.parametrize("train_mode", ["embedder", "embedder_projector", "full"])
def test_train_mode_trains_exactly_its_parameters(run_inputs, tmp_path, train_mode):
    trainer, _ = build_trainer(
        *parse_arguments(train_args(run_inputs, tmp_path, "--train_mode", train_mode, "--max_steps", "2"))
    )
    before = _parameters(trainer.model)
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {name for name in before if EXPECTED_TRAINABLE[train_mode](name)}

    trainer.train()
    after = _parameters(trainer.model)
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved == trainable


def test_lora_trains_adapters_on_the_language_model_and_the_embedder_and_projector_in_full(run_inputs, tmp_path):
    pytest.importorskip("peft")
    args = train_args(run_inputs, tmp_path, "--train_mode", "lora", "--lora_r", "4", "--max_steps", "2")
    trainer, _ = build_trainer(*parse_arguments(args))
    before = _parameters(trainer.model)
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}

    lora = {name for name in trainable if ".lora_" in name}
    full_copies = trainable - lora
    assert lora and all(".model.language_model." in name for name in lora)
    # every linear layer of every language-model block, and nothing in the vision tower
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in lora}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert full_copies and all(".modules_to_save.default." in name for name in full_copies)
    assert {name.split(".modules_to_save")[0].rsplit("model.", 1)[-1] for name in full_copies} == {
        "vision_tower.embeddings",
        "multi_modal_projector",
    }

    trainer.train()
    after = _parameters(trainer.model)
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved == trainable


def test_an_adapter_saved_under_deepspeed_becomes_a_complete_merged_folder(run_inputs, tmp_path):
    # Under DeepSpeed, Trainer.save_model gathers the partitions and writes an adapter folder; merge_saved_adapter
    # turns that folder into the merged model. The adapter here is written the way Trainer.save_model writes it.
    pytest.importorskip("peft")
    from transformers import AutoModelForImageTextToText

    from umbrella_llava.training import merge_saved_adapter

    args = train_args(run_inputs, tmp_path, "--train_mode", "lora", "--lora_r", "4", "--max_steps", "1")
    model_args, _, _ = parse_arguments(args)
    trainer, _ = build_trainer(*parse_arguments(args))
    with torch.no_grad():  # a trained adapter and trained full copies of the embedder and projector
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    output = tmp_path / "final"
    trainer.model.save_pretrained(output)
    trainer.processing_class.save_pretrained(output)
    assert (output / "adapter_config.json").is_file() and not (output / "config.json").is_file()

    merge_saved_adapter(str(output), model_args)

    assert not (output / "adapter_config.json").exists() and (output / "adapter" / "adapter_config.json").is_file()
    assert (output / "config.json").is_file() and damaged_weight_files(output, read_tensors=True) == {}
    loaded = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True).eval()
    expected = trainer.model.merge_and_unload().eval()
    batch = make_batch(expected.config, [1, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected(**batch).logits)
    base = AutoModelForImageTextToText.from_pretrained(run_inputs["checkpoint"], trust_remote_code=True).eval()
    with torch.no_grad():  # the adapter really is in the merged weights
        assert not torch.allclose(base(**batch).logits, expected(**batch).logits, atol=1e-3)


def _zero3_partitioned(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """What deepspeed.zero.Init leaves of a loaded weight on each rank: an empty local placeholder, the rank's
    partition in the run's dtype (`ds_tensor`) and the full size (`ds_numel`)."""
    for parameter in module.parameters():
        parameter.ds_numel = parameter.numel()
        parameter.ds_tensor = parameter.data.to(dtype).flatten()
        parameter.data = torch.empty(0, dtype=dtype)


def test_parameter_counts_read_the_full_size_of_zero3_partitions():
    from umbrella_llava.training import parameter_counts

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].requires_grad_(False)
    assert parameter_counts(model) == (15, 23)
    _zero3_partitioned(model, torch.bfloat16)
    assert parameter_counts(model) == (15, 23)


def test_parameters_added_after_a_zero3_load_take_the_partitions_dtype():
    # Seen on an H100 with deepspeed 0.19.8: LoRA adapters added after a ZeRO-3 load stayed fp32 beside the bf16
    # partitions, and DeepSpeed's stage-3 optimiser refused the mixed group.
    from umbrella_llava.training import match_zero3_dtype

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    _zero3_partitioned(model[0], torch.bfloat16)
    added = model[1].weight.detach().clone()
    match_zero3_dtype(model)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(model[1].weight.float(), added, atol=1e-2, rtol=1e-2)
    plain = torch.nn.Linear(2, 2)  # no ZeRO-3: nothing changes
    match_zero3_dtype(plain)
    assert plain.weight.dtype == torch.float32


def test_lora_target_modules_must_be_language_model_linear_layers(run_inputs, tmp_path):
    pytest.importorskip("peft")
    args = train_args(run_inputs, tmp_path, "--train_mode", "lora", "--lora_target_modules", "q_proj", "fc1")
    with pytest.raises(ValueError, match=r"\['fc1'\] are not linear layers of the language model"):
        build_trainer(*parse_arguments(args))


# ---------------------------------------------------------------------------------------------------------------------
# Length-grouped sampling
# ---------------------------------------------------------------------------------------------------------------------


def test_length_grouped_sampling_takes_the_token_lengths_without_decoding_a_volume(run_inputs, tmp_path, monkeypatch):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from umbrella_llava import data

    args = train_args(run_inputs, tmp_path, "--train_sampling_strategy", "group_by_length", "--max_steps", "1")
    trainer, _ = build_trainer(*parse_arguments(args))
    dataset = trainer.train_dataset

    def refuse(*args, **kwargs):
        raise AssertionError("decoded a volume or tokenized a record again")

    monkeypatch.setattr(type(dataset), "load_volume", refuse)
    monkeypatch.setattr(data, "tokenize_conversation", refuse)
    sampler = trainer.get_train_dataloader().batch_sampler.sampler
    assert isinstance(sampler, LengthGroupedSampler)
    assert sampler.lengths == dataset.lengths and len(set(dataset.lengths)) > 1
    assert torch.equal(dataset[3]["input_ids"], dataset.encodings[3][0])  # __getitem__ does not tokenize again

    monkeypatch.undo()  # the items' volumes are decoded when the collator reads them
    assert dataset[0]["pixel_values"].shape == (1, 1, 16, 16, 16)


# ---------------------------------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------------------------------


class StopAt(TrainerCallback):
    """Interrupts training after `step` (the run saves there, as a killed run's last checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def with_embedder_noise(checkpoint: Path, folder: Path) -> Path:
    """A copy of `checkpoint` (model and processor) whose 3-D embedder's weights have noise added."""
    model = UmbrellaLlavaForConditionalGeneration.from_pretrained(checkpoint)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.model.vision_tower.embeddings.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(folder)
    UmbrellaLlavaProcessor.from_pretrained(checkpoint).save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("train_mode", ["full", "lora"])
def test_resume_from_checkpoint_continues_the_same_loss_curve(run_inputs, tmp_path, train_mode):
    if train_mode == "lora":
        pytest.importorskip("peft")
    # 8 records, batch 2: 4 steps per epoch, so step 3 is mid-epoch and the run crosses an epoch boundary.
    common = ("--train_mode", train_mode, "--max_steps", "6", "--save_steps", "3", "--lora_r", "4")
    uninterrupted, _ = build_trainer(*parse_arguments(train_args(run_inputs, tmp_path / "a", *common)))
    uninterrupted.train()
    expected = step_losses(uninterrupted.state.log_history)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]

    interrupted, _ = build_trainer(*parse_arguments(train_args(run_inputs, tmp_path / "b", *common)))
    interrupted.add_callback(StopAt(3))
    interrupted.train()
    assert interrupted.state.global_step == 3 and (tmp_path / "b" / "checkpoint-3").is_dir()

    # The resumed run starts from a model with another embedder: only the checkpoint's weights (the embedder trains
    # in both modes) give the uninterrupted run's losses; starting afresh from this model would not.
    start = with_embedder_noise(run_inputs["checkpoint"], tmp_path / "other_start")
    args = with_checkpoint(train_args(run_inputs, tmp_path / "b", *common, "--resume_from_checkpoint", "last"), start)
    resumed = main(args)
    losses = step_losses(resumed.state.log_history)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(
        torch.tensor([losses[s] for s in range(1, 7)]), torch.tensor([expected[s] for s in range(1, 7)])
    )


# ---------------------------------------------------------------------------------------------------------------------
# DDP with two CPU processes
# ---------------------------------------------------------------------------------------------------------------------


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, str(TRAIN_SCRIPT), *args],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )


TEXT_ONLY_RECORD_2 = {
    "id": "text-only-2",
    "conversations": [{"from": "human", "value": "Say no."}, {"from": "gpt", "value": "No."}],
}


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_forms_one_group_and_matches_one_process_with_the_double_batch(run_inputs, tmp_path):
    pytest.importorskip("peft")
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    # In order, 2 per process: process 0 takes records [0, 1] and [4, 5], process 1 takes [2, 3] and [6, 7]. So in
    # the first step process 1 has a batch without any volume while process 0 has volumes.
    records = [
        single_volume_record(0, "t1.nii.gz", "Yes."),
        single_volume_record(1, "gm.nii.gz", "No."),
        TEXT_ONLY_RECORD,
        TEXT_ONLY_RECORD_2,
        single_volume_record(2, "wm.nii.gz", "No."),
        comparison_record(0, "t1.nii.gz", "gm.nii.gz", "The first."),
        comparison_record(1, "wm.nii.gz", "t1.nii.gz", "The second."),
        single_volume_record(3, "t1.nii.gz", "Yes."),
    ]
    train = write_jsonl(run_inputs["root"] / "ddp_train.jsonl", records)
    in_order = BatchSampler(SequentialSampler(records), batch_size=2, drop_last=False)
    assert next(iter(BatchSamplerShard(in_order, num_processes=2, process_index=1))) == [2, 3]

    # LoRA: frozen base, wrapped embedder and projector, and a text-only batch, with find_unused_parameters=False.
    common = ("--train_mode", "lora", "--lora_r", "4", "--lora_dropout", "0", "--num_train_epochs", "1")
    common += ("--train_sampling_strategy", "sequential")
    run_inputs = {**run_inputs, "train": train}
    result = torchrun(train_args(run_inputs, tmp_path / "ddp", *common, eval_data=True), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "world_size=2, global batch 4" in result.stdout

    state = json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())
    assert state["global_step"] == 2, "8 records at 2 per process: 2 steps only if the two processes share the epoch"
    report = json.loads((tmp_path / "ddp" / "eval_generation.json").read_text())
    assert [r["record"] for r in report["results"]] == ["t1-10", "t1-11", "t2-10"]  # each question once

    # The same run in one process with twice the per-device batch takes the same steps.
    single = main(train_args(run_inputs, tmp_path / "single", *common) + ["--per_device_train_batch_size", "4"])
    torch.testing.assert_close(
        torch.tensor(list(step_losses(state["log_history"]).values())),
        torch.tensor(list(step_losses(single.state.log_history).values())),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.fixture(scope="module")
def llava15_checkpoints(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """llava-1.5-style checkpoints (a CLIP tower read at vision_feature_layer=-2, strategy default) for the 16³
    volumes of `run_inputs`: one converted from a stock LLaVA, one built from its config."""
    from test_conversion import save_stock_llava

    from umbrella_llava.conversion import convert_llava_checkpoint

    root = tmp_path_factory.mktemp("llava15")
    save_stock_llava(root / "stock", tokenizer, "clip", vision_feature_layer=-2)
    converted = convert_llava_checkpoint(root / "stock", root / "converted", volume_size=16, patch_size=8)
    torch.manual_seed(0)
    config = tiny_config(tokenizer, vision="clip", vision_feature_layer=-2)
    UmbrellaLlavaForConditionalGeneration(config).save_pretrained(root / "scratch")
    UmbrellaLlavaProcessor(
        image_processor=UmbrellaVolumeProcessor(volume_size=(16, 16, 16)),
        tokenizer=tokenizer,
        image_seq_length=config.image_seq_length,
    ).save_pretrained(root / "scratch")
    return {"converted": converted, "scratch": root / "scratch"}


def test_full_training_freezes_the_vision_layers_whose_output_is_never_read(run_inputs, llava15_checkpoints, tmp_path):
    args = train_args(run_inputs, tmp_path, "--train_mode", "full", "--max_steps", "2")
    trainer, _ = build_trainer(*parse_arguments(with_checkpoint(args, llava15_checkpoints["scratch"])))
    frozen = {name for name, parameter in trainer.model.named_parameters() if not parameter.requires_grad}
    assert frozen and all(name.startswith("model.vision_tower.encoder.layers.1.") for name in frozen)

    before = _parameters(trainer.model)
    trainer.train()
    after = _parameters(trainer.model)
    # Every trainable parameter moved, so each got a gradient: what DDP without unused-parameter search needs.
    assert {name for name in before if not torch.equal(before[name], after[name])} == set(before) - frozen


@pytest.mark.slow
@pytest.mark.parametrize("origin", ["converted", "scratch"])
def test_ddp_trains_and_saves_a_llava15_style_model_in_full(run_inputs, llava15_checkpoints, tmp_path, origin):
    args = train_args(run_inputs, tmp_path / "ddp", "--train_mode", "full", "--max_steps", "2")
    result = torchrun(with_checkpoint(args, llava15_checkpoints[origin]), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "world_size=2" in result.stdout
    saved = UmbrellaLlavaForConditionalGeneration.from_pretrained(tmp_path / "ddp").config
    # Converted: the last vision layer was left out at conversion; from scratch it is there, frozen.
    expected = {"converted": (1, -1), "scratch": (2, -2)}[origin]
    assert (saved.vision_config.num_hidden_layers, saved.vision_feature_layer) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is about machines without an accelerator")
def test_multi_process_launch_without_use_cpu_on_a_cpu_machine_is_refused(run_inputs, tmp_path):
    _, _, training_args = parse_arguments([a for a in train_args(run_inputs, tmp_path) if a != "--use_cpu"])
    with pytest.raises(ValueError, match="WORLD_SIZE=2 .* --use_cpu is not set: each process would train alone"):
        check_distributed_launch(training_args, environ={"WORLD_SIZE": "2"})
    check_distributed_launch(training_args, environ={"WORLD_SIZE": "1"})
    training_args.use_cpu = True
    check_distributed_launch(training_args, environ={"WORLD_SIZE": "2"})


def test_fsdp_on_cpus_is_refused_since_accelerate_would_silently_run_ddp(run_inputs, tmp_path):
    # Seen with torchrun --nproc_per_node 2 ... --use_cpu --fsdp full_shard: the Trainer wrapped the model in
    # DistributedDataParallel and each process held every parameter.
    _, _, training_args = parse_arguments(train_args(run_inputs, tmp_path, "--fsdp", "full_shard"))
    with pytest.raises(ValueError, match="--fsdp on CPUs: accelerate shards a model only on GPUs"):
        check_distributed_launch(training_args, environ={"WORLD_SIZE": "2"})


# ---------------------------------------------------------------------------------------------------------------------
# Generation accuracy
# ---------------------------------------------------------------------------------------------------------------------


def test_normalize_answer_ignores_case_punctuation_and_spacing():
    assert normalize_answer("  Yes. ") == normalize_answer("yes") == "yes"
    assert normalize_answer("The FIRST!") == "the first"
    assert normalize_answer("T1-weighted") == "t1 weighted"
    assert normalize_answer("No") != normalize_answer("Not")


def test_accuracy_metrics_per_task_type_and_overall():
    results = [
        {"task": "T1", "correct": True},
        {"task": "T1", "correct": False},
        {"task": "T2", "correct": True},
        {"task": "untyped", "correct": True},
    ]
    assert accuracy_metrics(results) == {
        "eval_accuracy_T1": 0.5,
        "eval_accuracy_T2": 1.0,
        "eval_accuracy_untyped": 1.0,
        "eval_accuracy_overall": 0.75,
    }


class AnswersYes(torch.nn.Module):
    """Stands in for the model: 'generates' the tokens of "Yes." after every prompt, and records its inputs."""

    def __init__(self, tokenizer):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answer = torch.tensor(tokenizer.encode("Yes.<|im_end|>", add_special_tokens=False))
        self.calls = []

    def generate(self, input_ids, max_new_tokens, do_sample, **volumes):
        self.calls.append({"input_ids": input_ids, **volumes})
        return torch.cat([input_ids, self.answer.expand(input_ids.shape[0], -1)], dim=1)


def test_evaluate_generation_prompts_with_the_turns_before_the_answer_and_scores_per_task(run_inputs, tiny_processor):
    from umbrella_llava.data import ConversationDataset

    dataset = ConversationDataset(run_inputs["eval"], tiny_processor)
    messages, reference = generation_prompt(dataset.records[2])
    assert reference == "The second." and [m["role"] for m in messages] == ["system", "user"]

    model = AnswersYes(tiny_processor.tokenizer)
    report = evaluate_generation(model, tiny_processor, dataset, batch_size=2)
    assert report["metrics"] == {"eval_accuracy_T1": 0.5, "eval_accuracy_T2": 0.0, "eval_accuracy_overall": 1 / 3}
    assert [r["prediction"] for r in report["results"]] == ["Yes."] * 3
    # batch 1: two single-volume prompts; batch 2: the comparison with its two volumes, left-padded prompts
    assert [call["pixel_values"].shape[:2] for call in model.calls] == [(2, 1), (1, 2)]
    image_tokens = (model.calls[1]["input_ids"] == tiny_processor.image_token_id).sum().item()
    assert image_tokens == 2 * 8
    assert all((call["input_ids"][:, -1] == call["input_ids"][0, -1]).all() for call in model.calls)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: each is refused before any training step
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "train", refuse)


@pytest.mark.parametrize("flag", ["--learning_rat", "--lora_rank"], ids=["abbreviation", "unknown"])
def test_unknown_or_abbreviated_flag_is_refused(run_inputs, tmp_path, no_training, flag):
    with pytest.raises(ValueError, match=rf"not used by the HfArgumentParser: \['{flag}', '0.1'\]"):
        main(train_args(run_inputs, tmp_path) + [flag, "0.1"])


def test_missing_train_data_is_refused(run_inputs, tmp_path, no_training, capsys):
    args = train_args(run_inputs, tmp_path)
    index = args.index("--train_data")
    with pytest.raises(SystemExit):
        main(args[:index] + args[index + 2 :])
    assert "--train_data" in capsys.readouterr().err


def test_a_stock_llava_checkpoint_points_at_the_conversion_script(run_inputs, tmp_path, no_training):
    LlavaConfig().save_pretrained(tmp_path / "llava")
    args = train_args(run_inputs, tmp_path / "out")
    args[args.index("--model_name_or_path") + 1] = str(tmp_path / "llava")
    with pytest.raises(
        ValueError, match=r"is a 'llava' checkpoint, not an UmbrellaLlava one.*convert_llava_checkpoint"
    ):
        main(args)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"--train_data .*empty.jsonl: No valid record"),
        (json.dumps(TEXT_ONLY_RECORD) + '\n{"id": "b", oops}\n', r"empty.jsonl, line 2: not valid JSON"),
    ],
    ids=["empty", "unparsable-line"],
)
def test_empty_or_unparsable_data_is_refused_naming_the_file(run_inputs, tmp_path, no_training, content, message):
    data = tmp_path / "empty.jsonl"
    data.write_text(content)
    args = train_args(run_inputs, tmp_path / "out")
    args[args.index("--train_data") + 1] = str(data)
    with pytest.raises(ValueError, match=message):
        main(args)


def test_missing_data_file_and_checkpoint_are_refused(run_inputs, tmp_path, no_training):
    args = train_args(run_inputs, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="--resume_from_checkpoint .*nowhere: no such folder"):
        main(args + ["--resume_from_checkpoint", str(tmp_path / "nowhere")])
    args[args.index("--train_data") + 1] = str(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="--train_data .*missing.jsonl"):
        main(args)


def test_train_mode_is_a_choice(run_inputs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_arguments(train_args(run_inputs, tmp_path, "--train_mode", "everything"))
    assert "invalid choice: 'everything'" in capsys.readouterr().err
    assert ModelArguments.__dataclass_fields__["train_mode"].default == "embedder"


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed configs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_parse_and_leave_sizes_to_the_trainer(stage):
    config = json.loads((REPO_ROOT / "ds_configs" / f"zero{stage}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto"
    assert config["bf16"]["enabled"] == "auto"
    if stage == 3:  # the Trainer's save_model needs the gathered weights to write a loadable checkpoint
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
