"""Inference at the llava-interleave-qwen-0.5b shapes on one GPU: `python -m benchmarks.gpu_generation`.

The same random model as `benchmarks.gpu` (Qwen2-0.5B LM, SigLIP so400m tower, 96³ volumes in 16³ patches = 216
tokens per volume), in bf16 weights with fp32 volumes, eval mode, SDPA. Three parts:

    prefill    peak memory of the prompt's forward with 4 volumes per sample, logits for every position
               (`logits_to_keep=0`, what the forward computed before it named the argument) against the last position
               only (`logits_to_keep=1`, what `generate()` asks for now), and of `generate(max_new_tokens=1)` itself;
               batch 1 and 4. `torch.cuda.max_memory_allocated` above what the model and inputs hold.
    decode     greedy `generate()` of 64 new tokens after that prompt (batch 1): the dynamic cache in eager mode
               against `cache_implementation="static"` with `CompileConfig(fullgraph=True)` (the decoding step compiled
               in one graph). Median of 3 calls each after one warm-up call (the compiled warm-up is the compile time);
               tokens equal between the two.
    attention  one training step (forward + backward, bf16 autocast, fp32 weights, batch 2 × 4 volumes) under SDPA's
               own choice of kernel and with SDPA forced onto its flash kernel (both towers run without a mask:
               full attention in the vision tower, causal in the LM), losses compared; and whether transformers'
               `flash_attention_2` (the flash-attn package) is installed there to compare against.

`--tiny` runs the same code with tiny sizes on the CPU (a smoke test; no memory figures there).
Writes JSON to `--out` (default `benchmarks/results/gpu_generation.json`) and prints tables.
"""

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import CompileConfig
from transformers.utils import is_flash_attn_2_available

from .common import build_umbrella, format_table, interleaved_timings, synchronize, write_report
from .gpu import TINY_SHAPES, GpuShapes, make_batch

VOLUMES_PER_SAMPLE = 4


def _peak_above(device: torch.device, run) -> float | str | None:
    """GiB `run()` allocates at its peak above what was held before it; "OOM" if it runs out of memory."""
    if device.type != "cuda":
        run()
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        run()
    except torch.OutOfMemoryError:
        return "OOM"
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def prompt_inputs(shapes: GpuShapes, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A generation prompt: the text before the answer, with `VOLUMES_PER_SAMPLE` volume blocks per sample."""
    batch = make_batch(shapes, [VOLUMES_PER_SAMPLE] * batch_size, VOLUMES_PER_SAMPLE, device)
    del batch["labels"]
    return batch


def measure_prefill(model, shapes: GpuShapes, device: torch.device) -> list[dict]:
    rows = []
    for batch_size in (1, 4):
        inputs = prompt_inputs(shapes, batch_size, device)
        prompt_tokens = int(inputs["attention_mask"].sum())
        for case, run, kwargs in [
            ("forward, logits_to_keep=0", model, {"use_cache": True, "logits_to_keep": 0}),
            ("forward, logits_to_keep=1", model, {"use_cache": True, "logits_to_keep": 1}),
            ("generate(max_new_tokens=1)", model.generate, {"max_new_tokens": 1, "do_sample": False}),
        ]:
            with torch.inference_mode():
                peak = _peak_above(device, lambda: run(**inputs, **kwargs))  # noqa: B023 (called at once)
            rows.append({"batch": batch_size, "prompt_tokens": prompt_tokens, "case": case, "peak_gib": peak})
    return rows


def measure_decode(model, shapes: GpuShapes, device: torch.device, new_tokens: int, repeats: int) -> dict:
    inputs = prompt_inputs(shapes, 1, device)
    common = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    compile_config = CompileConfig(fullgraph=True)
    if device.type != "cuda":
        compile_config = CompileConfig(fullgraph=True, backend="eager")
        compile_config._compile_all_devices = True
    cases = {
        "dynamic cache, eager": dict(common),
        "static cache, compiled (fullgraph)": dict(
            common, cache_implementation="static", compile_config=compile_config
        ),
    }
    rows, tokens = [], {}
    for name, kwargs in cases.items():
        with torch.inference_mode():
            synchronize(device)
            start = time.perf_counter()
            tokens[name] = model.generate(**inputs, **kwargs)
            synchronize(device)
            first = time.perf_counter() - start
            seconds = []
            for _ in range(repeats):
                synchronize(device)
                start = time.perf_counter()
                model.generate(**inputs, **kwargs)
                synchronize(device)
                seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds)
        rows.append(
            {
                "case": name,
                "first_call_s": first,
                "median_s": median,
                "new_tokens_per_s": new_tokens / median,
            }
        )
    eager, compiled = tokens.values()
    agreement = float((eager[:, -new_tokens:] == compiled[:, -new_tokens:]).float().mean())
    return {"rows": rows, "token_agreement": agreement, "new_tokens": new_tokens, "prompt_volumes": 4}


def measure_attention(shapes: GpuShapes, device: torch.device, repeats: int) -> dict:
    report = {"flash_attention_2_installed": is_flash_attn_2_available()}
    if device.type != "cuda":
        report["sdpa_flash"] = "not measured on the CPU"
        return report
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.device(device):
        model = build_umbrella(shapes, attn_implementation="sdpa")
    batch = make_batch(shapes, [VOLUMES_PER_SAMPLE] * 2, VOLUMES_PER_SAMPLE, device)
    del batch["attention_mask"]  # no padding: SDPA's flash kernel takes no explicit mask
    losses = {}

    def step(backend):
        def run():
            context = sdpa_kernel([backend]) if backend is not None else nullcontext()
            with context, torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**batch).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            losses[backend] = float(loss.detach())

        return run

    try:
        times = interleaved_timings(
            {"sdpa (its own choice)": step(None), "sdpa flash kernel forced": step(SDPBackend.FLASH_ATTENTION)},
            repeats=repeats,
            warmup=1,
            device=device,
        )
    except RuntimeError as error:  # the forced kernel refused an input
        report["sdpa_flash"] = f"refused: {error}"
        return report
    report["sdpa_flash"] = {name: {"step_ms": 1000 * statistics.median(values)} for name, values in times.items()}
    report["loss_sdpa"], report["loss_flash"] = losses[None], losses[SDPBackend.FLASH_ATTENTION]
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, seconds; runs on the CPU too")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["prefill", "decode", "attention"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_generation.json"))
    args = parser.parse_args(argv)

    shapes = TINY_SHAPES if args.tiny else GpuShapes()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    report.update(torch=torch.__version__, shapes=asdict(shapes))
    with torch.device(device):
        model = build_umbrella(shapes, attn_implementation="sdpa").to(torch.bfloat16).eval()
    model.generation_config.pad_token_id = 0
    if "prefill" not in args.skip:
        report["prefill"] = measure_prefill(model, shapes, device)
        print(format_table(report["prefill"], ["batch", "prompt_tokens", "case", "peak_gib"]), flush=True)
    if "decode" not in args.skip:
        report["decode"] = measure_decode(model, shapes, device, args.new_tokens, args.repeats)
        print(format_table(report["decode"]["rows"], ["case", "first_call_s", "median_s", "new_tokens_per_s"]))
        print(f"greedy tokens equal in {100 * report['decode']['token_agreement']:.0f} % of positions", flush=True)
    del model
    if "attention" not in args.skip:
        report["attention"] = measure_attention(shapes, device, args.repeats)
        print(json.dumps(report["attention"], indent=1), flush=True)
    report["seconds"] = time.perf_counter() - started
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
