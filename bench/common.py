"""Helpers shared by the benchmark's processes: memory, the matmul peak, step statistics."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from instructflow.device import peak_rss_mib  # noqa: F401  (re-exported for the systems)

IGNORE_INDEX = -100


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def matmul_peak(dtype: torch.dtype, device: str = "cpu", n: int | None = None, repeats: int = 9) -> float:
    """Median FLOP/s of an n x n x n matmul on random data, warm: the ceiling MFU is measured against.
    n: 2048 on a CPU; 8192 on a GPU, where a 2048 matmul takes tens of microseconds and the timing
    overhead would understate the peak (and overstate MFU)."""
    n = n or (8192 if device == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # the first calls pick kernels and fault in memory
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


class Peaks:
    """The matmul peak of each precision over a run: measured at the start and again after each system (``measure``),
    while no system runs. ``best`` is the highest of them: a measurement that another process or a slow spell of
    a shared machine held down would understate the peak and overstate every MFU against it (one run's start
    measured 143 GFLOP/s in bf16 where this machine's steady peak was ~420)."""

    def __init__(self, device: str, bf16: bool):
        self.device, self.samples = device, {"bf16": [], "fp32": []}
        # bf16's peak only where bf16 trains: without native bf16 its matmuls are emulated (with AVX2 kernels
        # only, the eleven 2048^3 bf16 matmuls had not finished after 5 minutes).
        self.precisions = ("bf16", "fp32") if bf16 else ("fp32",)
        self.measure()

    def measure(self) -> None:
        for name in self.precisions:
            self.samples[name].append(matmul_peak({"bf16": torch.bfloat16, "fp32": torch.float32}[name], self.device))

    def best(self) -> dict[str, float | None]:
        """FLOP/s by precision (None for a precision not measured)."""
        return {name: max(values) if values else None for name, values in self.samples.items()}


def step_stats(steps: list[dict], warm: int) -> dict:
    """Median per-step rates over the steps after the first ``warm``; each step dict has
    seconds, nonpad (tokens of real rows) and trained (tokens with a loss on the response)."""
    timed = steps[warm:]
    if not timed:
        raise ValueError(f"only {len(steps)} steps, none left after {warm} warm-up steps")
    return {
        "steps_timed": len(timed),
        "step_seconds_median": statistics.median(s["seconds"] for s in timed),
        "nonpad_tok_s": statistics.median(s["nonpad"] / s["seconds"] for s in timed),
        "trained_tok_s": statistics.median(s["trained"] / s["seconds"] for s in timed),
        "padded_tokens_per_step": statistics.median(s.get("computed", s["nonpad"]) for s in timed),
        "nonpad_tokens_per_step": statistics.median(s["nonpad"] for s in timed),
        "trained_tokens_per_step": statistics.median(s["trained"] for s in timed),
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
