"""Training throughput at the real shapes of llava-interleave-qwen-0.5b on one GPU: `python -m benchmarks.gpu`.

Random weights (nothing is downloaded): a Qwen2-0.5B language model (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 152000, tied embeddings) and a SigLIP so400m tower (hidden 1152, 26 layers, 16 heads,
intermediate 4304), GELU projector, `vision_feature_layer=-1`, strategy `"full"`; 96³ volumes in 16³ patches (216
tokens per volume), 4 volume slots per sample. fp32 weights with bf16 autocast (what `TrainingArguments(bf16=True)`
does), SDPA attention, forward + backward (no optimiser step).

Cases, timed interleaved (each round runs every case once, in a rotating order):

    native           UmbrellaLlava, every sample 4 volumes (tight)
    native_padded    the same volumes in 8 slots per sample, half of them masked out
    loop             the hand-written per-sample loop (benchmarks/handwritten_loop.py) on the tight batch
    native_mixed     samples with 4, 3, 2, 1 volumes in 4 slots (20 of 32 slots valid)
    loop_mixed       the loop on that batch: it encodes all 32 slots

and the fast path (`--fast-cases` chooses), on the tight batch:

    compiled                 `torch.compile(model, fullgraph=True)` (inductor), fp32 weights, bf16 autocast
    bf16                     bf16 weights (what a bf16 optimiser state, or fp32 master weights kept by the optimiser,
                             trains), eager
    bf16_compiled            bf16 weights, compiled whole
    bf16_compiled_fused_ce   bf16 weights, the trunk compiled whole, and the loss by Liger's fused linear cross-entropy
                             from the last hidden states (no (tokens × 152 000) logits tensor); needs liger-kernel

Each compiled case's loss is checked against its eager twin before timing.

and, unless `--skip-memory`, the peak memory of a step at 1, 2, 4, 8 volumes per sample, with and without
activation checkpointing (`torch.cuda.max_memory_allocated`).

Model FLOPs (the useful work, the same for a case and its loop; PaLM's convention, attention not halved for the
causal mask): per step,

    6 × (vision matmul params × vision tokens + projector matmul params × vision tokens
         + LM matmul params (LM head included) × text tokens)
    + 12 × layers × width × Σ sequence²   (attention scores and values, forward + backward, per tower)

where "matmul params" are the weights of the `nn.Linear` layers (embedding tables do no matmul), vision tokens are
the valid volumes × 216, and text tokens the non-padding tokens. MFU = model FLOPs / step time / the card's dense
bf16 peak (H100 SXM 989 TFLOP/s, H100 PCIe 756, H200 989, A100 312; `--peak-tflops` overrides).

`--tiny` runs the same code with tiny sizes in seconds, on the CPU when there is no GPU (a smoke test).
Writes JSON to `--out` (default `benchmarks/results/gpu.json`) and prints a table.
"""

import argparse
import copy
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from umbrella_llava import UmbrellaLlavaForConditionalGeneration

from .common import (
    ModelSize,
    build_umbrella,
    format_table,
    make_text,
    paired_ratio,
    set_activation_checkpointing,
    synchronize,
    write_report,
)
from .common import interleaved_timings as timed
from .handwritten_loop import handwritten_loss

PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}


@dataclass(frozen=True)
class GpuShapes(ModelSize):
    """The model and batch shapes of the run: llava-interleave-qwen-0.5b (Qwen2-0.5B with tied embeddings, SigLIP
    so400m) on 96³ volumes in 16³ patches, and the batch."""

    name: str = "llava-interleave-qwen-0.5b"
    vision_hidden: int = 1152
    vision_intermediate: int = 4304
    vision_layers: int = 26
    vision_heads: int = 16
    text_hidden: int = 896
    text_intermediate: int = 4864
    text_layers: int = 24
    text_heads: int = 14
    text_kv_heads: int = 2
    vocab_size: int = 152000
    volume_size: int = 96
    volume_patch: int = 16
    tie_word_embeddings: bool = True
    volumes_per_sample: int = 4
    batch_size: int = 8


