"""The training forward compiles in one graph (`torch.compile(fullgraph=True)`) and computes what the eager forward
computes; the per-sample checks stay: eagerly with the sample named, compiled as device asserts, and in the collator.

Compiled on the CPU with `backend="aot_eager"`: dynamo traces the graph and AOTAutograd builds its backward, which is
where graph breaks and data-dependent shapes show, without inductor's C++ build (the GPU run uses inductor; see
BENCHMARKS.md)."""

import pytest
import torch
from conftest import tiny_config
from test_modeling import make_batch
from test_train_script import run_inputs, train_args  # noqa: F401  (a fixture)

from umbrella_llava import UmbrellaLlavaForConditionalGeneration
from umbrella_llava.training import build_trainer, parse_arguments


@pytest.fixture
def training_model(tokenizer):
    torch.manual_seed(0)
    model = UmbrellaLlavaForConditionalGeneration(tiny_config(tokenizer)).train()
    return model


def gapped_batch(config) -> dict[str, torch.Tensor]:
    """Three samples with 2, 1 and 0 volumes in 3 slots, the first with a padded slot between its two volumes, so that
    splicing by slot index instead of by rank among the valid slots gives other features."""
    batch = make_batch(config, [2, 1, 0], slots=3, seed=3)
    pixel_values, image_mask = batch["pixel_values"], batch["image_mask"].clone()
    pixel_values[0, 2] = pixel_values[0, 1]
    pixel_values[0, 1] = 0.0
    image_mask[0] = torch.tensor([True, False, True])
    batch.update(image_mask=image_mask, labels=batch["input_ids"].clone())
    return batch


