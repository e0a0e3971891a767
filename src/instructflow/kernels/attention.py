"""Attention over packed rows without a mask: "padding-free" training on any device.

Packed training concatenates the rows of a micro-batch into one sequence whose position ids restart
at each row. transformers' SDPA path then builds a block-diagonal mask, and a masked SDPA on the CPU
falls back to a path whose cost grows with the square of the whole packed length. FlashAttention's
varlen kernels avoid that on a GPU but do not exist on a CPU.

``segment_attention`` is registered with transformers as the attention implementation
``instructflow_segments``. Given ``cu_seq_lens_q`` (the row boundaries, the same keyword FlashAttention's
varlen path reads) it runs causal attention row by row. On a GPU, in bf16, that is one call of PyTorch's own
FlashAttention varlen kernel (``torch.nn.attention.varlen``, no flash_attn package), once a self-test on this
device has matched it with SDPA row by row, forward and backward (``use_varlen``). Elsewhere (a CPU, fp32, a torch
without it, attention dropout): rows of similar length are gathered into a
small right-padded batch (padding only inside attention, where it is cheap; the linear layers still see
no padding), groups of rows up to ``matmul_max_length`` (512 tokens in bf16, 256 in fp32) use plain
matmul + softmax attention, which on a CPU in bf16 is 1.2-5x faster than the fused SDPA kernel forward and
backward, and longer rows use SDPA with ``is_causal``. Without ``cu_seq_lens_q`` (evaluation, generation,
unpacked batches) it is PyTorch SDPA.
"""

from __future__ import annotations

import functools
import importlib

import torch

from . import fused

NAME = "instructflow_segments"
# Rows join a group while the group's longest row is at most this factor longer than its shortest,
# which bounds the attention work spent on padding inside a group.
GROUP_LENGTH_RATIO = 1.5


# Whether each recent call had row boundaries (use_on checks that every layer gets them).
_calls: list[bool] = []


def forward_kwargs(batch: dict, device) -> dict:
    """What a packed micro-batch passes to the model's forward for this attention: its row boundaries."""
    return segment_kwargs(batch["seq_lens"], device) if batch.get("seq_lens") else {}


def use_on(model, longest_row: int) -> str | None:
    """Switch ``model`` to row-by-row attention when it computes, on packed probe rows, what each row alone
    computes with the model's attention; None when switched, else why not (the model is left as it was)."""
    from ..modeling import check, probe_rows, rows_alone, rows_packed

    config = model.config
    window = getattr(config, "sliding_window", None)
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "its attention soft-caps scores, which this attention does not"
    if window is not None and window < longest_row and getattr(config, "use_sliding_window", True):
        return f"its sliding window ({window} tokens) is shorter than the longest row ({longest_row})"
    if not model._can_set_attn_implementation():
        return "its attention layers take no registered attention function"
    before = config._attn_implementation
    training = model.training
    model.eval()
    try:
        rows = probe_rows(model)
        reference = rows_alone(model, rows)
        model.set_attn_implementation(register())
        _calls.clear()
        why = check(lambda: rows_packed(model, rows, **segment_kwargs([len(r) for r in rows], rows[0].device)),
                    reference)
        if why is None and (not _calls or not all(_calls)):
            # A layer that drops the row boundaries would run SDPA over the whole packed row instead.
            why = "its decoder layers do not pass the row boundaries on to the attention"
        if why is not None:
            model.set_attn_implementation(before)
        return why
    except Exception as err:  # noqa: BLE001 - any failure means "keep the model's own attention"
        model.set_attn_implementation(before)
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    finally:
        model.train(training)


def segment_kwargs(lengths: list[int], device: torch.device | str | None = None) -> dict:
    """The keyword arguments a transformers model forwards to its attention for packed rows of these
    lengths: cumulative row boundaries and the longest row (FlashAttention varlen's names)."""
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + int(n))
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max((int(n) for n in lengths), default=0)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


