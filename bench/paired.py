"""Fused against unfused kernels, step by step in one process: each step runs both ways (order
alternating), so the machine's drift between bench rows cancels out.

    python -m bench.paired [--steps 14]   (after `make bench`, which leaves the model and token cache in bench/out)

Start it as the train rule starts training (LD_PRELOAD=$(python -m instructflow.kernels.allocator)) to compare
like for like. The learning rate is tiny so both runs of a step see nearly the same weights.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from instructflow import precision as precisions
from instructflow.batching import BatchPlanner
from instructflow.config import train_settings
from instructflow.examples import Examples
from instructflow.kernels import fused
from instructflow.train import ResponseLoss, build_setup, start_accelerator, train_step

from .common import usable_cores

OUT = Path(__file__).resolve().parent / "out"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--model", type=Path, default=OUT / "model")
    parser.add_argument("--train", type=Path, default=OUT / "data" / "train.safetensors")
    args = parser.parse_args(argv)
    torch.set_num_threads(usable_cores())
    accelerator = start_accelerator()
    examples = Examples.load(args.train)
    # The train stage's own setup and step (train.build_setup, train.train_step); a tiny learning rate so
    # both runs of a step see nearly the same weights.
    settings = train_settings({"method": "full", "learning_rate": 1e-7})
    setup = build_setup(settings, args.model, accelerator.device, precisions.resolve("auto", accelerator.device),
                        longest_row=int(examples.lengths.max()))
    wrapped = ResponseLoss(setup).train()
    planner = BatchPlanner(examples, batch_size=settings["batch_size"], micro_batch_size=settings["micro_batch_size"],
                           world_size=1, seed=settings["seed"], pack=setup.packing)

    def step(index: int) -> tuple[float, int]:
        plan = planner.step(index)
        start = time.perf_counter()
        _, tokens = train_step(setup, wrapped, accelerator, examples, plan)
        setup.precision.step(settings["max_grad_norm"])
        return time.perf_counter() - start, tokens
    for on in (True, False):  # warm-up: compiling, oneDNN's kernels, the allocator's pools
        fused.enable(on)
        step(0)
    ratios = []
    for index in range(1, args.steps + 1):
        seconds = {}
        for on in ((True, False) if index % 2 else (False, True)):
            fused.enable(on)
            seconds[on], tokens = step(index)
        ratios.append(seconds[False] / seconds[True])
        print(f"step {index}: {tokens} tokens, fused {tokens / seconds[True]:.1f} tok/s, unfused "
              f"{tokens / seconds[False]:.1f} tok/s, ratio {ratios[-1]:.3f}", flush=True)
    faster = sum(r > 1 for r in ratios)
    print(f"fused / unfused speed: median {statistics.median(ratios):.3f} over {len(ratios)} paired steps "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}; fused faster in {faster})")


if __name__ == "__main__":
    main()
