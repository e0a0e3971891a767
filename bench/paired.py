"""One piece of the fast path on against off, step by step in one process: each step runs both ways (order
alternating), so the machine's drift between bench rows cancels out.

    python -m bench.paired [--piece fused_kernels] [--steps 14]   (after `make bench`, which leaves the model
    and token cache in bench/out)

Pieces: fused_kernels (train.advanced.fused_kernels), loss (the fused linear + cross-entropy against the
model's own logits), lean_layers (kernels/lean_layers.py against the stock RMSNorm and MLP), attention (the
row-by-row attention against the plain path's packed attention), embedding_gradient (a tied embedding's sparse
lookup gradient against the dense one). Start it as the train rule starts training
(LD_PRELOAD=$(python -m instructflow.kernels.allocator)) to compare like for like. The learning rate is tiny
so both runs of a step see nearly the same weights. `--precision fp32` on a bf16 CPU with
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2` set stands in for a CPU without
native bf16 (its kernels' code path, not its speed).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from instructflow import kernels
from instructflow import precision as precisions
from instructflow.batching import BatchPlanner
from instructflow.config import train_settings
from instructflow.examples import Examples
from instructflow.kernels import fused
from instructflow.loss import response_loss_sum
from instructflow.modeling import load_model
from instructflow.train import ResponseLoss, TrainingSetup, no_kwargs, plain_setup, start_accelerator, train_step

from .common import usable_cores

OUT = Path(__file__).resolve().parent / "out"
PIECES = ("fused_kernels", "loss", "lean_layers", "attention", "embedding_gradient")


def build(model_dir: Path, settings: dict, precision: str, longest_row: int,
          device=None) -> tuple[TrainingSetup, str]:
    """train.build_setup's setup (full fine-tuning), and the attention implementation the plain path runs."""
    model, attention = load_model(model_dir, device=device)
    setup = kernels.apply(plain_setup(model, attention, settings, precision), settings, longest_row=longest_row)
    return setup, attention.implementation


def switch(piece: str, setup: TrainingSetup, plain_attention: str):
    """A function that turns ``piece`` on or off and returns the setup a step then runs with."""
    model = setup.model
    lean = {m: vars(m)["forward"] for m in model.modules() if "forward" in vars(m)}  # what lean_layers.patch set
    fast_attention = model.config._attn_implementation

    def to(on: bool) -> TrainingSetup:
        if piece == "fused_kernels":
            fused.enable(on)
        elif piece == "lean_layers":
            for module, forward in lean.items():
                if on:
                    module.forward = forward
                else:
                    vars(module).pop("forward", None)
        elif piece == "attention":
            model.set_attn_implementation(fast_attention if on else plain_attention)
            return setup if on else dataclasses.replace(setup, forward_kwargs=no_kwargs)
        elif piece == "loss":
            return setup if on else dataclasses.replace(setup, loss=response_loss_sum)
        elif piece == "embedding_gradient":
            if setup.applied["embedding_gradient"] == "dense":
                raise SystemExit("this model's embedding gradient stays dense (not tied to the output layer)")
            model.get_input_embeddings().sparse = on
        return setup
    return to


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--model", type=Path, default=OUT / "model")
    parser.add_argument("--train", type=Path, default=OUT / "data" / "train.safetensors")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="train.precision")
    parser.add_argument("--piece", default="fused_kernels", choices=PIECES)
    args = parser.parse_args(argv)
    torch.set_num_threads(usable_cores())
    accelerator = start_accelerator()
    examples = Examples.load(args.train)
    # The train stage's own setup and step (train.train_step); a tiny learning rate so both runs of a step see
    # nearly the same weights.
    settings = train_settings({"method": "full", "learning_rate": 1e-7})
    precision = precisions.resolve(args.precision, accelerator.device)
    setup, plain_attention = build(args.model, settings, precision, int(examples.lengths.max()),
                                    accelerator.device)
    to = switch(args.piece, setup, plain_attention)
    wrapped = ResponseLoss(setup).train()
    planner = BatchPlanner(examples, batch_size=settings["batch_size"], micro_batch_size=settings["micro_batch_size"],
                           world_size=1, seed=settings["seed"], pack=setup.packing)

    def step(index: int, on: bool) -> tuple[float, int]:
        wrapped.setup = now = to(on)
        plan = planner.step(index)
        start = time.perf_counter()
        _, tokens = train_step(now, wrapped, accelerator, examples, plan)
        setup.precision.step(settings["max_grad_norm"])
        return time.perf_counter() - start, tokens
    for on in (True, False):  # warm-up: compiling, oneDNN's kernels, the allocator's pools
        step(0, on)
    ratios = []
    for index in range(1, args.steps + 1):
        seconds = {}
        for on in ((True, False) if index % 2 else (False, True)):
            seconds[on], tokens = step(index, on)
        ratios.append(seconds[False] / seconds[True])
        print(f"step {index}: {tokens} tokens, with {tokens / seconds[True]:.1f} tok/s, without "
              f"{tokens / seconds[False]:.1f} tok/s, ratio {ratios[-1]:.3f}", flush=True)
    faster = sum(r > 1 for r in ratios)
    print(f"{args.piece} ({precision}), with / without speed: median {statistics.median(ratios):.3f} over "
          f"{len(ratios)} paired steps (range {min(ratios):.2f}-{max(ratios):.2f}; faster with it in {faster})")


if __name__ == "__main__":
    main()
