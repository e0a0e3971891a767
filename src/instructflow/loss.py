"""The training objective: summed cross-entropy over the response tokens, and how many there were.

The caller divides by the count of labelled tokens of the whole optimiser step (all micro-batches and
processes), so gradient accumulation gives the gradient of one large batch; a per-micro-batch mean would
weight short answers more. This is the plain form: the model's own forward and its own logits, so any
causal LM computes exactly what it computes in transformers. (instructflow.kernels has a form that
projects only the labelled positions, fused with the cross-entropy; it is checked against this one.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .examples import IGNORE_INDEX


def response_loss_sum(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                      position_ids: torch.Tensor | None = None, **forward_kwargs) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy where ``labels`` is not -100, and the count of such tokens.

    Padding is on the right with label -100, so no attention mask is needed: causal attention never lets
    a real token see the padding after it. Packed rows come as one row whose ``position_ids`` restart at
    0 per source row (transformers then keeps the rows apart)."""
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **forward_kwargs).logits
    return logits_loss_sum(logits, labels)


def logits_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``response_loss_sum`` from the model's logits for every position of ``labels``."""
    return target_loss_sum(logits[:, :-1], labels[:, 1:])


def target_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of each position's logits against its next token ``targets`` (-100: none), and the
    count of targets."""
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        return no_targets(logits), 0
    return F.cross_entropy(logits[keep].float(), targets[keep].long(), reduction="sum"), n


def no_targets(*tensors: torch.Tensor) -> torch.Tensor:
    """The zero loss where no position has a target. In training it still touches ``tensors`` (outputs and
    parameters the loss would have used), so DDP sees every parameter used on every rank; without autograd
    (evaluation) it is a constant, with no pass over them."""
    zero = torch.zeros((), device=tensors[0].device)
    if torch.is_grad_enabled():
        for t in tensors:
            if t.requires_grad:
                zero = zero + t.sum() * 0.0
    return zero


def labelled_rows(labels: torch.Tensor) -> int:
    """How many rows of ``labels`` have a labelled token past the first position (a target to predict)."""
    return int((labels[:, 1:] != IGNORE_INDEX).any(dim=1).sum())
