"""RMSNorm and SwiGLU MLP layers that keep less for the backward pass, swapped into a loaded model.

Activations saved for the backward pass are most of training's memory beyond the weights and optimiser
state. Per token and layer of SmolLM2-135M in bf16, transformers' RMSNorm keeps an fp32 copy of its
input and a bf16 copy of its normalised output, and its SwiGLU MLP keeps four intermediate-size
tensors (gate, up, silu(gate), and their product as the down projection's input). These versions keep
the bf16 input and one fp32 number per row (RMSNorm), and the input, gate and up projections (MLP), and
recompute the rest in the backward pass, which costs elementwise work only: 0.4 GB less for a packed
micro-batch of 1,233 tokens (1.19 GB saved by the stock layers). Liger-Kernel's RMSNorm and SwiGLU do
the same on GPUs with Triton kernels; these are plain PyTorch, for any device.

``patch(model)`` swaps a module's forward only after checking, on a random probe, that the lean version
computes what the module's own forward does, so architectures with other norms (Gemma's 1 + weight) or
MLPs (GELU, fused gate_up) keep their own. It is for a model that runs in its own dtype (bf16 with
Kahan-compensated updates or on fp32 masters, or fp32); under autocast the projections' dtypes are autocast's business, so
train.py does not patch then.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

from . import fused


class _RMSNorm(torch.autograd.Function):
    """weight * (x / rms(x)) in fp32, rounded to x's dtype before the weight, as transformers' RMSNorm
    computes it (the fused kernel skips that rounding: fused.py); saves x and 1/rms."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        out, rstd = fused.rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = fused.rms_norm_backward(grad_out, x, weight, rstd)
        return grad_x, grad_weight if ctx.needs_input_grad[1] else None, None


class _SwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) for bias-free projections; saves x, gate(x) and up(x)."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):
        gate, up = F.linear(x, w_gate), F.linear(x, w_up)
        ctx.save_for_backward(x, w_gate, w_up, w_down, gate, up)
        return F.linear(fused.swiglu(gate, up), w_down)

    @staticmethod
    def backward(ctx, grad_out):
        x, w_gate, w_up, w_down, gate, up = ctx.saved_tensors
        product, grad_gate, grad_up = fused.swiglu_backward(grad_out @ w_down, gate, up)
        flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
        grad_down = flat(grad_out).T @ flat(product) if ctx.needs_input_grad[3] else None
        grad_x = grad_gate @ w_gate + grad_up @ w_up if ctx.needs_input_grad[0] else None
        grad_w_gate = flat(grad_gate).T @ flat(x) if ctx.needs_input_grad[1] else None
        grad_w_up = flat(grad_up).T @ flat(x) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w_gate, grad_w_up, grad_down


def _rms_norm_forward(self, hidden_states, *, eps: float):
    return _RMSNorm.apply(hidden_states, self.weight, eps)


def _swiglu_forward(self, x):
    return _SwiGLU.apply(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


def _is_plain_linear(module) -> bool:
    return type(module) is torch.nn.Linear and module.bias is None


def _rms_norm_eps(module) -> float | None:
    """The epsilon of a module shaped like an RMSNorm (named so, a 1-D weight, a float epsilon, no
    children), else None."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.nn.Parameter)
            and weight.dim() == 1 and isinstance(eps, float) and not list(module.children())):
        return eps
    return None


def _swiglu_candidate(module) -> bool:
    return (all(_is_plain_linear(getattr(module, name, None)) for name in ("gate_proj", "up_proj", "down_proj"))
            and isinstance(getattr(module, "act_fn", None), torch.nn.Module)
            and type(module.act_fn).__name__ in ("SiLU", "SiLUActivation"))


@torch.no_grad()
def _agrees(module, lean_forward, width: int) -> bool:
    """Whether the lean forward matches the module's own on a random probe (within bf16 rounding)."""
    param = next(module.parameters())
    probe = torch.randn(2, 3, width, dtype=param.dtype, device=param.device,
                        generator=torch.Generator(device=param.device).manual_seed(0))
    expected = module(probe)
    # The math is what is checked; fused kernels keep bf16 intermediates in fp32, so they round
    # differently (tested apart, in test_fused.py).
    with fused.unfused():
        got = lean_forward(module, probe)
    return got.shape == expected.shape and got.dtype == expected.dtype and \
        torch.allclose(got.float(), expected.float(), rtol=2e-2, atol=1e-3)


def patch(model: torch.nn.Module) -> dict[str, int]:
    """Swap the lean forward into every RMSNorm and SwiGLU MLP of ``model`` that computes the same thing.
    Returns how many of each were swapped."""
    counts = {"rms_norm": 0, "swiglu_mlp": 0}
    for module in model.modules():
        eps = _rms_norm_eps(module)
        if eps is not None:
            lean = functools.partial(_rms_norm_forward, eps=eps)
            if _agrees(module, lean, module.weight.shape[0]):
                module.forward = types.MethodType(lean, module)
                counts["rms_norm"] += 1
        elif _swiglu_candidate(module):
            if _agrees(module, _swiglu_forward, module.gate_proj.in_features):
                module.forward = types.MethodType(_swiglu_forward, module)
                counts["swiglu_mlp"] += 1
    return counts