TINY_SHAPES = GpuShapes(
    name="tiny",
    vision_hidden=32,
    vision_intermediate=64,
    vision_layers=2,
    vision_heads=4,
    text_hidden=64,
    text_intermediate=128,
    text_layers=2,
    text_heads=4,
    text_kv_heads=2,
    vocab_size=512,
    volume_size=16,
    volume_patch=8,
    volumes_per_sample=4,
    batch_size=2,
)


def build_model(shapes: GpuShapes, device: torch.device) -> UmbrellaLlavaForConditionalGeneration:
    """A randomly initialised model of `shapes`, built directly on `device`, in training mode, fp32 weights."""
    with torch.device(device):
        return build_umbrella(shapes, attn_implementation="sdpa")


def make_batch(shapes: GpuShapes, counts: list[int], slots: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Text with one image-token block per volume and `(B, slots, 1, S, S, S)` volumes with `image_mask`."""
    batch = make_text(counts, shapes.tokens_per_volume, shapes.vocab_size)
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(len(counts), slots, 1, *(shapes.volume_size,) * 3, generator=generator)
    image_mask = torch.arange(slots)[None, :] < torch.tensor(counts)[:, None]
    pixel_values[~image_mask] = 0.0
    batch.update(pixel_values=pixel_values, image_mask=image_mask)
    return {key: value.to(device) for key, value in batch.items()}


def pad_slots(batch: dict[str, torch.Tensor], slots: int) -> dict[str, torch.Tensor]:
    """The same volumes in `slots` slots per sample, the extra ones masked out."""
    pixel_values, image_mask = batch["pixel_values"], batch["image_mask"]
    padded = pixel_values.new_zeros(pixel_values.shape[0], slots, *pixel_values.shape[2:])
    padded[:, : pixel_values.shape[1]] = pixel_values
    mask = torch.zeros(image_mask.shape[0], slots, dtype=torch.bool, device=image_mask.device)
    mask[:, : image_mask.shape[1]] = image_mask
    return {**batch, "pixel_values": padded, "image_mask": mask}


def _linear_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def model_flops(model: UmbrellaLlavaForConditionalGeneration, batch: dict[str, torch.Tensor]) -> float:
    """Useful training FLOPs (forward + backward) of one step on `batch`; see the module docstring."""
    inner, config = model.model, model.config
    num_volumes = int(batch["image_mask"].sum())
    vision_tokens = num_volumes * config.image_seq_length
    sample_lengths = batch["attention_mask"].sum(dim=1).double()
    text_tokens = float(sample_lengths.sum())
    lm_linear = _linear_params(inner.language_model) + model.lm_head.weight.numel()
    matmul = 6 * (
        (_linear_params(inner.vision_tower) + _linear_params(inner.multi_modal_projector)) * vision_tokens
        + lm_linear * text_tokens
    )
    vision, text = config.vision_config, config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    attention = 12 * vision.num_hidden_layers * vision.hidden_size * num_volumes * config.image_seq_length**2
    attention += 12 * text.num_hidden_layers * text.num_attention_heads * head_dim * float((sample_lengths**2).sum())
    return float(matmul + attention)


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The card's dense bf16 peak in TFLOP/s, and its name."""
    if device.type != "cuda":
        return override, "cpu"
    name = torch.cuda.get_device_name(device)
    if override is not None:
        return override, name
    for key, value in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" is checked before "H100"
        if key in name:
            return value, name
    return None, name


def native_step(model, batch) -> None:
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)


def loop_step(model, batch) -> None:
    handwritten_loss(model, **batch).backward()
    model.zero_grad(set_to_none=True)


