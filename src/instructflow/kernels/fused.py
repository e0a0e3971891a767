"""The elementwise chains of a training step, each fused into one kernel by torch.compile.

Between the matrix multiplies of a step sit chains of elementwise work: RMSNorm's fp32 round trip and
its backward, SwiGLU's activation and its backward, the cross-entropy's softmax over 49k logits; after
them the optimiser's update, a chain per parameter (kahan.py). In
eager PyTorch every link of a chain is a pass over memory (RMSNorm's backward alone is a dozen), and
on a 2-core CPU those passes were about a fifth of a step. Compiled by inductor, each chain is one
loop (RMSNorm backward: 4.2 ms -> 0.24 ms for 900 tokens of SmolLM2); the same functions run eagerly
where compiling is turned off or cannot work (no C++ compiler, no Triton on a GPU), with a warning.

Compiled kernels keep bf16 intermediates in fp32 (eager PyTorch rounds each to bf16), so their results
differ from the eager forms' in the last bits: more precise, not the same (the optimiser's kernel, whose
Kahan compensation must see the exact rounding, asks inductor to round as eager code does). Every
function here is plain tensor math without autograd: the autograd Functions of lean_layers.py, loss.py
and attention.py (and kahan.py's optimiser) call them from their forward and backward passes, so
inductor compiles inference graphs only. Shapes are marked dynamic, so packed micro-batches of ever-new
lengths reuse one kernel.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch
import torch.nn.functional as F

_enabled = True  # kernels.apply sets it from `train.advanced.fused_kernels`
_functions: list["_Fused"] = []


def enable(on: bool) -> None:
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def unfused():
    """Run the eager forms inside the block (lean_layers checks its math against a module's this way)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def report() -> dict[str, str]:
    """How each function has run in this process: compiled, eager (compiling failed or was off) or
    unused; for the train summary."""
    return {f.eager.__name__: "compiled" if f.compiled is not None and not f.failed else
            "eager" if f.failed or f.calls else "unused" for f in _functions}


def separate_cache_by_cpu() -> None:
    """Keep inductor's compiled kernels apart per CPU instruction set: a kernel that inductor compiled for one
    (AVX2, say) and later loaded from its cache into a process that vectorises for another (AVX-512) corrupted
    the heap ("double free or corruption" inside a training step; reproduced with ATEN_CPU_CAPABILITY=avx2,
    torch 2.13). The default cache folder gets one subfolder per ATen CPU capability and set of CPU flags; a
    TORCHINDUCTOR_CACHE_DIR the user chose elsewhere is left as it is. (Inductor writes its default folder into
    that variable the first time it looks for it, so the default counts as not chosen.)"""
    import hashlib

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from ..device import _cpu_flags

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is not None and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return
    capability = torch.backends.cpu.get_cpu_capability().lower()
    flags = hashlib.sha256(" ".join(sorted(_cpu_flags())).encode()).hexdigest()[:8]
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default_cache_dir(), f"instructflow-{capability}-{flags}")


class _Fused:
    """A function that runs compiled once compiling it has worked, and eagerly if compiling is off or
    failed (the failure is reported once, then the eager form is kept for the rest of the process)."""

    def __init__(self, fn, options: dict | None = None):
        self.eager = fn
        self.options = options
        self.compiled = None
        self.failed = False
        self.calls = 0
        functools.update_wrapper(self, fn)
        _functions.append(self)

    def __call__(self, *args):
        self.calls += 1
        if not _enabled or self.failed:
            return self.eager(*args)
        if self.compiled is None:
            import torch._inductor.config

            separate_cache_by_cpu()
            if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
                # These kernels are small: a pool of compile workers takes longer to start than it saves.
                torch._inductor.config.compile_threads = 1
            self.compiled = torch.compile(self.eager, dynamic=True, fullgraph=True, options=self.options)
        try:
            return self.compiled(*args)
        except Exception as err:  # noqa: BLE001 - a compiler failure (or too many recompiles): run unfused
            self.failed = True
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            warnings.warn(f"instructflow: cannot compile {self.eager.__name__} ({type(err).__name__}: {first_line}); "
                          "it runs unfused from here on, which is slower. Set train.advanced.fused_kernels: false to skip "
                          "compiling.", RuntimeWarning, stacklevel=2)
            return self.eager(*args)

    def reset(self) -> None:
        """Forget compiling (tests: a fresh process's state)."""
        self.compiled, self.failed, self.calls = None, False, 0


def reset() -> None:
    torch._dynamo.reset()
    for f in _functions:
        f.reset()


