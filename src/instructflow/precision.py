"""Precision as one strategy object: what the training loop asks of it is the same whatever the numbers.

`train.precision` is `auto` (bf16 where the CPU or GPU does bf16 natively, else fp32), `bf16` or `fp32`.
The plain path here is what transformers' Trainer and TRL do: fp32 weights and torch's AdamW, under bf16
autocast for `bf16`. The fast path (instructflow.kernels) swaps in other strategies (a bf16 model on fp32
master weights, bf16 weights with Kahan-compensated updates) with the same interface:

    strategy.autocast           whether forward passes run under bf16 autocast
    strategy.optimizer          the torch optimiser (the learning-rate scheduler wraps it)
    strategy.step(max_norm)     clip by the global gradient norm (0: no clipping), step, clear the
                                gradients; returns the norm before clipping. A norm that is not finite
                                raises NonFiniteGradient before the optimiser steps (weights untouched)
    strategy.state_dict()       {"trainable": {name: tensor}, "optimizer": ...} for a checkpoint
    strategy.load_state_dict()  the same back, when resuming
    strategy.to_fp32()          give the model fp32 weights for export; training ends there
"""

from __future__ import annotations

import math
import warnings

import torch

from .device import bf16_supported

CHOICES = ("auto", "bf16", "fp32")
BETAS = (0.9, 0.95)


def resolve(setting: str, device: torch.device, key: str = "train.precision") -> str:
    """`auto` -> `bf16` where the hardware has it natively, else `fp32`. `bf16` asked for where it is not
    native runs emulated, with a warning: slower than fp32, the same numbers as on a bf16 machine. ``key``: the
    config key that set it (train.precision, evaluate.precision), for messages."""
    if setting not in CHOICES:
        raise ValueError(f"{key} must be one of {', '.join(CHOICES)}, not {setting!r}")
    native = bf16_supported(device)
    if setting == "auto":
        return "bf16" if native else "fp32"
    if setting == "bf16" and not native:
        warnings.warn(f"instructflow: bf16 is not native on this {device.type} (no AVX512-BF16/AMX, or a GPU "
                      f"without bf16): it runs emulated, slower than fp32. {key}: auto picks fp32 here.",
                      RuntimeWarning, stacklevel=2)
    return setting


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every parameter the optimiser updates; tied weights appear once."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients, accumulated in fp32."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())


def scale_gradients(params: list[torch.Tensor], scale: torch.Tensor) -> None:
    """Multiply the parameters' gradients by ``scale`` (the clipping's), in place."""
    torch._foreach_mul_([p.grad for p in params if p.grad is not None], scale)


class NonFiniteGradient(FloatingPointError):
    """The global gradient norm is inf or nan: raised before the optimiser steps, so the weights and the
    optimiser state are untouched (the training loop turns it into a TrainingError naming the step)."""

    def __init__(self, norm: float):
        super().__init__(f"gradient norm is {norm}")
        self.norm = norm


def checked(norm: torch.Tensor) -> float:
    """``float(norm)`` (the step's one device sync), or NonFiniteGradient where it is inf or nan."""
    value = float(norm)
    if not math.isfinite(value):
        raise NonFiniteGradient(value)
    return value


class Plain:
    """fp32 weights and torch AdamW; with ``autocast`` the forward passes run under bf16 autocast."""

    def __init__(self, model: torch.nn.Module, *, lr: float, weight_decay: float, autocast: bool):
        self.name = "bf16-autocast" if autocast else "fp32"
        self.autocast = autocast
        self.model = model
        self.named = trainable(model)
        self.params = [p for _, p in self.named]
        # fused: one kernel per tensor, in place (the default foreach path allocates temporaries as large
        # as all parameters together).
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, betas=BETAS,
                                           fused=self.params[0].device.type in ("cpu", "cuda"))

    @torch.no_grad()
    def step(self, max_grad_norm: float) -> float:
        norm = grad_norm(self.params)
        value = checked(norm)  # before the step: a non-finite gradient never reaches the weights
        self.update(torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0) if max_grad_norm else None)
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def update(self, grad_scale: torch.Tensor | None) -> None:
        """The optimiser's step on the gradients times ``grad_scale`` (the clipping; None: as they are)."""
        if grad_scale is not None:
            scale_gradients(self.params, grad_scale)
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {"trainable": {name: p.detach().cpu() for name, p in self.named},
                "optimizer": self.optimizer.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        missing = [name for name, _ in self.named if name not in state["trainable"]]
        if missing:
            raise KeyError(f"no saved weights for {missing[:3]}")
        for name, p in self.named:
            p.copy_(state["trainable"][name])
        self.optimizer.load_state_dict(state["optimizer"])

    def to_fp32(self) -> None:
        """Nothing to do: the weights are fp32 already."""