# Rows up to the length below go through matmul + softmax; longer ones through SDPA's fused kernel, whose
# memory stays linear in the length (matmul + softmax keeps heads x length^2 probabilities a row and layer:
# 4.7 MB for 9 heads at 512 in bf16). Measured on a 2-core AVX-512 BF16 CPU, 9 query and 3 key/value heads
# of 64, forward + backward (2026-12-05): in bf16 matmul + softmax took 1.7 against 7.6-9.8 ms for 16 rows
# of 32 tokens, 6.8 against 18 ms for 8 rows of 128, 11 against 19-21 ms for one row of 511 and 49-57
# against 62-67 ms for 4 rows of 512; the kernel won from ~1024 tokens (52-55 against 40-44 ms). In fp32 the
# two were within 10-20% of each other up to 256 tokens and the kernel won above (one row of 400: 13 against
# 10 ms; 4 rows of 512: 108-112 against 63-67 ms), on this CPU's kernels and held to AVX2 alike.
def matmul_max_length(dtype: torch.dtype) -> int:
    """The longest row that attention in ``dtype`` runs by matmul + softmax rather than SDPA's kernel."""
    return 512 if dtype == torch.bfloat16 else 256


def group_rows(lengths: list[int], matmul_max: int) -> list[list[int]]:
    """Row indices grouped by similar length (longest first), each group run as one padded batch; rows
    longer than ``matmul_max`` (they go to SDPA's kernel) stay alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] <= GROUP_LENGTH_RATIO * max(lengths[i], 1) \
                and lengths[groups[-1][0]] <= matmul_max:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class _CausalSoftmax(torch.autograd.Function):
    """fused.causal_softmax with its backward: one pass over the scores each way, where scaling,
    masking and softmax were three (and saves only the probabilities)."""

    @staticmethod
    def forward(ctx, scores, scale):
        probs = fused.causal_softmax(scores, scale)
        ctx.save_for_backward(probs)
        ctx.scale = scale
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        (probs,) = ctx.saved_tensors
        return fused.causal_softmax_backward(grad_probs, probs, ctx.scale), None


class _GatherSlots(torch.autograd.Function):
    """x[slot_token] ([tokens, ...] -> [slots, ...]) whose backward gathers back by token_slot, where
    index_select's would zero a tokens-sized buffer and scatter-add every slot into it. Exact here
    because the slots past a row's end get zero gradient: their outputs are dropped, and causality
    keeps every real query from attending to them."""

    @staticmethod
    def forward(ctx, x, slot_token, token_slot):
        ctx.save_for_backward(token_slot)
        return x.index_select(0, slot_token)

    @staticmethod
    def backward(ctx, grad_slots):
        (token_slot,) = ctx.saved_tensors
        return grad_slots.index_select(0, token_slot), None, None


def _matmul_causal(query, key, value, scaling: float, dropout: float) -> torch.Tensor:
    """Causal attention by matmul + softmax for a right-padded batch: query [S, Hkv, G, L, D] (the G
    query heads that share each key/value head), key and value [S, Hkv, L, D]; returns [S, Hkv, G, L, D].
    Padding sits after every real token of its row, so the causal mask alone keeps real tokens from
    seeing it.

    The G query heads of a key/value head are stacked along the length, [S, Hkv, G*L, D], so one matmul
    serves them all: no copies of keys and values per query head (repeat_kv), and their gradients are
    summed over the G heads inside the backward matmuls instead of by a separate reduction."""
    rows, kv_heads, group, length, dim = query.shape
    scores = torch.matmul(query.reshape(rows, kv_heads, group * length, dim), key.transpose(-1, -2))
    # Softmax in fp32, probabilities in the scores' own dtype (bf16 in bf16 training): they are the one
    # tensor saved for both backward passes, and fused kernels round them to bf16 before P @ V as well.
    probs = _CausalSoftmax.apply(scores.view(rows, kv_heads, group, length, length), scaling).to(value.dtype)
    if dropout:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = torch.matmul(probs.view(rows, kv_heads, group * length, length), value)
    return out.view(rows, kv_heads, group, length, dim)


@functools.lru_cache(maxsize=4)
def _layout(bounds: tuple[int, ...], device: torch.device,
            matmul_max: int) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
    """Where each row's tokens go in the padded group batches, made once per packed micro-batch (every
    layer asks for the same row boundaries). Returns per group (rows, width); the token index of every
    slot of every group, flattened (slots past a row's end repeat its last token: their outputs are
    dropped, and causality keeps them out of real tokens' attention); and for every token, its slot."""
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    shapes, slot_token, token_slot = [], [], [0] * bounds[-1]
    for group in group_rows(lengths, matmul_max):
        width = lengths[group[0]]
        shapes.append((len(group), width))
        for i in group:
            base = len(slot_token)
            slot_token.extend(bounds[i] + min(p, lengths[i] - 1) for p in range(width))
            token_slot[bounds[i]:bounds[i + 1]] = range(base, base + lengths[i])
    as_index = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return shapes, as_index(slot_token), as_index(token_slot)


# Per device ("cuda:0"), what the varlen kernel's self-test found: None where it passed, else why not.
_varlen_why: dict[str, str | None] = {}


def _varlen_causal(query, key, value, cu_seq_lens: torch.Tensor, longest: int, scale: float) -> torch.Tensor:
    """Causal attention over packed rows by PyTorch's FlashAttention varlen kernel: query [1, H, T, D],
    key/value [1, Hkv, T, D] -> [1, T, H, D]."""
    from torch.nn.attention.varlen import varlen_attn
    from transformers.integrations.sdpa_attention import repeat_kv

    heads = query.shape[1]
    key, value = repeat_kv(key, heads // key.shape[1]), repeat_kv(value, heads // value.shape[1])
    q, k, v = (t.squeeze(0).transpose(0, 1).contiguous() for t in (query, key, value))  # [T, H, D]
    out = varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, longest, longest, scale=scale, window_size=(-1, 0))
    return out.unsqueeze(0)


def use_varlen(device: torch.device | str) -> str | None:
    """Whether packed rows on ``device`` run on the varlen kernel: None when its self-test there (run once per
    device) passed, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return "PyTorch's varlen FlashAttention kernel runs on CUDA only"
    if str(device) not in _varlen_why:
        _varlen_why[str(device)] = _varlen_self_test(device)
    return _varlen_why[str(device)]


def _varlen_self_test(device: torch.device) -> str | None:
    """Whether the varlen kernel computes, forward and backward, what SDPA computes row by row in bf16
    (grouped-query heads, rows of 1 to 40 tokens); None when it does, else why not."""
    try:
        importlib.import_module("torch.nn.attention.varlen")
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    lengths, heads, kv_heads, dim = [7, 1, 40, 18], 4, 2, 64
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, sum(lengths), dim, generator=generator).to(device, torch.bfloat16).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    weight = torch.randn(1, sum(lengths), heads, dim, generator=generator).to(device, torch.bfloat16)
    try:
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            kw = segment_kwargs(lengths, device)
            out = _varlen_causal(q, k, v, kw["cu_seq_lens_q"], kw["max_length_q"], dim**-0.5)
            got = (out, *torch.autograd.grad((out.float() * weight).sum(), (q, k, v)))
            ref = causal_rows_alone(q, k, v, lengths)
            want = (ref, *torch.autograd.grad((ref.float() * weight).sum(), (q, k, v)))
        for name, a, b in zip(("output", "query grad", "key grad", "value grad"), got, want):
            error = float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))
            if not error < 0.02:
                return f"its {name} differs from SDPA's by {error:.3g} (relative, largest)"
    except Exception as err:  # noqa: BLE001 - any failure (a shape it got wrong too) keeps the row-by-row attention
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return None


def causal_rows_alone(query, key, value, lengths: list[int]) -> torch.Tensor:
    """What attention over packed rows must compute: SDPA's causal attention over each row alone (query
    [1, H, T, D], key/value [1, Hkv, T, D], rows of ``lengths`` one after another) -> [1, T, H, D]."""
    rows, start = [], 0
    for n in lengths:
        part = slice(start, start + n)
        rows.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, part], key[:, :, part], value[:, :, part], is_causal=True, enable_gqa=True).transpose(1, 2))
        start += n
    return torch.cat(rows, dim=1)


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """transformers attention interface: query [B, H, T, D], key/value [B, Hkv, T, D] ->
    ([B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    longest = kwargs.get("max_length_q")
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    _calls.append(cu_seq_lens_q is not None)
    del _calls[:-1024]
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("row-by-row attention has no soft-capping or attention sinks")
    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    passed = _varlen_why.get(str(query.device), "untested") is None
    if query.is_cuda and passed and not dropout and longest is not None:
        # Under autocast, rotary embeddings can leave fp32 queries and keys: cast them as autocast casts SDPA's.
        half = query.dtype if query.dtype in (torch.bfloat16, torch.float16) else \
            torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        if half is not None:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            query, key, value = (t.to(half) for t in (query, key, value))
            return _varlen_causal(query, key, value, cu_seq_lens_q, int(longest), scale), None
    # The values' dtype is what the attention matmuls run in (under autocast too, where rotary embeddings
    # can leave the queries and keys in fp32).
    matmul_max = matmul_max_length(value.dtype)
    shapes, slot_token, token_slot = _layout(tuple(cu_seq_lens_q.tolist()), query.device, matmul_max)
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[-1]
    scale = scaling if scaling is not None else dim**-0.5
    # One gather per tensor for all groups (squeeze, unlike [0], has a free backward): [slots, H, D].
    q, k, v = (_GatherSlots.apply(t.squeeze(0).transpose(0, 1), slot_token, token_slot) for t in (query, key, value))
    # Split, not sliced: a slice's backward writes its gradient into a zeroed full-size tensor, once per
    # group and tensor, where split's concatenates the groups' gradients in one pass.
    sizes = [rows * width for rows, width in shapes]
    outputs = []
    for (rows, width), q_part, k_part, v_part in zip(shapes, q.split(sizes), k.split(sizes), v.split(sizes)):
        if width == 0:
            continue
        if width <= matmul_max:
            gq = q_part.view(rows, width, kv_heads, heads // kv_heads, dim).permute(0, 2, 3, 1, 4)
            gk, gv = (t.view(rows, width, kv_heads, dim).transpose(1, 2) for t in (k_part, v_part))
            o = _matmul_causal(gq, gk, gv, scale, dropout).permute(0, 3, 1, 2, 4)  # [S, L, Hkv, G, D]
        else:
            gq, gk, gv = (t.view(rows, width, t.shape[1], dim).transpose(1, 2) for t in (q_part, k_part, v_part))
            # Grouped-query attention: each key/value head serves heads // key_heads query heads.
            gk, gv = repeat_kv(gk, heads // kv_heads), repeat_kv(gv, heads // kv_heads)
            o = torch.nn.functional.scaled_dot_product_attention(gq, gk, gv, is_causal=True, scale=scale,
                                                                 dropout_p=dropout).transpose(1, 2)
        outputs.append(o.reshape(rows * width, heads, dim))
    if not outputs:
        return query.new_zeros(1, 0, heads, dim), None
    return torch.cat(outputs).index_select(0, token_slot).unsqueeze(0), None  # [1, T, H, D]


def register() -> str:
    """Make ``attn_implementation=NAME`` loadable; returns the name. Calls without row boundaries go to
    SDPA, so they get SDPA's causal mask."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, segment_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