@_Fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """weight * (x / rms(x)), normalised in fp32 and rounded to x's dtype before the weight (as
    transformers' RMSNorm computes it); and 1/rms, fp32, one per row."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


@_Fused
def rms_norm_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of rms_norm's output with respect to x and weight."""
    xf = x.float()
    normed = (xf * rstd).to(x.dtype).float()
    grad_weight = (grad_out.float() * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    grad_normed = (grad_out * weight).float()
    # d/dx of x * rstd(x): rstd * (g - x * rstd^2 * mean(g * x))
    dot = (grad_normed * xf).mean(-1, keepdim=True)
    grad_x = ((grad_normed - xf * (rstd * rstd * dot)) * rstd).to(x.dtype)
    return grad_x, grad_weight


@_Fused
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return F.silu(gate) * up


@_Fused
def swiglu_backward(grad_product: torch.Tensor, gate: torch.Tensor,
                    up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Given the gradient of silu(gate) * up: that product again (the down projection's input, for its
    weight's gradient), and the gradients of gate and up."""
    act = F.silu(gate)
    return act * up, torch.ops.aten.silu_backward(grad_product * up, gate), grad_product * act


@_Fused
def cross_entropy_chunk(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For logits [rows, vocabulary] and integer targets [rows]: the summed cross-entropy (fp32); the
    logits are overwritten, in place, with their gradient (softmax minus one-hot, in their dtype). In place,
    so a chunk's logits, written straight into the gradient buffer by the matmul, need no buffer of their
    own, no fp32 copy of the gradient and no copy into the buffer. The chunked forward of
    kernels/linear_cross_entropy.py for SmolLM2's 49k vocabulary, 2-core CPU: 32 -> 22 ms per 100 rows in
    bf16, 65 -> 54 in fp32, the same bits."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    loss = (lse - z.gather(1, targets[:, None])).sum()
    target = torch.arange(z.shape[-1], device=z.device) == targets[:, None]
    logits.copy_((z - lse).exp_().sub_(target.float()))
    return loss


@_Fused
def causal_softmax(scores: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scores * scale) over the last dimension with every key after its query masked out, for
    scores [..., L, L]; computed in fp32, returned in the scores' dtype."""
    length = scores.shape[-1]
    positions = torch.arange(length, device=scores.device)
    future = positions[None, :] > positions[:, None]
    z = (scores.float() * scale).masked_fill(future, float("-inf"))
    return torch.softmax(z, dim=-1).to(scores.dtype)


@_Fused
def causal_softmax_backward(grad_probs: torch.Tensor, probs: torch.Tensor, scale: float) -> torch.Tensor:
    """The gradient of causal_softmax's scores given its output's (masked keys get zero: their
    probabilities are)."""
    p, g = probs.float(), grad_probs.float()
    return (scale * p * (g - (g * p).sum(-1, keepdim=True))).to(probs.dtype)


@functools.partial(_Fused, options={"emulate_precision_casts": True})
def kahan_adamw(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                kahan_comp: torch.Tensor, hyper: torch.Tensor) -> None:
    """One AdamW step without weight decay for a bf16 parameter whose lost low bits are kept in
    ``kahan_comp`` (optimi's Kahan-summed AdamW), in place: one pass over the five tensors, where
    optimi's per-tensor loop makes about ten. ``hyper`` holds [lr, 1 - beta1_hat, beta2_hat,
    1 - beta2_hat, eps, grad_scale] (optimi's debiased betas; the clipping's scale of the gradient) as an fp32
    tensor, so a new learning rate, step or scale is new data, not a recompile.

    The compensation keeps exactly what rounding the new weight to bf16 lost, so the compiled kernel must
    round as eager code does (``emulate_precision_casts``): without it inductor keeps the rounded weight in
    fp32 and the compensation cancels the update. The moments are rounded once, at the end, where optimi
    rounds after each operation."""
    lr, beta1_comp, beta2_hat, beta2_comp, eps, grad_scale = hyper[0], hyper[1], hyper[2], hyper[3], hyper[4], hyper[5]
    g = grad.float() * grad_scale
    m = exp_avg.float().lerp(g, beta1_comp).to(exp_avg.dtype)
    v = (exp_avg_sq.float() * beta2_hat + beta2_comp * g * g).to(exp_avg_sq.dtype)
    comp = kahan_comp.float() - lr * m.float() / (v.float().sqrt() + eps)
    old = param.float()
    new = (old + comp).to(param.dtype)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    kahan_comp.copy_((comp + (old - new.float())).to(kahan_comp.dtype))
    param.copy_(new)
