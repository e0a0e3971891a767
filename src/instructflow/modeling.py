"""Loading any causal LM transformers loads, with an attention implementation checked on the model itself.

transformers picks PyTorch SDPA where an architecture declares it and eager attention where not. That is
not always the same computation: an architecture may need what SDPA lacks (Gemma 2 soft-caps attention
scores). Packing several rows into one with position ids that restart per row is only exact where the
architecture builds its mask from those position ids. So both are checked on the loaded model, on two
short random rows, against the reference: eager attention, each row run alone. The checks take a few
forward passes of 14 tokens, and make a wrong choice impossible rather than unlikely.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Two rows of different lengths, short enough for any position table.
PROBE_LENGTHS = (5, 9)
EAGER = "eager"


@dataclass(frozen=True)
class Attention:
    """What the checks found: the implementation to run, whether packed rows are exact with it, and why
    not (None when they are)."""

    implementation: str
    packing: bool
    why_not_packed: str | None


def load_model(model_dir: str | os.PathLike, *, trust_remote_code: bool = False, device: torch.device | None = None):
    """The model in fp32 on ``device`` with an attention implementation that computes what eager attention
    computes (SDPA where it does, eager where not), and what ``choose_attention`` found."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code)
    if device is not None:
        model.to(device)
    model.config.use_cache = False
    return model, choose_attention(model)


def probe_rows(model: torch.nn.Module) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    return [torch.randint(0, model.config.vocab_size, (n,), generator=generator).to(device) for n in PROBE_LENGTHS]


def _attn(model) -> str:
    return model.config._attn_implementation


def _set_attn(model, name: str) -> bool:
    """Switch the attention implementation; False where the architecture cannot switch at run time."""
    if _attn(model) == name:
        return True
    if not model._can_set_attn_implementation():
        return False
    model.set_attn_implementation(name)
    return _attn(model) == name


@torch.no_grad()
def rows_alone(model, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of each row run on its own: the reference."""
    return [model(input_ids=r[None], use_cache=False).logits[0].float() for r in rows]


@torch.no_grad()
def rows_packed(model, rows: list[torch.Tensor], **forward_kwargs) -> list[torch.Tensor]:
    """Logits of the rows packed into one, position ids restarting per row, split back per row."""
    ids = torch.cat(rows)[None]
    positions = torch.cat([torch.arange(len(r), device=r.device) for r in rows])[None]
    logits = model(input_ids=ids, position_ids=positions, use_cache=False, **forward_kwargs).logits[0].float()
    return list(logits.split([len(r) for r in rows]))


@torch.no_grad()
def rows_padded(model, rows: list[torch.Tensor], pad_id: int = 0) -> list[torch.Tensor]:
    """Logits of the rows right-padded into one batch without a mask (how unpacked training runs)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    logits = model(input_ids=ids, use_cache=False).logits.float()
    return [logits[i, : len(r)] for i, r in enumerate(rows)]


def mismatch(got: list[torch.Tensor], want: list[torch.Tensor]) -> str | None:
    """None where the logits agree to fp32 rounding, else how far apart they are."""
    worst = max(float((g - w).abs().max()) for g, w in zip(got, want))
    scale = max(1.0, max(float(w.abs().max()) for w in want))
    return None if worst <= 1e-4 * scale else f"logits differ by up to {worst:.3g}"


def check(run, reference: list[torch.Tensor]) -> str | None:
    """Run ``run()`` (a list of logits per row) and compare it with the reference; a failure is a reason."""
    try:
        return mismatch(run(), reference)
    except Exception as err:  # noqa: BLE001 - any failure means "not this way"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"{type(err).__name__}: {detail}"


def choose_attention(model) -> Attention:
    """Keep transformers' choice where it matches eager attention (else switch to eager), then check
    packing and padding with it. Sets the model's implementation; returns what was found."""
    training = model.training
    model.eval()
    try:
        rows = probe_rows(model)
        chosen = _attn(model)
        if chosen != EAGER and _set_attn(model, EAGER):
            reference = rows_alone(model, rows)
            _set_attn(model, chosen)
            if check(lambda: rows_alone(model, rows), reference) is not None:
                _set_attn(model, EAGER)
        else:
            reference = rows_alone(model, rows)
        why = check(lambda: rows_packed(model, rows), reference)
        return Attention(_attn(model), why is None, why)
    finally:
        model.train(training)


def padding_exact(model) -> str | None:
    """None where right-padded rows without a mask give each row's own logits, else why not."""
    rows = probe_rows(model)
    training = model.training
    model.eval()
    try:
        return check(lambda: rows_padded(model, rows), rows_alone(model, rows))
    finally:
        model.train(training)


def position_limit(config) -> int | None:
    """The longest sequence the model's own tables allow (a position table, or GPT-Neo's causal-mask buffer),
    None where it has none (ALiBi). Packed micro-batches stay within it."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def positions_are_hard(config) -> bool:
    """Whether a row longer than position_limit fails: a learned position table (GPT-2, GPT-Neo, OPT) or a
    precomputed one (GPT-J's sin/cos buffer) is indexed by position; rotary embeddings that transformers
    computes per position (a ``rope_parameters`` config) run past it, beyond the length the model was
    trained on."""
    return getattr(config, "rope_parameters", None) is None


def architecture(model) -> str:
    """The model type as transformers names it (gpt_neo, llama, ...), under peft and DDP wrappers."""
    inner = model
    while not hasattr(inner, "config") and hasattr(inner, "module"):
        inner = inner.module
    return getattr(getattr(inner, "config", None), "model_type", type(inner).__name__)
