"""bf16 autocast only where the CPU has bf16 instructions: AVX512 alone emulates bf16 (slower than fp32)."""

from __future__ import annotations

import torch

from instructflow import device


def test_cpu_bf16_follows_the_bf16_instruction_flags(monkeypatch):
    monkeypatch.setattr(device, "_cpu_flags", lambda: {"avx512f", "avx512bw", "avx512_bf16"})
    assert device._cpu_has_bf16_hardware()
    monkeypatch.setattr(device, "_cpu_flags", lambda: {"avx512f", "amx_tile", "amx_bf16"})
    assert device._cpu_has_bf16_hardware()
    # AVX512 without bf16 instructions, and torch's own probes agreeing: stay in fp32.
    monkeypatch.setattr(device, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512bw", "avx512vl"})
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not device._cpu_has_bf16_hardware()
    device._cpu_bf16_works.cache_clear()
    try:
        assert not device.bf16_supported("cpu")
    finally:
        device._cpu_bf16_works.cache_clear()


def test_autocast_is_a_no_op_when_disabled():
    with device.autocast("cpu", enabled=False):
        out = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert out.dtype == torch.float32


def test_without_cuda_everything_falls_back_to_the_cpu(monkeypatch):
    """The CUDA-only choices: no GPU means the CPU, no bf16 "on cuda", and never FlashAttention, even
    with the flash_attn package importable (its kernels are CUDA-only)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device.importlib.util, "find_spec", lambda name, *a, **k: object())
    assert device.pick_device() == torch.device("cpu")
    assert not device.bf16_supported("cuda")
    assert device.attention_kernel() is None
