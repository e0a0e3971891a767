"""Full fine-tuning in bf16 on fp32 master weights (`train.advanced.bf16_mode: masters`, what `auto` picks
for bf16 with weight decay; without it `auto` picks Kahan-compensated bf16 weights, kahan.py): the model
itself in bf16, fp32 master copies of its weights in the optimiser (mixed precision as
Megatron-LM and DeepSpeed do it), rather than autocast over fp32 weights (`bf16-autocast`, what the
Trainer and TRL do, and the plain path).

Autocast keeps the residual stream, norms and gradients in fp32 and casts every weight to bf16 on every
micro-batch; a bf16 model moves half the bytes through those elementwise ops and keeps half-size
gradients and activations. SmolLM2-135M on Code Alpaca, 2-core CPU: 15% more tokens per second paired
in one process, 0.46-0.72 GiB less peak RSS, and the same held-out loss after 12 steps for four batch
orders (differences of -0.0003 to +0.0009; docs/benchmarks.md).

The optimiser works on fp32 copies because an AdamW update is often smaller than bf16's resolution
(1/256 of the weight) and would round away if applied to the bf16 weight. The masters start from the
checkpoint's own fp32 values, not bf16-rounded ones (in a trial, those lost low bits showed up as a
higher held-out loss). Only parameters are converted: buffers such as the rotary frequencies keep fp32.
"""

from __future__ import annotations

import torch

from ..precision import BETAS
from .allocator import trim


class MasterWeights:
    """Pairs each trainable parameter of ``model`` (converted to bf16 in place) with an fp32 master.

    The masters take over the original fp32 storage, so converting costs no extra copy of the model.
    Give ``masters`` to the optimiser and, after the backward passes, call ``step(optimizer)`` in place
    of ``optimizer.step()``. Tied parameters (one tensor under two names) get one master, as
    ``model.named_parameters()`` yields them once."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.masters = []
        for p in self.params:
            master = torch.nn.Parameter(p.data, requires_grad=True)
            p.data = p.data.to(dtype)
            self.masters.append(master)
        # The optimiser steps the masters a chunk at a time, their fp32 gradients held in one reused
        # buffer as large as the largest parameter (the embedding), rather than fp32 copies of all
        # gradients at once: 0.43 GB less peak RSS for SmolLM2-135M, and no fresh pages to fault in
        # every step.
        capacity = max((p.numel() for p in self.params), default=0)
        self.chunks: list[list[int]] = []
        used = capacity
        for i, p in enumerate(self.params):
            if used + p.numel() > capacity:
                self.chunks.append([])
                used = 0
            self.chunks[-1].append(i)
            used += p.numel()
        self._buffer = torch.empty(capacity, dtype=torch.float32, device=self.params[0].device) if self.params else None

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float = 0.0,
             check_finite: bool = False) -> torch.Tensor | float:
        """One optimiser step from the model's gradients (bf16, summed over the micro-batches): clip by
        their global norm, step the masters chunk by chunk, copy them into the model.
        Clears the model's gradients. Returns the norm before clipping (a tensor: no device sync).
        ``check_finite``: read the norm first (the one device sync; then it is returned as a float) and
        raise precision.NonFiniteGradient, weights and optimiser untouched, where it is inf or nan."""
        from ..precision import checked, grad_norm

        # Norms of the bf16 gradients themselves (accumulated in fp32, each rounded to bf16: a clip
        # coefficient within 0.4%): asking for fp32 norms converts every gradient first, 0.25 s a step.
        norm = grad_norm(self.params)
        value = checked(norm) if check_finite else None
        coef = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0) if max_grad_norm else None
        for chunk in self.chunks:
            offset, views = 0, []
            for i in chunk:
                p, master = self.params[i], self.masters[i]
                if p.grad is None:
                    continue
                view = self._buffer[offset:offset + p.numel()].view_as(master)
                offset += p.numel()
                view.copy_(p.grad)
                master.grad = view
                p.grad = None
                views.append(view)
            if not views:
                continue
            if coef is not None:
                torch._foreach_mul_(views, coef)
            optimizer.step()
            for i in chunk:
                self.masters[i].grad = None
                self.params[i].copy_(self.masters[i])
        return norm if value is None else value

    @torch.no_grad()
    def to_model(self) -> None:
        for p, master in zip(self.params, self.masters):
            p.copy_(master)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 masters by parameter name: what checkpoints and the exported model hold."""
        return {name: master.detach() for name, master in zip(self.names, self.masters)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.names if name not in state]
        if missing:
            raise KeyError(f"no saved weights for {missing[:3]}")
        for name, master in zip(self.names, self.masters):
            master.copy_(state[name])
        self.to_model()

    def restore_fp32(self) -> None:
        """Give the model its fp32 masters back (for export); training cannot continue after this."""
        for p, master in zip(self.params, self.masters):
            p.data = master.data
            p.grad = None
        self.masters = []


class Masters:
    """The precision strategy (precision.py's interface) of a bf16 model on fp32 master weights."""

    name = "bf16-masters"
    autocast = False

    def __init__(self, model: torch.nn.Module, *, lr: float, weight_decay: float):
        self.weights = MasterWeights(model)
        self.optimizer = torch.optim.AdamW(self.weights.masters, lr=lr, weight_decay=weight_decay, betas=BETAS,
                                           fused=True)

    def step(self, max_grad_norm: float) -> float:
        # The norm is read (one sync) before the step: a non-finite one raises with the weights untouched.
        return float(self.weights.step(self.optimizer, max_grad_norm, check_finite=True))

    def state_dict(self) -> dict:
        return {"trainable": {n: t.cpu() for n, t in self.weights.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.weights.load_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])

    def to_fp32(self) -> None:
        self.weights.restore_fp32()
        trim()


def bf16_frozen_weights(model: torch.nn.Module) -> None:
    """LoRA under bf16 autocast: store the frozen weights of adapted linear layers in bf16. Autocast casts
    them to bf16 for every micro-batch anyway, so the matmuls are the same, with half their memory and no
    casts. (The exported model merges the adapters into the original fp32 weights: train.merged_lora.)"""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        base = module.get_base_layer() if isinstance(module, LoraLayer) else None
        if isinstance(base, torch.nn.Linear):
            base.weight.data = base.weight.data.to(torch.bfloat16)
    # The other tensors still view the weights file's memory map, which keeps the fp32 pages of the weights
    # just converted resident (and counted in RSS) for the whole run; copies of their own let it close.
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.dtype != torch.bfloat16:
            tensor.data = tensor.data.clone()
