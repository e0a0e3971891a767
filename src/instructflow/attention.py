"""Attention over packed rows without a mask: "padding-free" training on any device.

Packed training concatenates the rows of a micro-batch into one sequence whose position ids restart
at each row. transformers' SDPA path then builds a block-diagonal mask, and a masked SDPA on the CPU
falls back to a path whose cost grows with the square of the whole packed length. FlashAttention's
varlen kernels avoid that on a GPU but do not exist on a CPU.

``segment_attention`` is registered with transformers as the attention implementation
``instructflow_segments``. Given ``cu_seq_lens_q`` (the row boundaries, the same keyword FlashAttention's
varlen path reads) it runs causal attention row by row: rows of similar length are gathered into a
small right-padded batch (padding only inside attention, where it is cheap; the linear layers still see
no padding), short groups use plain matmul + softmax attention, which on a CPU is several times faster
than the fused SDPA kernel's backward for rows of a few hundred tokens, and long rows use SDPA with
``is_causal``. Without ``cu_seq_lens_q`` (evaluation, generation, unpacked batches) it is PyTorch SDPA.
"""

from __future__ import annotations

import torch

NAME = "instructflow_segments"
# Rows up to this length go through matmul + softmax; longer ones through SDPA's fused kernel, whose
# memory stays linear in the length. Measured on a 2-core AVX-512 CPU (bf16, 9 heads of 64): for 16
# rows of 128 tokens, forward + backward took 20 ms by matmul + softmax and 65 ms with SDPA's kernel;
# for 4 rows of 512 the kernel won (97 ms against 117 ms); one row of 256: 4.3 ms against 8.1 ms.
MATMUL_MAX_LENGTH = 256
# Rows join a group while the group's longest row is at most this factor longer than its shortest,
# which bounds the attention work spent on padding inside a group.
GROUP_LENGTH_RATIO = 1.5


def segment_kwargs(lengths: list[int], device: torch.device | str | None = None) -> dict:
    """The keyword arguments a transformers model forwards to its attention for packed rows of these
    lengths: cumulative row boundaries and the longest row (FlashAttention varlen's names)."""
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + int(n))
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max((int(n) for n in lengths), default=0)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def group_rows(lengths: list[int]) -> list[list[int]]:
    """Row indices grouped by similar length (longest first), each group run as one padded batch."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] <= GROUP_LENGTH_RATIO * max(lengths[i], 1) \
                and lengths[groups[-1][0]] <= MATMUL_MAX_LENGTH:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _matmul_causal(query, key, value, scaling: float, dropout: float) -> torch.Tensor:
    """Causal attention by matmul + softmax for a right-padded [S, H, L, D] batch: padding sits after
    every real token of its row, so the causal mask alone keeps real tokens from seeing it."""
    length = query.shape[-2]
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    future = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    # Softmax in the scores' own dtype (bf16 under autocast; the kernel accumulates in fp32): its output
    # is the one tensor saved for both backward passes, a third of the memory of an fp32 softmax
    # followed by a cast, and faster. Fused kernels round probabilities to bf16 before P @ V as well.
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    if dropout:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    return torch.matmul(probs, value)


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """transformers attention interface: query [B, H, T, D], key/value [B, Hkv, T, D] ->
    ([B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = cu_seq_lens_q.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    heads, dim = query.shape[1], query.shape[-1]
    # Grouped-query attention: each key/value head serves heads // key_heads query heads.
    key, value = repeat_kv(key, heads // key.shape[1]), repeat_kv(value, heads // value.shape[1])
    scale = scaling if scaling is not None else dim**-0.5
    pieces: list[torch.Tensor | None] = [None] * len(lengths)
    for group in group_rows(lengths):
        width = lengths[group[0]]
        if width == 0:
            for i in group:
                pieces[i] = query.new_zeros(0, heads, dim)
            continue
        # Token index of every (row, position) slot; slots past a row's end repeat its last token
        # (their outputs are dropped below, and causality keeps them out of real tokens' attention).
        index = torch.stack([bounds[i] + torch.arange(width, device=query.device).clamp(max=lengths[i] - 1)
                             for i in group])  # [S, L]
        q, k, v = (t[0].transpose(0, 1)[index].transpose(1, 2) for t in (query, key, value))  # [S, H, L, D]
        if width <= MATMUL_MAX_LENGTH:
            o = _matmul_causal(q, k, v, scale, dropout)
        else:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout)
        o = o.transpose(1, 2)  # [S, L, H, D]
        for j, i in enumerate(group):
            pieces[i] = o[j, : lengths[i]]
    return torch.cat(pieces).unsqueeze(0), None  # [1, T, H, D]


def register() -> str:
    """Make ``attn_implementation=NAME`` loadable; returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, segment_attention)
    return NAME
