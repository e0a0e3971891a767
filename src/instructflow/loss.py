"""Response-only causal-LM loss that never builds logits for positions without a label.

For a 135M model the vocabulary projection over 49k tokens is a large share of the compute, and
most positions in an instruction batch are prompt or padding. Running the backbone, picking the
hidden states whose *next* token carries a label, and projecting only those gives the same loss as
``model(labels=...)`` at a fraction of the cost and memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import segment_kwargs
from .examples import IGNORE_INDEX


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under accelerate/DDP and peft wrappers."""
    while hasattr(model, "module") and not hasattr(model, "get_output_embeddings"):
        model = model.module
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model


def _final_logit_transform(config):
    """Some architectures post-process logits (Gemma's soft-capping, Cohere's scale); keep them exact."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def response_loss_sum(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    seq_lens: list[int] | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over labelled next-token positions, and how many there were.

    The caller divides by the total count of labelled tokens across all micro-batches (and ranks)
    of an optimiser step, so gradient accumulation gives the same gradient as one large batch.
    Padding is on the right with label -100, so no attention mask is needed: causal attention
    never lets a real token see the padding after it. For packed rows, ``seq_lens`` (the row lengths)
    reach the attention as FlashAttention-varlen row boundaries (see attention.py).
    """
    inner = _unwrap(model)
    backbone = inner.base_model
    extra = segment_kwargs(seq_lens, input_ids.device) if seq_lens else {}
    outputs = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra)
    hidden = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    if n == 0:
        # Still touch the graph so DDP sees every parameter used on every rank.
        return hidden.sum() * 0.0, 0
    picked = hidden[:, :-1][keep]
    logits = inner.get_output_embeddings()(picked)
    logits = _final_logit_transform(inner.config)(logits)
    loss = F.cross_entropy(logits.float(), targets[keep].long(), reduction="sum")
    return loss, n