def fused_ce_loss(trunk, lm_head: nn.Linear, batch, loss_fn) -> torch.Tensor:
    """The model's next-token loss without its logits: the trunk's (`model.model`) last hidden states and the LM
    head's weight go to a fused linear cross-entropy (`loss_fn`, Liger's), which never holds the (tokens × vocab)
    logits."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    hidden = trunk(**inputs).last_hidden_state
    labels = batch["labels"]
    return loss_fn(lm_head.weight, hidden[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


FAST_CASES = ("compiled", "bf16", "bf16_compiled", "bf16_compiled_fused_ce")


def fast_cases(model, batch, device: torch.device, autocast, wanted=FAST_CASES) -> tuple[dict, dict]:
    """The fast-path cases of `wanted` (module docstring) as step functions, each compiled one's loss checked against
    its eager twin first. The fused-loss case needs liger-kernel and a GPU; it is left out without them."""
    backend = "inductor" if device.type == "cuda" else "aot_eager"  # --tiny on a CPU: no C++ build
    cases, checks = {}, {}

    def step(module, with_autocast: bool):
        def run() -> None:
            with autocast() if with_autocast else nullcontext():
                native_step(module, batch)

        return run

    if "compiled" in wanted:
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        with autocast():
            checks["compiled"] = (compiled(**batch).loss.item(), model(**batch).loss.item())
        cases["compiled"] = step(compiled, with_autocast=True)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    bf16_loss = bf16(**batch).loss.item()
    if "bf16" in wanted:
        cases["bf16"] = step(bf16, with_autocast=False)
    if "bf16_compiled" in wanted:
        bf16_compiled = torch.compile(bf16, fullgraph=True, backend=backend)
        checks["bf16_compiled"] = (bf16_compiled(**batch).loss.item(), bf16_loss)
        cases["bf16_compiled"] = step(bf16_compiled, with_autocast=False)
        bf16.zero_grad(set_to_none=True)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        LigerFusedLinearCrossEntropyLoss = None
    if "bf16_compiled_fused_ce" in wanted and LigerFusedLinearCrossEntropyLoss is not None and device.type == "cuda":
        loss_fn = LigerFusedLinearCrossEntropyLoss()
        trunk = torch.compile(bf16.model, fullgraph=True, backend=backend)
        try:
            checks["bf16_compiled_fused_ce"] = (fused_ce_loss(trunk, bf16.lm_head, batch, loss_fn).item(), bf16_loss)
        except Exception as error:  # a third-party kernel: report it and time the rest
            print(f"bf16_compiled_fused_ce left out: {type(error).__name__}: {error}")
            return cases, checks_report(checks)

        def fused_step() -> None:
            fused_ce_loss(trunk, bf16.lm_head, batch, loss_fn).backward()
            bf16.zero_grad(set_to_none=True)

        cases["bf16_compiled_fused_ce"] = fused_step
    model.zero_grad(set_to_none=True)
    bf16.zero_grad(set_to_none=True)
    for name, (loss, reference) in checks.items():
        # bf16 weights round differently from autocast; a wrong splice or a dropped loss term moves the loss far more
        if not math.isclose(loss, reference, rel_tol=2e-2):
            raise RuntimeError(f"{name}: loss {loss:.5f}, its eager twin {reference:.5f}")
    return cases, checks_report(checks)


def checks_report(checks: dict) -> dict:
    return {name: {"loss": loss, "eager_loss": reference} for name, (loss, reference) in checks.items()}


def measure_memory(
    model, shapes: GpuShapes, device: torch.device, autocast, counts=(1, 2, 4, 8)
) -> list[dict[str, object]]:
    """Peak memory of one step (GiB above the memory held before it) per volumes per sample, ± checkpointing."""
    rows = []
    for checkpointing in (False, True):
        set_activation_checkpointing(model, checkpointing)
        for count in counts:
            batch = make_batch(shapes, [count] * shapes.batch_size, count, device)
            row = {"volumes_per_sample": count, "checkpointing": checkpointing}
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                with autocast():
                    native_step(model, batch)
                synchronize(device)
                # On the CPU (--tiny) this only exercises the code: there is no allocator peak to read.
                if device.type == "cuda":
                    row["step_peak_gib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**30
            except torch.OutOfMemoryError:
                model.zero_grad(set_to_none=True)
                row["step_peak_gib"] = "OOM"
            rows.append(row)
    set_activation_checkpointing(model, False)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, seconds; runs on the CPU too")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per step (default 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card")
    parser.add_argument("--skip-memory", action="store_true", help="skip the memory points")
    parser.add_argument(
        "--fast-cases", nargs="*", choices=FAST_CASES, default=list(FAST_CASES), help="fast-path cases (none: skip)"
    )
    parser.add_argument("--skip-loop", action="store_true", help="skip the hand-written loop's cases")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.json"))
    args = parser.parse_args(argv)

    shapes = TINY_SHAPES if args.tiny else GpuShapes()
    if args.batch_size:
        shapes = GpuShapes(**{**asdict(shapes), "batch_size": args.batch_size})
    repeats = args.repeats or (2 if args.tiny else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    started = time.perf_counter()
    model = build_model(shapes, device)
    slots = shapes.volumes_per_sample
    tight = make_batch(shapes, [slots] * shapes.batch_size, slots, device)
    mixed_counts = [max(1, slots - i % slots) for i in range(shapes.batch_size)]
    mixed = make_batch(shapes, mixed_counts, slots, device)
    batches = {
        "native": tight,
        "native_padded": pad_slots(tight, 2 * slots),
        "loop": tight,
        "native_mixed": mixed,
        "loop_mixed": mixed,
    }

    if args.skip_loop:
        batches = {name: batch for name, batch in batches.items() if not name.startswith("loop")}

    def case(name: str):
        step = loop_step if name.startswith("loop") else native_step

        def run() -> None:
            with autocast():
                step(model, batches[name])

        return run

    variants = {name: case(name) for name in batches}
    fast_checks = {}
    if args.fast_cases:
        fast, fast_checks = fast_cases(model, tight, device, autocast, args.fast_cases)
        for name, step in fast.items():
            batches[name], variants[name] = tight, step
    times = timed(variants, repeats=repeats, warmup=warmup, device=device)
    peak, card = peak_tflops(device, args.peak_tflops)
    rows = []
    for name, batch in batches.items():
        seconds = statistics.median(times[name])
        flops = model_flops(model, batch)
        baseline = {"native_padded": "native", "loop": "native", "loop_mixed": "native_mixed"}.get(name)
        if name in fast_checks or name == "bf16":
            baseline = "native"
        rows.append(
            {
                "case": name,
                "volumes": int(batch["image_mask"].sum()),
                "slots": int(batch["image_mask"].numel()),
                "step_ms": 1000 * seconds,
                "samples_per_s": shapes.batch_size / seconds,
                "text_tokens_per_s": float(batch["attention_mask"].sum()) / seconds,
                "vision_tokens_per_s": int(batch["image_mask"].sum()) * shapes.tokens_per_volume / seconds,
                "model_tflops_per_s": flops / seconds / 1e12,
                "mfu": None if peak is None else flops / seconds / (peak * 1e12),
                "time_vs": None if baseline is None else f"{paired_ratio(times, name, baseline):.3f}× {baseline}",
            }
        )
    memory = [] if args.skip_memory else measure_memory(model, shapes, device, autocast)
    report = {
        "device": card,
        "peak_bf16_tflops": peak,
        "torch": torch.__version__,
        "shapes": asdict(shapes),
        "parameters": sum(p.numel() for p in model.parameters()),
        "repeats": repeats,
        "warmup": warmup,
        "results": rows,
        "compiled_loss_checks": fast_checks,
        "memory": memory,
        "seconds": time.perf_counter() - started,
    }
    print(
        f"\n{card}, torch {torch.__version__}, {report['parameters'] / 1e6:.0f} M parameters, batch "
        f"{shapes.batch_size} × {slots} volumes of {shapes.volume_size}³ ({shapes.tokens_per_volume} tokens each), "
        f"bf16 autocast, SDPA, median of {repeats}\n"
    )
    columns = ["case", "volumes", "slots", "step_ms", "samples_per_s", "text_tokens_per_s", "vision_tokens_per_s"]
    print(format_table(rows, columns + ["model_tflops_per_s", "mfu", "time_vs"]))
    if memory:
        print("\n" + format_table(memory, ["volumes_per_sample", "checkpointing", "step_peak_gib"]))
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
