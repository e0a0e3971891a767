"""fused.py: each compiled kernel computes what its eager form computes, at any length, and a machine
that cannot compile gets the eager forms with a warning instead of a failed training."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_COMPILER
from instructflow.kernels import fused

needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="torch.compile on the CPU needs a C++ compiler")


@pytest.fixture(autouse=True)
def fresh_compiler():
    # Training tests in this process compile the same functions for other models, dtypes and modes.
    fused.reset()
    yield
    fused.reset()


IN_PLACE = {"cross_entropy_chunk"}  # overwrites the logits with their gradient


def _cases(dtype: torch.dtype, tokens: int) -> dict:
    g = torch.Generator().manual_seed(tokens)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    x, w = r(1, tokens, 48), r(48)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    return {
        "rms_norm": (x, w, 1e-5),
        "rms_norm_backward": (r(1, tokens, 48), x, w, rstd),
        "swiglu": (r(1, tokens, 96), r(1, tokens, 96)),
        "swiglu_backward": (r(1, tokens, 96), r(1, tokens, 96), r(1, tokens, 96)),
        "cross_entropy_chunk": (r(tokens, 300) * 4, torch.randint(0, 300, (tokens,), generator=g)),
        "causal_softmax": (r(2, 3, tokens, tokens) * 8, 0.125),
        "causal_softmax_backward": (r(2, 3, tokens, tokens), torch.softmax(r(2, 3, tokens, tokens).float(), -1).to(dtype),
                                    0.125),
    }


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_agree_with_their_eager_forms_at_new_lengths(dtype):
    # fp32: the same math in another order; bf16: the compiled kernels skip eager's intermediate roundings.
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for tokens in (37, 5, 130):  # one compiled kernel serves every length (dynamic shapes)
        for name, args in _cases(dtype, tokens).items():
            fn = getattr(fused, name)
            got_args, want_args = ([a.clone() if torch.is_tensor(a) else a for a in args] for _ in range(2))
            got = fn(*got_args)
            with fused.unfused():
                want = fn(*want_args)
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            if name in IN_PLACE:  # what it wrote over its first argument is an output too
                got, want = (*got, got_args[0]), (*want, want_args[0])
            for a, b in zip(got, want):
                assert a.dtype == b.dtype and a.shape == b.shape, name
                scale = b.float().abs().max().clamp(min=1.0)
                torch.testing.assert_close(a.float() / scale, b.float() / scale, **tol, msg=name)
            assert fn.compiled is not None and not fn.failed, name
    assert {fused.report()[name] for name in _cases(dtype, 1)} == {"compiled"}


def test_eager_forms_compute_the_reference_math():
    """fp32 kernels against the math done by autograd in float64."""
    close = lambda got, want: torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)  # noqa: E731

    def ref_inputs(*shapes):
        return [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in shapes]

    with fused.unfused():
        x, w = ref_inputs((3, 7, 16), (16,))
        ref = w * x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        out, rstd = fused.rms_norm(x.detach().float(), w.detach().float(), 1e-6)
        close(out, ref)
        grad_out = torch.randn_like(ref)
        grad_x, grad_w = torch.autograd.grad(ref, (x, w), grad_out)
        got_x, got_w = fused.rms_norm_backward(grad_out.float(), x.detach().float(), w.detach().float(), rstd)
        close(got_x, grad_x)
        close(got_w, grad_w)

        gate, up = ref_inputs((4, 10), (4, 10))
        product = F.silu(gate) * up
        close(fused.swiglu(gate.detach().float(), up.detach().float()), product)
        grad_p = torch.randn_like(product)
        grad_gate, grad_up = torch.autograd.grad(product, (gate, up), grad_p)
        again, got_gate, got_up = fused.swiglu_backward(grad_p.float(), gate.detach().float(), up.detach().float())
        close(again, product.detach())
        close(got_gate, grad_gate)
        close(got_up, grad_up)

        (logits,) = ref_inputs((6, 11))
        targets = torch.randint(0, 11, (6,))
        loss = F.cross_entropy(logits, targets, reduction="sum")
        got_grad = logits.detach().float()
        close(fused.cross_entropy_chunk(got_grad, targets), loss.detach())
        close(got_grad, torch.autograd.grad(loss, logits)[0])

        (scores,) = ref_inputs((2, 3, 5, 5))
        future = torch.ones(5, 5, dtype=torch.bool).triu(1)
        probs = torch.softmax((scores * 0.5).masked_fill(future, float("-inf")), dim=-1)
        got = fused.causal_softmax(scores.detach().float(), 0.5)
        close(got, probs)
        assert torch.all(got[..., future] == 0)
        grad_probs = torch.randn_like(probs)
        close(fused.causal_softmax_backward(grad_probs.float(), got, 0.5), torch.autograd.grad(probs, scores, grad_probs)[0])


def test_without_a_compiler_training_kernels_warn_once_and_run_eagerly(tmp_path):
    # A real failure, not a mock: inductor is pointed at a C++ compiler that does not exist, with an
    # empty kernel cache so nothing compiled earlier can be loaded instead.
    script = textwrap.dedent("""
        import warnings, torch
        from instructflow.kernels import fused
        x, w = torch.randn(1, 9, 16), torch.randn(16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, _ = fused.rms_norm(x, w, 1e-5)
            again, _ = fused.rms_norm(x, w, 1e-5)
        with fused.unfused():
            want, _ = fused.rms_norm(x, w, 1e-5)
        assert torch.equal(out, want) and torch.equal(again, want)
        mine = [str(c.message) for c in caught if "instructflow" in str(c.message)]
        assert len(mine) == 1 and "cannot compile rms_norm" in mine[0], mine
        assert fused.report()["rms_norm"] == "eager" and fused.report()["swiglu"] == "unused"
        print("ok")
    """)
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_turned_off_nothing_is_compiled():
    fn = fused._Fused(lambda a: a * 2)
    fused.enable(False)
    try:
        assert torch.equal(fn(torch.ones(3)), torch.full((3,), 2.0))
        assert fn.compiled is None
    finally:
        fused.enable(True)
        fused._functions.remove(fn)


@needs_compiler
def test_kernels_compiled_for_another_instruction_set_are_never_loaded(tmp_path):
    """A kernel compiled under AVX2 and loaded into an AVX-512 process from inductor's cache corrupted the heap
    (torch 2.13): each CPU capability compiles into a folder of its own under the default cache; a
    TORCHINDUCTOR_CACHE_DIR the user set is used as it is."""
    script = textwrap.dedent("""
        import os, torch
        from instructflow.kernels import fused
        x, w = torch.randn(1, 9, 16), torch.randn(16)
        out, _ = fused.rms_norm(x, w, 1e-5)
        with fused.unfused():
            want, _ = fused.rms_norm(x, w, 1e-5)
        assert torch.allclose(out, want, atol=1e-5) and fused.report()["rms_norm"] == "compiled"
        print(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
    env["TMPDIR"] = str(tmp_path)  # inductor's default cache lives in the temporary folder

    def cache_dir(**extra) -> str:
        proc = subprocess.run([sys.executable, "-c", script], env={**env, **extra}, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.strip().splitlines()[-1]

    avx2, native = cache_dir(ATEN_CPU_CAPABILITY="avx2"), cache_dir()
    assert avx2 != native and "instructflow-avx2-" in avx2
    assert all(d.startswith(str(tmp_path)) and os.listdir(d) for d in (avx2, native))
    assert cache_dir(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "mine")) == str(tmp_path / "mine")
