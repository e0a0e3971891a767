"""Where to run and in which precision: CUDA if present, else CPU; bf16 only where the
hardware does it natively (CUDA with bf16 support, or a CPU with AVX512-BF16 or AMX instructions).
AVX512 alone is not enough: without those instructions bf16 matmuls are emulated and slower than
fp32, so we stay in fp32."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import resource
from pathlib import Path

import torch


def peak_rss_mib(status: Path = Path("/proc/self/status")) -> float:
    """This process's peak resident memory in MiB: Linux's VmHWM where there is one. Not ru_maxrss, which
    survives fork + exec, so a trainer started by accelerate's launcher (or the bench) would report at least
    its parent's RSS at the time it was started."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def _cpu_has_bf16_hardware() -> bool:
    """bf16 dot-product instructions, per the CPU's flags or, where /proc/cpuinfo is missing (macOS,
    Windows), per torch's own cpuinfo. (oneDNN's "bf16 supported" is no test: it says yes for any
    AVX512 CPU, where it emulates bf16.)"""
    if any(flag in _cpu_flags() for flag in CPU_BF16_FLAGS):
        return True
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(probe()) for probe in probes if probe is not None)


@functools.lru_cache(maxsize=None)
def _cpu_bf16_works() -> bool:
    if not _cpu_has_bf16_hardware():
        return False
    try:
        a = torch.randn(8, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.nn.functional.linear(a, a)
        return out.dtype == torch.bfloat16 and bool(torch.isfinite(out.float()).all())
    except Exception:  # noqa: BLE001 - any failure means "don't use it"
        return False


def attention_kernel() -> str | None:
    """FlashAttention-2 on CUDA where the flash_attn package is installed (its varlen kernels run
    packed rows without any mask); else None, transformers' default: PyTorch SDPA where the
    architecture has it (flash/efficient kernels on GPU and CPU; packed position ids give it a
    block-diagonal mask), eager attention where not."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


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
