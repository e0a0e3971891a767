"""The response loss (instructflow.loss) without logits for positions that carry no label.

For a 135M model the vocabulary projection over 49k tokens is a large share of the compute, and
most positions in an instruction batch are prompt or padding. Running the backbone, picking the
hidden states whose *next* token carries a label, and projecting only those gives the same loss as
``model(labels=...)`` at a fraction of the cost and memory.

The projection and the cross-entropy are fused (``linear_cross_entropy``): logits are made a chunk of
rows at a time and turned into their gradient (softmax minus one-hot) on the spot, so the full fp32
logits, their log-softmax and its backward never exist. On a 2-core CPU that was about a tenth of a
training step and a quarter of a GB per micro-batch. Liger-Kernel does the same on GPUs with Triton;
this is the plain-PyTorch form, which runs on any device.

It calls the model's backbone and output projection itself, so it is used only where ``agrees(model)``
found that they reproduce the model's own logits (architectures that post-process logits in ways not
handled here keep the plain loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..examples import IGNORE_INDEX
from ..loss import no_targets
from . import fused


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under accelerate/DDP and peft wrappers."""
    while hasattr(model, "module") and not hasattr(model, "get_output_embeddings"):
        model = model.module
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model


def _final_logit_transform(config):
    """Some architectures post-process logits (Gemma's soft-capping, Cohere's scale, Granite's division);
    keep them exact. None where the architecture does not. (``agrees`` catches any this does not know.)"""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    if cap is None and scale is None and divisor is None:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


# Rows of logits made at once. Training writes them into the gradient buffer and fused.cross_entropy_chunk
# overwrites them there; compiled it needs no scratch, its eager form (and evaluation) holds fp32 copies of a
# chunk: 128 x 49k x 4 bytes = 25 MB each. Chunks of 512 rows or all rows at once were no faster in training
# (docs/speed.md).
CHUNK_ROWS = 128


def _row_chunks(rows: int):
    """Slices of CHUNK_ROWS rows covering ``rows`` rows."""
    return (slice(start, start + CHUNK_ROWS) for start in range(0, rows, CHUNK_ROWS))


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), with the gradient of the logits made in the forward pass.

    Matmuls run in ``dtype`` (bf16 under autocast, as the unfused linear would); the softmax and loss in
    fp32. Only the logit gradient is kept for backward, in ``dtype``: half the memory of bf16 logits plus
    their fp32 copy and fp32 gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype):
        h = hidden.to(dtype)
        w = weight.to(dtype)
        grad_logits = torch.empty(h.shape[0], w.shape[0], dtype=dtype, device=h.device)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for rows in _row_chunks(h.shape[0]):
            logits = torch.mm(h[rows], w.T, out=grad_logits[rows])
            loss += fused.cross_entropy_chunk(logits, targets[rows])  # the logits become their gradient
        ctx.save_for_backward(h, w, grad_logits)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        h, w, grad_logits = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = grad_weight = None
        # In place: the weight's gradient is vocabulary-sized (113 MB in fp32 for SmolLM2).
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_logits @ w).to(hidden_dtype).mul_(grad_loss)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_logits.T @ h).to(weight_dtype).mul_(grad_loss)
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, in the autocast dtype if any."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, dtype)
    # Evaluation: the same chunked loss without making (and keeping) the logits' gradient.
    h, w = hidden.to(dtype), weight.to(dtype)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for rows in _row_chunks(h.shape[0]):
        logits, t = (h[rows] @ w.T).float(), targets[rows]
        loss += (torch.logsumexp(logits, dim=-1) - logits.gather(1, t[:, None]).squeeze(1)).sum()
    return loss


def response_loss_sum(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                      position_ids: torch.Tensor | None = None, **forward_kwargs) -> tuple[torch.Tensor, int]:
    """instructflow.loss.response_loss_sum, computing logits only where a label is."""
    outputs = _unwrap(model).base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **forward_kwargs)
    hidden = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state
    return hidden_target_loss_sum(model, hidden[:, :-1], labels[:, 1:])


def hidden_target_loss_sum(model: torch.nn.Module, hidden: torch.Tensor,
                           targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """loss.target_loss_sum from the backbone's last hidden states: each position against its next token."""
    inner = _unwrap(model)
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    head = inner.get_output_embeddings()
    if n == 0:
        return no_targets(hidden, *head.parameters()), 0
    picked = hidden[keep]
    transform = _final_logit_transform(inner.config)
    # Fused only for a plain bias-free projection (a peft-wrapped head is not) without post-processing.
    if transform is None and type(head) is torch.nn.Linear and head.bias is None:
        return linear_cross_entropy(picked, head.weight, targets[keep].long()), n
    logits = head(picked)
    if transform is not None:
        logits = transform(logits)
    loss = F.cross_entropy(logits.float(), targets[keep].long(), reduction="sum")
    return loss, n


@torch.no_grad()
def agrees(model: torch.nn.Module) -> str | None:
    """None where this loss equals the plain one on a random probe batch for ``model`` (fp32), else why not."""
    from ..loss import response_loss_sum as plain_loss

    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    ids = torch.randint(0, _unwrap(model).config.vocab_size, (2, 9), generator=generator).to(device)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    training = model.training
    model.eval()
    try:
        fast, _ = response_loss_sum(model, ids, labels)
        plain, _ = plain_loss(model, ids, labels)
    except Exception as err:  # noqa: BLE001 - any failure means "keep the plain loss"
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    finally:
        model.train(training)
    if not torch.allclose(fast, plain, rtol=1e-4, atol=1e-4):
        return f"its output layer does not reproduce the model's logits (loss {float(fast):.6g} against {float(plain):.6g})"
    return None
