"""The bench names the machine class its figures belong to: bf16 CPUs and fp32-only CPUs are never compared."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run import cpu_info  # noqa: E402

ZEN2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx avx2 fma\n"
ZEN4 = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: avx2 avx512f avx512_bf16 avx512vl\n"


def test_cpu_class_follows_native_bf16():
    assert cpu_info(ZEN2) == ("AMD EPYC 7B12", ["avx2"], "fp32 CPU")
    assert cpu_info(ZEN4) == ("AMD EPYC 9B14", ["avx2", "avx512f", "avx512_bf16"], "bf16 CPU")


def test_this_machine_is_classed_by_its_own_flags():
    text = Path("/proc/cpuinfo").read_text()
    _, flags, kind = cpu_info(text)
    assert (kind == "bf16 CPU") == ("avx512_bf16" in text.split() or "amx_bf16" in text.split())
    assert set(flags) <= set(text.split())
