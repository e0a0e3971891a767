"""Where to run and in which precision: CUDA if present, else CPU; bf16 autocast only where the
hardware does it natively (CUDA with bf16 support, or a CPU with AVX512 whose bf16 path works).
Without native support bf16 on CPU is emulated and slower than fp32, so we stay in fp32."""

from __future__ import annotations

import contextlib
import functools

import torch


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=None)
def _cpu_bf16_works() -> bool:
    capability = str(torch.backends.cpu.get_cpu_capability() or "")
    if "AVX512" not in capability.upper():
        return False
    try:
        a = torch.randn(8, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.nn.functional.linear(a, a)
        return out.dtype == torch.bfloat16 and bool(torch.isfinite(out.float()).all())
    except Exception:  # noqa: BLE001 - any failure means "don't use it"
        return False


def bf16_supported(device: torch.device | str | None = None) -> bool:
    device = torch.device(device) if device is not None else pick_device()
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_bf16_works()
    return False


def autocast(device: torch.device | str, enabled: bool | None = None):
    """bf16 autocast on ``device`` when supported (or when ``enabled`` forces it); otherwise a no-op."""
    device = torch.device(device)
    if enabled is None:
        enabled = bf16_supported(device)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
