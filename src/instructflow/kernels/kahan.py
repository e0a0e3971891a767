"""Full fine-tuning with bf16 weights and bf16 optimiser state, updates Kahan-compensated
(`train.advanced.bf16_mode: kahan`, what `auto` picks for bf16 full fine-tuning without weight decay):
the low-memory choice.

Mixed precision (`bf16`, master_weights.py) keeps 16 bytes per parameter: bf16 weights and gradients,
fp32 masters and two fp32 AdamW moments. Here the optimiser is optimi's AdamW with ``kahan_sum``: the
moments are bf16 and the lost low bits of every update go to a bf16 compensation buffer that is added
back on the next step, so small updates accumulate instead of rounding away. 10 bytes per parameter:
0.8 GiB less for SmolLM2-135M. The compensation starts from each weight's bf16 rounding error rather
than zero, so the pair (weight, compensation) holds the checkpoint's fp32 value to about 16 bits, and
export writes weight + compensation in fp32 (starting from zero cost 0.006 held-out loss after 12 steps
on Code Alpaca; docs/benchmarks.md).

optimi applies weight decay to the bf16 weight directly, where a decay step of lr x weight_decay (about
1e-6) rounds away, so config validation refuses weight decay with this mode.
"""

from __future__ import annotations

import torch

from ..precision import BETAS, Plain, scale_gradients, trainable
from . import fused
from .allocator import trim


class Kahan(Plain):
    """The precision strategy (precision.py's interface) of bf16 weights with Kahan-compensated AdamW:
    Plain's step, checkpoint and resume, over this optimiser."""

    name = "bf16-kahan"
    autocast = False

    def __init__(self, model: torch.nn.Module, *, lr: float, weight_decay: float):
        self.model = model
        self.optimizer = optimizer_for(model, lr=lr, betas=BETAS, weight_decay=weight_decay)
        self.named = trainable(model)
        self.params = [p for _, p in self.named]

    def update(self, grad_scale: torch.Tensor | None) -> None:
        # The fused step scales each gradient as it reads it: no pass of its own over them.
        if getattr(self.optimizer, "scales_gradients", False):
            self.optimizer.step(grad_scale=grad_scale)
        else:
            super().update(grad_scale)

    def to_fp32(self) -> None:
        # The fp32 weights come from the heap glibc kept after training, not on top of it.
        trim()
        restore_fp32(self.model, self.optimizer)


def optimizer_for(model: torch.nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float):
    """Convert ``model``'s trainable parameters to bf16 in place and return an optimi AdamW over them
    whose Kahan compensation holds each weight's rounding error (its state is built here, as optimi
    would on the first step, with that one difference)."""
    import optimi

    params, residuals = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        rounded = p.data.to(torch.bfloat16)
        residuals.append((p.data - rounded.float()).to(torch.bfloat16))
        p.data = rounded
        params.append(p)
    # On the CPU optimi's per-tensor loop (its foreach path was 10% slower: 0.20 against 0.18 s a step),
    # replaced by one fused kernel per tensor where weight decay is off (always, with this precision).
    on_cpu = not params or params[0].device.type == "cpu"
    kind = _fused_adamw_class() if on_cpu and weight_decay == 0 else optimi.AdamW
    optimizer = kind(params, lr=lr, betas=betas, weight_decay=weight_decay, kahan_sum=True, foreach=not on_cpu)
    for p, residual in zip(params, residuals):
        optimizer.state[p].update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), kahan_comp=residual)
    return optimizer


def _fused_adamw_class():
    """optimi's AdamW, whose step runs fused.kahan_adamw for each parameter while fused kernels are on:
    0.17 s a step for SmolLM2-135M on 2 cores against optimi's 0.22 s (one pass over memory instead of
    about ten). State, hyperparameters, debiasing and checkpoints stay optimi's. The clipping's scale is
    applied inside the kernel, where scaling the gradients first was a pass over all of them (~0.09 s a step
    on 2 cores)."""
    import optimi
    from optimi.utils import debias_beta

    class FusedKahanAdamW(optimi.AdamW):
        scales_gradients = True  # step(grad_scale=...): the gradients times grad_scale, as if scaled before

        @torch.no_grad()
        def step(self, closure=None, param=None, grad_scale: torch.Tensor | None = None):
            # The kernel has no weight decay; optimi's own step covers what it does not.
            if closure is not None or param is not None or not fused.enabled() \
                    or any(group["weight_decay"] for group in self.param_groups):
                if grad_scale is not None:
                    scale_gradients([p for group in self.param_groups for p in group["params"]], grad_scale)
                return super().step(closure, param)
            for group in self.param_groups:
                params, grads, exp_avgs, exp_avg_sqs, comps = [], [], [], [], []
                self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, comps)
                group["step"].add_(1)
                n = int(group["step"].item())
                beta1_hat, beta2_hat = debias_beta(group["beta1"], n), debias_beta(group["beta2"], n)
                hyper = torch.tensor([group["lr"], 1 - beta1_hat, beta2_hat, 1 - beta2_hat, group["eps"], 1.0],
                                     dtype=torch.float32)
                if grad_scale is not None:
                    hyper[5:].copy_(grad_scale)
                for tensors in zip(params, grads, exp_avgs, exp_avg_sqs, comps):
                    # Flat views: one kernel serves every parameter shape.
                    p, g, m, v, c = (t.detach() for t in tensors)
                    fused.kahan_adamw(p.view(-1), g.reshape(-1), m.view(-1), v.view(-1), c.view(-1), hyper)
            return None

    return FusedKahanAdamW


def restore_fp32(model: torch.nn.Module, optimizer) -> None:
    """Give the model fp32 weights (bf16 weight + compensation) for export, releasing each parameter's
    optimiser state as it goes; training cannot continue after this."""
    for p in model.parameters():
        state = optimizer.state.pop(p, None)
        if state is not None:
            # In place: one fp32 tensor per parameter, not three (the embedding's would be 0.34 GB).
            p.data = p.data.float().add_(state["kahan_comp"])
            p.grad = None
