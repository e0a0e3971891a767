"""The FLOPs a training step actually computes, for the "MFU (counted)" column of the bench.

"MFU (6N)" credits 6 x parameters per non-pad token, whatever a system computes. This counts, from the
model's config and what a step ran, the multiply-adds of:
- the decoder's linear layers at every position the model ran (padding included where a system computes
  on padding): 2 x weights per position forward; backward twice that (input and weight gradients) for
  full fine-tuning; with LoRA the frozen weights need no weight gradient, so forward + input gradient,
  2/3 of it, plus 6 x the adapters' weights per position;
- attention's score (Q K^T) and value (P V) matmuls: each row group of ``rows`` rows padded to ``width``
  computes full width x width score matrices per head. We count the full square, not the causal half:
  transformers' SDPA with a padding or packed (block-diagonal) mask and our row-by-row matmul attention
  (src/instructflow/kernels/attention.py) compute every entry and mask afterwards. Only SDPA's
  ``is_causal`` kernel (our rows over 256 tokens) and FlashAttention skip blocks above the diagonal, so
  there the count is high by up to half of attention's share (a few % for rows of ~125 tokens). Backward:
  twice the forward (gradients of both operands of both matmuls, all of them needed, LoRA or not);
- the LM head (hidden x vocabulary) only at the positions a system builds logits at: every position for
  systems that project the whole sequence (transformers' own loss, TRL), the labelled positions only for
  instructflow's fast path (src/instructflow/loss.py / kernels/linear_cross_entropy.py). Its weight is
  the tied embedding: full fine-tuning computes its weight gradient, LoRA only the input gradient.
Embedding lookups, norms, activations, softmax, RoPE and biases are not counted (no matmul FLOPs)."""

from __future__ import annotations

from typing import Iterable, Mapping


def _dims(config: Mapping) -> tuple[int, int, int, int, int, int, int]:
    hidden, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return hidden, config["intermediate_size"], layers, heads, kv_heads, head_dim, config["vocab_size"]


def decoder_linear_parameters(config: Mapping) -> int:
    """Weights of the decoder layers' linear maps (q, k, v, o; gate, up, down) of a Llama-style model:
    the parameters every position multiplies by (embedding and LM head excluded)."""
    hidden, inter, layers, heads, kv_heads, head_dim, _ = _dims(config)
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    return layers * (attention + 3 * hidden * inter)


def step_flops(config: Mapping, *, positions: int, attention: Iterable[tuple[int, int]], logit_positions: int,
               method: str = "full", adapter_parameters: int = 0) -> float:
    """Forward + backward FLOPs of one optimiser step.

    positions: positions the linear layers ran (sum of the computed rows' lengths, padding included);
    attention: (rows, width) per attention call (a row group, a padded batch, a packed sequence);
    logit_positions: positions projected onto the vocabulary; method: "full" or "lora";
    adapter_parameters: LoRA's trainable weights (they run at every position)."""
    if method not in ("full", "lora"):
        raise ValueError(f"method must be 'full' or 'lora', not {method!r}")
    hidden, _, layers, heads, _, head_dim, vocab = _dims(config)
    # Forward, backward as a multiple of forward: full = both gradients, LoRA's frozen weights = input only.
    frozen_factor = 3 if method == "full" else 2
    linear = 2 * decoder_linear_parameters(config) * positions * frozen_factor
    adapters = 6 * adapter_parameters * positions if method == "lora" else 0
    # Q K^T and P V: 2 x width^2 x head_dim each per head and row, forward; backward twice that.
    attn = sum(rows * width * width for rows, width in attention) * 2 * 2 * heads * head_dim * layers * 3
    head = 2 * hidden * vocab * logit_positions * frozen_factor
    return float(linear + adapters + attn + head)
