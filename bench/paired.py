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

from instructflow.kernels import fused, lean_layers
from instructflow.batching import BatchPlanner, collate
from instructflow.config import train_settings
from instructflow.examples import Examples
from instructflow.kahan import optimizer_for
from instructflow.loss import response_loss_sum
from instructflow.train import build_model

from .common import usable_cores

OUT = Path(__file__).resolve().parent / "out"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--model", type=Path, default=OUT / "model")
    parser.add_argument("--train", type=Path, default=OUT / "data" / "train.safetensors")
    args = parser.parse_args(argv)
    torch.set_num_threads(usable_cores())
    examples = Examples.load(args.train)
    settings = train_settings({"method": "full"})
    model = build_model(args.model, settings, bf16_frozen=True)
    optimizer = optimizer_for(model, lr=1e-7, betas=(0.9, 0.95), weight_decay=0.0)
    lean_layers.patch(model)
    model.train()
    planner = BatchPlanner(examples, batch_size=settings["batch_size"], micro_batch_size=settings["micro_batch_size"],
                           world_size=1, seed=settings["seed"], pack=True)

    def step(index: int) -> tuple[float, int]:
        plan = planner.step(index)
        start = time.perf_counter()
        for rows in plan.micro_batches[0]:
            batch = collate(examples, rows, pack=True)
            loss, _ = response_loss_sum(model, batch["input_ids"], batch["labels"], batch["position_ids"],
                                        batch["seq_lens"])
            (loss / plan.trained_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, sum(int(examples.lengths[r]) for m in plan.micro_batches[0] for r in m)

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
