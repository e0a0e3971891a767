"""The speed work, behind one door: ``apply(setup, settings, longest_row)``.

A reader of train.py can skip this package. What training computes is the plain path's (loss.py,
precision.py, modeling.py); what is here computes the same thing faster or in less memory, and each piece is
checked on the model it is about to serve before it is used:

- attention.py       packed rows run row by row (no block-diagonal mask), on a GPU in bf16 by PyTorch's
                     FlashAttention varlen kernel; checked: packed logits equal each row's own logits on
                     this model, and the varlen kernel against SDPA on this device
- linear_cross_entropy.py  logits only where a label is, fused with the cross-entropy; checked: the same
                     loss as the plain one on this model
- kahan.py, master_weights.py  bf16 full fine-tuning: bf16 weights with Kahan-compensated AdamW (without
                     weight decay) or a bf16 model on fp32 master weights (with it)
- lean_layers.py     RMSNorm and SwiGLU layers that keep less for backward; checked per module
- fused.py           elementwise chains compiled by torch.compile (eager with a warning where that fails)
- allocator.py       jemalloc, preloaded by the launcher (`instructflow train`)
- (here)             an input embedding tied to the output layer gets a sparse lookup gradient (not under DDP)
- shared_prefill.py  evaluation: the loss and the generations from one pass over the prompts, a prefix the rows'
                     prompts share run once; checked: the same loss and continuation as the rows' own forward
                     passes on this model (evaluate.py calls it)
- decode.py          evaluation's greedy decoding: finished rows leave the batch, prompt batches decode together

What does not apply to an architecture leaves that part on the plain path, with one warning naming the
architecture and the reason. ``train.advanced.fast_path: false`` skips this package entirely.
"""

from __future__ import annotations

import dataclasses
import warnings

# Where the fast path fell back, said once per process and reason.
_warned: set[str] = set()


def _warn(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"instructflow: {message}", RuntimeWarning, stacklevel=3)


def apply(setup, settings: dict, *, longest_row: int):
    """A copy of the plain ``setup`` (train.TrainingSetup) with every speed piece that is safe for this model
    swapped in; ``setup.applied`` says what was."""
    from ..modeling import architecture
    from . import attention, fused, lean_layers, linear_cross_entropy

    model, advanced = setup.model, settings["advanced"]
    arch = architecture(model)
    applied = {**setup.applied, "path": "fast"}
    fused.enable(advanced["fused_kernels"])
    changes = {}

    if advanced["packing"]:
        why = attention.use_on(model, longest_row)
        if why is None:
            changes.update(packing=True, forward_kwargs=attention.forward_kwargs)
            applied.update(attention=_packed_attention(model, setup.precision.autocast), packing=True)
        else:
            how = "packed" if setup.packing else "padded"
            _warn(f"row-by-row attention is not used for {arch}: {why}; it trains with {setup.applied['attention']} "
                  f"attention, {how}")

    why = linear_cross_entropy.agrees(model)
    if why is None:
        changes["loss"] = linear_cross_entropy.response_loss_sum
        applied["loss"] = "fused linear + cross-entropy"
    else:
        _warn(f"the fused linear + cross-entropy is not used for {arch}: {why}; it keeps the model's own logits")

    precision = _precision(model, settings, setup.precision)
    if precision is not None:
        changes["precision"] = precision
        applied["precision_mode"] = precision.name
    autocast = (precision or setup.precision).autocast
    # Under autocast the projections' dtypes are autocast's business; lean layers are for a model in its own dtype.
    applied["lean_layers"] = {} if autocast else lean_layers.patch(model)
    applied["embedding_gradient"] = _embedding_gradient(model)
    return dataclasses.replace(setup, applied=applied, report=report, **changes)


def _packed_attention(model, bf16: bool) -> str:
    """Which kernel runs the packed rows' attention: PyTorch's FlashAttention varlen on a GPU in bf16 where it
    passes its self-test, else the row-by-row attention."""
    from . import attention

    device = next(model.parameters()).device
    if device.type == "cuda" and bf16:
        why = attention.use_varlen(device)
        if why is None:
            return "flash varlen (torch.nn.attention.varlen, instructflow_segments)"
        _warn(f"PyTorch's varlen FlashAttention is not used: {why}; packed rows run row by row")
    return "row-by-row (instructflow_segments)"


def _embedding_gradient(model) -> str:
    """Where the input embedding shares its weight with the output layer (SmolLM2, Qwen2.5, GPT-Neo, Gemma), its
    lookup's gradient is made sparse. Dense, every micro-batch fills a vocabulary-sized tensor with zeros, writes the
    looked-up rows, and autograd adds all of it to the output layer's gradient of the same weight: two passes over
    28M values for SmolLM2-135M. Sparse, that sum touches the looked-up rows only. The weight's gradient stays
    dense (the output layer's part of it is), so clipping and the optimisers see what they saw. Not under DDP,
    whose reducer expects a sparse gradient from a sparse embedding and gets the dense sum."""
    import torch

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = isinstance(embedding, torch.nn.Embedding) and embedding.weight is getattr(head, "weight", None)
    if not tied or not embedding.weight.requires_grad or _distributed():
        return "dense"
    embedding.sparse = True
    return "sparse (tied to the output layer)"


def _distributed() -> bool:
    """Whether a process group is up, as under DDP (accelerate's MULTI_CPU wraps the model in DDP whatever the
    process count)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _precision(model, settings: dict, plain):
    """The bf16 strategy for this run, or None to keep the plain one (fp32, or bf16 autocast)."""
    from . import kahan, master_weights

    if not plain.autocast:
        return None
    mode = settings["advanced"]["bf16_mode"]
    lr, decay = settings["learning_rate"], settings["weight_decay"]
    if settings["method"] == "lora":
        if mode != "autocast":
            master_weights.bf16_frozen_weights(model)
        return None
    if mode == "auto":
        mode = "masters" if decay else "kahan"
    if mode == "kahan":
        return kahan.Kahan(model, lr=lr, weight_decay=decay)
    if mode == "masters":
        return master_weights.Masters(model, lr=lr, weight_decay=decay)
    return None



def report() -> dict:
    """What the fast path did at run time, for the summary: how each fused kernel ran, which allocator."""
    from . import allocator, fused

    return {"fused_kernels": fused.report(), "allocator": allocator.in_use()}
