"""Evaluation's greedy decoding: finished rows leave the batch, and several prompt batches decode as one.

transformers' ``generate`` runs a batch until its longest answer ends, every finished row included, and
evaluation decodes each batch of prompts (``evaluate.batch_size``) on its own. Here the prompt batches'
KV caches (kernels/shared_prefill.py) are left-padded to one width and decoded together, up to
``MAX_CACHE_BYTES`` of cache of which at most ``MAX_PADDING`` is padding, and a row leaves the batch at its
EOS. Each row's tokens are those ``generate`` picks (greedy, the same inputs, positions and mask); only the
batches' shapes differ, so fp32 gives the same tokens and bf16, which rounds differently in other shapes,
nearly the same. SmolLM2-135M, the demo's 160 held-out rows, 32 new tokens at most, 2-core AMD EPYC: base
model 20.2 -> 13.3 s in bf16 (127 of 160 generations equal), 42.2 -> 32.2 s in fp32 with the kernels held to
AVX2 (160 equal); tuned model 13.4 -> 10.8 and 28.8 -> 24.5 s. Without the padding limit, Code Alpaca's
prompts (up to hundreds of tokens) all took the longest one's width: its evaluation got slower (bf16 84 -> 93 s)
where each step read and copied the padding.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

# Rows decode together while their KV cache, grown by max_new_tokens, stays under this, and no more than this
# share of it is padding.
MAX_CACHE_BYTES = 1 << 30
MAX_PADDING = 0.25


@dataclasses.dataclass
class Prompts:
    """A batch of left-padded prompts ready to decode: the rows they are, their last column's tokens and
    positions, the attention mask of every prompt column and the KV cache of all but the last (None where
    there are none)."""

    rows: list[int]
    tokens: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    cache: object


def full_attention(cache) -> bool:
    """A DynamicCache of full-attention layers only, each holding columns (a sliding-window layer keeps its own
    window: its columns are not the mask's)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return (type(cache) is DynamicCache and bool(cache.layers)
            and all(type(layer) is DynamicLayer and layer.get_seq_length() > 0 for layer in cache.layers))


def _bytes(batches: Sequence[Prompts], max_new_tokens: int) -> int:
    """The bytes of ``batches``' merged KV cache once it has grown by ``max_new_tokens`` columns."""
    cache = batches[0].cache
    per_row_column = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) \
        // (len(batches[0].rows) * cache.get_seq_length())
    width = max(b.mask.shape[1] for b in batches) + max_new_tokens
    return per_row_column * width * sum(len(b.rows) for b in batches)


def _padding(batches: Sequence[Prompts], max_new_tokens: int) -> float:
    """The share of ``batches``' merged cache that is left padding, once it has grown by ``max_new_tokens``."""
    widths = [b.mask.shape[1] + max_new_tokens for b in batches]
    rows = [len(b.rows) for b in batches]
    return 1 - sum(r * w for r, w in zip(rows, widths)) / (sum(rows) * max(widths))


def joins(pending: Sequence[Prompts], batch: Prompts, max_new_tokens: int) -> bool:
    """Whether ``batch`` decodes together with the ``pending`` batches: full-attention caches, at most
    ``MAX_CACHE_BYTES`` and ``MAX_PADDING`` of them left padding (each decoding step reads and copies it)."""
    together = [*pending, batch]
    return (bool(pending) and all(full_attention(b.cache) for b in together)
            and _bytes(together, max_new_tokens) <= MAX_CACHE_BYTES
            and _padding(together, max_new_tokens) <= MAX_PADDING)


@torch.inference_mode()
def merged(batches: Sequence[Prompts]) -> Prompts:
    """``batches`` as one: masks and (mergeable) caches left-padded to the widest."""
    if len(batches) == 1:
        return batches[0]
    width = max(b.mask.shape[1] for b in batches)
    cache = batches[0].cache
    for i, layer in enumerate(cache.layers):
        for name in ("keys", "values"):
            parts = [getattr(b.cache.layers[i], name) for b in batches]
            setattr(layer, name, torch.cat([F.pad(p, (0, 0, width - 1 - p.shape[2], 0)) for p in parts]))
            for b in batches[1:]:  # let each part go as soon as it is copied: one layer's copy at a time
                setattr(b.cache.layers[i], name, None)
            del parts
    return Prompts([r for b in batches for r in b.rows], torch.cat([b.tokens for b in batches]),
                   torch.cat([b.positions for b in batches]),
                   torch.cat([F.pad(b.mask, (width - b.mask.shape[1], 0)) for b in batches]), cache)


@torch.inference_mode()
def greedy(model, prompts: Prompts, eos_token_ids: Sequence[int], max_new_tokens: int) -> list[list[int]]:
    """Each row's greedy continuation (in ``prompts.rows``' order) up to (not including) its first EOS or
    ``max_new_tokens`` tokens; a row leaves the batch (and its cache) when it ends."""
    eos = torch.tensor(sorted({int(e) for e in eos_token_ids}), device=prompts.tokens.device)
    tokens, positions, mask, cache = prompts.tokens, prompts.positions, prompts.mask, prompts.cache
    rows = torch.arange(len(tokens))
    out: list[list[int]] = [[] for _ in range(len(tokens))]
    for step in range(int(max_new_tokens)):
        result = model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        cache = result.cache
        chosen = result.logits[:, -1].float().argmax(-1)
        ended = torch.isin(chosen, eos)
        for row, token, end in zip(rows.tolist(), chosen.tolist(), ended.tolist()):
            if not end:
                out[row].append(token)
        going = (~ended).nonzero().squeeze(-1)
        if step + 1 == max_new_tokens or len(going) == 0:
            break
        if len(going) < len(rows):
            cache.batch_select_indices(going)
            rows, chosen, positions, mask = rows[going.cpu()], chosen[going], positions[going], mask[going]
        tokens, positions = chosen[:, None], positions + 1
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
    return out
