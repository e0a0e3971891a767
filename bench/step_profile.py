"""Where a training step of instructflow's train stage goes: step times per setting, and torch.profiler's
tables of a few steps (host time per op and device time per kernel; on a GPU, the kernels' own time a step
against the step's wall time).

    python -m bench.step_profile --model DIR [--model-shape smollm2-135m] --data rows.jsonl \
        --batch 64 256 --variant default no_fused [--method full lora] --out DIR

It runs the train stage's own pieces (build_setup, BatchPlanner, train_step, optimiser_step) in the loop
train() runs, without checkpoints, logging or held-out evaluation. Variants: default (the settings' defaults),
no_fused (train.advanced.fused_kernels: false), plain (train.advanced.fast_path: false).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench import data as bench_data
from bench import models as bench_models

SHOWN = ("path", "attention", "loss", "precision_mode")
VARIANTS = {"default": {}, "no_fused": {"fused_kernels": False}, "plain": {"fast_path": False}}


def run(model_dir: Path, train_path: Path, *, method: str, batch: int, micro_batch: int, variant: str,
        steps: int, warm: int, profile_steps: int, trace: Path | None) -> dict:
    from instructflow import precision as precisions
    from instructflow.batching import BatchPlanner
    from instructflow.config import train_settings
    from instructflow.examples import Examples
    from instructflow.train import ResponseLoss, build_setup, optimiser_step, start_accelerator, train_step

    settings = train_settings({"method": method, "batch_size": batch, "micro_batch_size": micro_batch,
                               "max_steps": steps + profile_steps, "advanced": VARIANTS[variant]})
    accelerator = start_accelerator()
    device = accelerator.device
    precision = precisions.resolve(settings["precision"], device)
    torch.manual_seed(settings["seed"])
    examples = Examples.load(train_path)
    setup = build_setup(settings, model_dir, device, precision, longest_row=int(examples.lengths.max()))
    planner = BatchPlanner(examples, batch_size=batch, micro_batch_size=micro_batch, world_size=1,
                           seed=settings["seed"], pack=setup.packing)
    wrapped = accelerator.prepare(ResponseLoss(setup))
    wrapped.train()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one(step: int) -> tuple[float, int]:
        sync()
        t0 = time.perf_counter()
        loss, tokens = train_step(setup, wrapped, accelerator, examples, planner.step(step))
        optimiser_step(setup, loss, step, settings["max_grad_norm"], Path("."))
        sync()
        return time.perf_counter() - t0, tokens

    timed = [one(step) for step in range(steps)][warm:]
    seconds = statistics.median(s for s, _ in timed)
    tok_s = statistics.median(t / s for s, t in timed)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for step in range(steps, steps + profile_steps):
            one(step)
    events = prof.key_averages()
    # Kernels only, as the profiler's own "Self CUDA time total" counts them (ops carry their kernels' time too).
    device_us = sum(e.self_device_time_total for e in events
                    if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    return {"seconds": seconds, "tok_s": tok_s, "tokens_per_step": statistics.median(t for _, t in timed),
            "device_seconds": device_us / 1e6 / profile_steps if device_us else None,
            "launches_per_step": launches / profile_steps, "applied": setup.summary(),
            "by_host": events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60),
            "by_device": events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60)
            if device.type == "cuda" else ""}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a save_pretrained folder (with --model-shape: "
                                                                  "only its tokenizer is read)")
    parser.add_argument("--model-shape", choices=sorted(bench_models.CONFIGS))
    parser.add_argument("--data", type=Path, required=True, help="an instruction file the clean stage reads")
    parser.add_argument("--out", type=Path, default=Path("bench/out/step_profile"))
    parser.add_argument("--method", nargs="+", default=["full"], choices=["full", "lora"])
    parser.add_argument("--batch", nargs="+", type=int, default=[64])
    parser.add_argument("--micro-batch", type=int, help="default: the batch (one micro-batch a step)")
    parser.add_argument("--variant", nargs="+", default=["default"], choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--trace", action="store_true", help="write a Chrome trace of the first setting's profile")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model
    if args.model_shape:
        model_dir = bench_models.build(args.model_shape, args.out / "models", model_dir)
    built = bench_data.build(args.out / "data", model_dir, args.data.resolve())
    first = True
    for method in args.method:
        for variant in args.variant:
            for batch in args.batch:
                name = f"{method} {variant} batch {batch}"
                r = run(model_dir, built["train"], method=method, batch=batch, micro_batch=args.micro_batch or batch,
                        variant=variant, steps=args.steps, warm=args.warm, profile_steps=args.profile_steps,
                        trace=args.out / "trace.json" if args.trace and first else None)
                busy = f", kernels {r['device_seconds']:.4f} s a step" if r["device_seconds"] is not None else ""
                print(f"\n=== {name}: {r['seconds']:.4f} s a step, {r['tok_s']:.0f} non-pad tok/s "
                      f"({r['tokens_per_step']} tokens a step){busy}, {r['launches_per_step']:.0f} kernel launches a step; "
                      + ", ".join(f"{k}: {r['applied'].get(k)}" for k in SHOWN), flush=True)
                if first:
                    print(r["by_host"], r["by_device"], sep="\n", flush=True)
                first = False


if __name__ == "__main__":
    main()