def loss_and_grads(model, call, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = call(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_compiled_equals_eager(model, batch) -> None:
    eager_loss, eager_grads = loss_and_grads(model, model, batch)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled_loss, compiled_grads = loss_and_grads(model, compiled, batch)
    torch.testing.assert_close(compiled_loss, eager_loss)
    assert compiled_grads.keys() == eager_grads.keys()
    assert any(name.startswith("model.vision_tower.embeddings") for name in eager_grads)  # the volumes reach the loss
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_training_forward_with_volumes_has_no_graph_break(training_model):
    batch = gapped_batch(training_model.config)
    explanation = torch._dynamo.explain(training_model)(**batch)
    reasons = [str(reason.reason).splitlines()[0] for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


def test_fullgraph_compile_gives_the_eager_loss_and_gradients(training_model):
    assert_compiled_equals_eager(training_model, gapped_batch(training_model.config))


@pytest.mark.parametrize("layout", ["counts_only", "flattened_with_counts", "flattened"])
def test_fullgraph_compile_of_other_volume_layouts(training_model, layout):
    batch = make_batch(training_model.config, [2, 1], slots=2, seed=5)
    batch["labels"] = batch["input_ids"].clone()
    image_mask = batch.pop("image_mask")
    if layout != "counts_only":
        batch["pixel_values"] = batch["pixel_values"][image_mask]
    if layout == "flattened":
        del batch["num_images_per_sample"]
    assert_compiled_equals_eager(training_model, batch)


def test_compiled_text_only_batch_trains_the_vision_path_too(training_model):
    batch = make_batch(training_model.config, [0, 0], slots=1)
    batch = {key: batch[key] for key in ("input_ids", "attention_mask")}
    batch["labels"] = batch["input_ids"].clone()
    assert_compiled_equals_eager(training_model, batch)


def mismatched(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sample 1 loses its volume while its image tokens stay; the mask and the counts agree with each other."""
    batch = {**batch, "image_mask": batch["image_mask"].clone()}
    batch["image_mask"][1] = False
    batch["num_images_per_sample"] = batch["image_mask"].sum(dim=1)
    return batch


def test_mismatched_batch_is_refused_eagerly_and_compiled(training_model):
    batch = mismatched(gapped_batch(training_model.config))
    with pytest.raises(ValueError, match=r"sample 1: 8 image tokens, 0 volumes × 8 = 0 expected"):
        training_model(**batch)
    compiled = torch.compile(training_model, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="Image tokens and volumes do not match per sample"):
        compiled(**batch)


def test_compiled_forward_refuses_what_flatten_volumes_refuses(training_model):
    compiled = torch.compile(training_model, fullgraph=True, backend="aot_eager")
    batch = gapped_batch(training_model.config)
    disagreeing = {**batch, "num_images_per_sample": torch.tensor([1, 1, 0])}
    with pytest.raises(RuntimeError, match="image_mask and num_images_per_sample disagree"):
        compiled(**disagreeing)
    split = {**batch, "input_ids": batch["input_ids"].clone()}
    first_image_token = int((split["input_ids"][0] == training_model.config.image_token_id).nonzero()[0])
    # Text inside sample 0's first block, image token moved past its second: counts still agree.
    split["input_ids"][0, first_image_token + 3] = 11
    last_text = int(split["attention_mask"][0].nonzero()[-1])
    split["input_ids"][0, last_text] = training_model.config.image_token_id
    with pytest.raises(RuntimeError, match="Image-token blocks are split by text"):
        compiled(**split)
    non_finite = {**batch, "pixel_values": batch["pixel_values"].clone()}
    non_finite["pixel_values"][1, 0, 0, 3, 3, 3] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        compiled(**non_finite)
    # A NaN in a padded slot is never read, compiled as eagerly.
    padded_nan = {**batch, "pixel_values": batch["pixel_values"].clone()}
    padded_nan["pixel_values"][0, 1, 0, 3, 3, 3] = float("nan")
    assert torch.isfinite(compiled(**padded_nan).loss)


def test_collator_names_a_mismatched_sample_before_any_forward(tiny_processor):
    processor = tiny_processor
    from umbrella_llava.data import UmbrellaCollator

    tokens = processor.image_seq_length
    image_token = processor.image_token_id
    volume = torch.zeros(1, 1, *processor.image_processor.volume_size)
    features = [
        {"input_ids": torch.tensor([5] + [image_token] * tokens + [6]), "pixel_values": volume},
        {"input_ids": torch.tensor([5] + [image_token] * (tokens - 1) + [6]), "pixel_values": volume},
    ]
    with pytest.raises(ValueError, match=rf"UmbrellaCollator: .*sample 1: {tokens - 1} image tokens, 1 volumes"):
        UmbrellaCollator(processor)(features)
    features[1]["input_ids"] = torch.tensor([5] + [image_token] * tokens + [6])
    assert UmbrellaCollator(processor)(features)["num_images_per_sample"].tolist() == [1, 1]


ON_GPU = pytest.param(
    "cuda",
    marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where one is lent)"),
)


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="full"),
        pytest.param(["--gradient_checkpointing"], id="gradient_checkpointing"),
        pytest.param(["--train_mode", "lora", "--lora_r", "4", "--gradient_checkpointing"], id="lora"),
    ],
)
def test_umbrella_train_torch_compile_trains_the_eager_loss_curve_in_one_graph(run_inputs, tmp_path, extra, device):  # noqa: F811
    """`umbrella-train --torch_compile` (the Trainer's own flag) trains the loss curve of the same run uncompiled, and
    dynamo counts no graph break in it: on the CPU with aot_eager, on a GPU with inductor (the default) and --bf16."""
    if "lora" in extra:
        pytest.importorskip("peft")
    from torch._dynamo.utils import counters

    precision = [] if device == "cpu" else ["--bf16"]
    compile_flags = ["--torch_compile", *(["--torch_compile_backend", "aot_eager"] if device == "cpu" else [])]

    def losses(*flags: str) -> list[float]:
        args = train_args(run_inputs, tmp_path / "-".join(flags or ["eager"]), "--max_steps", "3", "--seed", "0")
        if device != "cpu":
            args.remove("--use_cpu")
        trainer, _ = build_trainer(*parse_arguments(args + list(flags) + extra))
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    eager = losses(*precision)
    counters.clear()
    compiled = losses(*precision, *compile_flags)
    assert sum(counters["graph_break"].values()) == 0, "\n\n".join(
        f"{n}× {r[:600]}" for r, n in counters["graph_break"].items()
    )
    assert counters["stats"]["unique_graphs"] >= 1  # the step did compile
    assert compiled == pytest.approx(eager, rel=1e-4 if device == "cpu" else 2e-2)
    assert len(set(eager)) == 3  # three steps that moved the loss
