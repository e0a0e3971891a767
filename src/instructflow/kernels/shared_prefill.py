"""Evaluation's loss and generation from one pass over the prompts.

The evaluate stage scores each held-out row twice over the same prompt: its loss runs prompt + response through
the model, and generation's prefill runs the prompt again. Here a batch of rows to generate runs once: its
prompts, left-padded so that they all end at one column, except that last column; a copy of that KV cache is
kept for generation; then the last prompt column and the responses (right-padded) run on the cache. Each
part's outputs give its share of the loss (no concatenated copy of them), and decoding (kernels/decode.py)
starts from the copy, so only the last prompt column runs again before the new tokens. SmolLM2-135M, the
demo's 160 held-out rows, 2-core CPU, before kernels/decode.py: 20.3 -> 14.5 s in bf16, 34.7 -> 24.9 s in
fp32, the same loss and generations in fp32 (in bf16, which rounds differently in the new batch shapes: loss
0.4264 against 0.4270, 158 of 160 generations equal).

Rows whose prompts start alike (a template's preamble, a chat template's system prompt) share that prefix: it
runs once, for one row, and its cache starts each batch of those rows (``shared_prefixes``; full-attention caches
only). The demo's 160 held-out rows form two groups (24 and 33 shared tokens: Alpaca's two preambles), which
run 4,085 of their 8,978 prompt tokens; with kernels/decode.py, fp32 with the kernels held to AVX2: base model
32.2 -> 22.3 s, tuned 24.5 -> 17.0 s, the same loss and generations; bf16: 13.3 -> 13.1 and 10.8 -> 8.4 s.

The responses' pass runs rows of like width together (``width_runs``): right-padded to the longest response of
a batch, Code Alpaca's held-out rows ran 35,918 columns for 10,100 tokens. With all of the above, its 200 rows
(SmolLM2-135M, 2-core CPU): 84 -> 40 s in bf16, 147 -> 81 s in fp32 held to AVX2 (the same loss and generations).

``agrees(model)`` runs a probe both ways first: an architecture whose forward takes no position ids or cache,
or whose cache does not continue where it was copied, keeps the two passes (evaluate.py).
"""

from __future__ import annotations

import copy
import functools
import time
from typing import Sequence

import torch
import torch.nn.functional as F

from ..examples import IGNORE_INDEX, Examples
from ..loss import labelled_rows, logits_loss_sum, target_loss_sum
from . import decode, linear_cross_entropy


def layout(rows: Sequence[tuple[torch.Tensor, torch.Tensor, int]], pad_token_id: int, shared: int = 0):
    """Rows (ids, labels, prompt length) past their first ``shared`` tokens (a prefix every row shares, held in a
    cache) as one batch [left-padded prompt | right-padded response]: ids, labels, the attention mask (the
    prefix's ``shared`` columns first), and the column of ``ids`` where every prompt ends."""
    rows = [(x[shared:], y[shared:], p - shared) for x, y, p in rows]
    prompt_width = max(p for _, _, p in rows)
    width = prompt_width + max(len(ids) - p for ids, _, p in rows)
    ids = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (x, y, p) in enumerate(rows):
        place = slice(prompt_width - p, prompt_width - p + len(x))
        ids[b, place], labels[b, place], mask[b, place] = x.long(), y.long(), 1
    return ids, labels, F.pad(mask, (shared, 0), value=1), prompt_width


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows, numbered as generate() numbers them (padding at 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _outputs(net, ids, mask, position_ids, cache, hidden: bool):
    out = net(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True)
    return (out.last_hidden_state if hidden else out.logits), out.cache


def shared_prefixes(prompts: dict[int, list[int]], limits: dict[int, int],
                    min_rows: int) -> list[tuple[int, list[int]]]:
    """The rows of ``prompts`` (row -> prompt tokens) in groups that share a prompt prefix: (its length, the
    rows). Where the rows of a group part at a token, those of each way form a group of their own (recursively)
    where it holds at least ``min_rows`` rows; the others stay. A row's prefix stops at ``limits[row]`` tokens."""
    def split(rows: list[int], depth: int) -> list[tuple[int, list[int]]]:
        while all(limits[r] > depth for r in rows) and len({prompts[r][depth] for r in rows}) == 1:
            depth += 1
        ways: dict[int, list[int]] = {}
        for r in rows:
            if limits[r] > depth:
                ways.setdefault(prompts[r][depth], []).append(r)
        groups = [g for way in ways.values() if len(way) >= min_rows for g in split(way, depth + 1)]
        apart = {r for _, g in groups if len(g) >= min_rows for r in g}
        rest = [r for r in rows if r not in apart]
        return [g for g in groups if len(g[1]) >= min_rows] + ([(depth, rest)] if rest else [])

    return split(list(prompts), 0) if prompts else []


def prefix_limit(labels: torch.Tensor, prompt_length: int) -> int:
    """How many of a row's first tokens may sit in a shared prefix's cache: not its last prompt token (decoding
    starts from it), and no token that is the target of a label."""
    labelled = (labels[1:] != IGNORE_INDEX).nonzero()
    return min(prompt_length, int(labelled[0]) + 1 if len(labelled) else prompt_length) - 1


@torch.inference_mode()
def prefix_cache(model, prefix: torch.Tensor, *, fused: bool):
    """The KV cache of ``prefix`` (one row of tokens); None where it is empty or where the model's cache has a
    layer that is not full attention (kernels/decode.py): then the rows run their whole prompts."""
    if len(prefix) == 0:
        return None
    net = linear_cross_entropy._unwrap(model).base_model if fused else model
    ones = torch.ones((1, len(prefix)), dtype=torch.long, device=prefix.device)
    cache = _outputs(net, prefix[None], ones, positions(ones), None, fused)[1]
    return cache if decode.full_attention(cache) else None


@torch.inference_mode()
def loss_and_cache(model, ids, labels, mask, prompt_width: int, *, fused: bool, prefix=None):
    """The summed loss of a ``layout`` batch and its labelled tokens, the KV cache of every prompt column but
    the last (None where that is no column) and the seconds its pass took. ``prefix``: the KV cache (one row) of
    the prompt tokens every row shares, which ``ids`` follow; ``mask`` has their columns first. ``fused``: the
    loss from the backbone's hidden states (kernels/linear_cross_entropy.py), else from the model's logits."""
    from ..evaluate import synchronize

    net = linear_cross_entropy._unwrap(model).base_model if fused else model
    shared = mask.shape[1] - ids.shape[1]
    position_ids = positions(mask)[:, shared:]
    split = prompt_width - 1
    # Each column's target is the next column's label: the loss of each part needs no other part's outputs.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    loss_of = functools.partial(linear_cross_entropy.hidden_target_loss_sum, model) if fused else target_loss_sum
    loss, n, cache = 0.0, 0, None
    if prefix is not None:
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(ids))
    synchronize(ids.device)
    t0 = time.perf_counter()
    if split > 0:
        first, cache = _outputs(net, ids[:, :split], mask[:, :shared + split], position_ids[:, :split], cache, fused)
        part_loss, n = loss_of(first, targets[:, :split])
        loss = float(part_loss)
        del first
    kept = copy.deepcopy(cache)
    synchronize(ids.device)
    seconds = time.perf_counter() - t0
    rest = slice(split, None)
    part_loss, part_n = _responses_loss(net, loss_of, ids[:, rest], targets[:, rest], mask, position_ids[:, rest],
                                        cache, fused)
    return loss + part_loss, n + part_n, kept, seconds


def _responses_loss(net, loss_of, ids, targets, mask, position_ids, cache, hidden: bool) -> tuple[float, int]:
    """The summed loss of right-padded ``ids`` (each batch row's last prompt column and response) on ``cache``,
    run in runs of rows of like width (``width_runs``: less padding), and its labelled tokens. ``mask``: the
    cache's columns, then those of ``ids``."""
    widths = mask[:, -ids.shape[1]:].sum(1)
    cached = mask.shape[1] - ids.shape[1]
    order = widths.argsort(stable=True)
    runs = width_runs(widths[order].tolist())
    if len(runs) == 1:  # the rows in their cache's order
        order = torch.arange(len(ids), device=ids.device)
    loss, n = 0.0, 0
    for k, run in enumerate(runs):
        rows, width = order[run], int(widths[order[run]].max())
        run_cache = cache if cache is None or k == len(runs) - 1 else copy.deepcopy(cache)
        if run_cache is not None and len(runs) > 1:
            run_cache.batch_select_indices(rows)
        out, _ = _outputs(net, ids[rows, :width], mask[rows, :cached + width], position_ids[rows, :width], run_cache,
                          hidden)
        part_loss, part_n = loss_of(out, targets[rows, :width])
        loss, n = loss + float(part_loss), n + part_n
    return loss, n


# What one more forward call costs, in token columns: 10-20 ms of a CPU's per-call work against ~1-2 ms a
# column for SmolLM2-135M on 2 cores.
CALL_COLUMNS = 16


def width_runs(widths: Sequence[int]) -> list[slice]:
    """``widths`` (ascending) cut into runs, each run padded to its widest, with the fewest columns run in all,
    counting ``CALL_COLUMNS`` for each run's call."""
    best, cut = [0], [0]
    for j in range(1, len(widths) + 1):
        cost, i = min((best[i] + (j - i) * widths[j - 1] + CALL_COLUMNS, i) for i in range(j))
        best.append(cost)
        cut.append(i)
    runs, j = [], len(widths)
    while j > 0:
        runs.append(slice(cut[j], j))
        j = cut[j]
    return runs[::-1]


def loss_and_generate(model, examples: Examples, rows: Sequence[int], gen_cfg, *, batch_size: int,
                      fused: bool) -> tuple[tuple[float, int, int], list[list[int]], float]:
    """For ``rows`` of ``examples``: (summed loss, labelled tokens, rows with any) as evaluate.loss_sums gives
    them, the greedy generations for their prompts as evaluate.generate gives them, and the seconds generation
    took (the prompts' pass and the decoding; the responses' pass is the loss's). Rows that share a prompt
    prefix run it once (``shared_prefixes``); the batches of each such group are sorted by prompt length, and
    decoded together by kernels/decode.py."""
    from ..evaluate import synchronize

    device = next(model.parameters()).device
    lengths = examples.prompt_lengths.tolist()
    prompts = {i: examples.prompt(i).tolist() for i in rows}
    limits = {i: prefix_limit(examples.get(i)[1], lengths[i]) for i in rows}
    total, count, n_rows, seconds = 0.0, 0, 0, 0.0
    generated: dict[int, list[int]] = {}
    pending: list[decode.Prompts] = []

    def decode_pending() -> float:
        t0 = time.perf_counter()
        batch = decode.merged(pending)
        generated.update(zip(batch.rows, decode.greedy(model, batch, gen_cfg.eos_token_id, gen_cfg.max_new_tokens)))
        synchronize(device)
        pending.clear()
        return time.perf_counter() - t0

    for shared, group in shared_prefixes(prompts, limits, batch_size):
        t0 = time.perf_counter()
        prefix = prefix_cache(model, torch.tensor(prompts[group[0]][:shared], device=device), fused=fused)
        shared = 0 if prefix is None else shared
        synchronize(device)
        seconds += time.perf_counter() - t0
        group.sort(key=lambda i: lengths[i])
        for start in range(0, len(group), batch_size):
            idx = group[start:start + batch_size]
            ids, labels, mask, prompt_width = layout([(*examples.get(i), lengths[i]) for i in idx],
                                                     examples.pad_token_id, shared)
            ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
            loss, n, cache, prompt_seconds = loss_and_cache(model, ids, labels, mask, prompt_width, fused=fused,
                                                            prefix=prefix)
            total, count, seconds = total + loss, count + n, seconds + prompt_seconds
            n_rows += labelled_rows(labels)
            last = slice(prompt_width - 1, prompt_width)
            batch = decode.Prompts(idx, ids[:, last], positions(mask)[:, shared:][:, last],
                                   mask[:, :shared + prompt_width], cache)
            if pending and not decode.joins(pending, batch, gen_cfg.max_new_tokens):
                seconds += decode_pending()
            pending.append(batch)
    if pending:
        seconds += decode_pending()
    return (total, count, n_rows), [generated[i] for i in rows], seconds


@torch.inference_mode()
def agrees(model, *, fused: bool) -> str | None:
    """None where ``loss_and_cache`` on a probe batch gives each row's own loss and the cache continues as the
    rows' own forward passes do; else why not."""
    device = next(model.parameters()).device
    vocab = linear_cross_entropy._unwrap(model).config.vocab_size
    generator = torch.Generator().manual_seed(0)
    rows = []
    for prompt, response in ((5, 3), (2, 4)):
        ids = torch.randint(0, vocab, (prompt + response,), generator=generator)
        labels = ids.clone()
        labels[:prompt] = IGNORE_INDEX
        rows.append((ids, labels, prompt))
    rows[1][0][0] = rows[0][0][0]  # a one-token prefix both rows share, run once
    try:
        prefix = prefix_cache(model, rows[0][0][:1].to(device), fused=fused)
        shared = 0 if prefix is None else 1
        ids, labels, mask, width = (t.to(device) if torch.is_tensor(t) else t for t in layout(rows, 0, shared))
        loss, n, cache, _ = loss_and_cache(model, ids, labels, mask, width, fused=fused, prefix=prefix)
        # What decoding computes first from the cache: the last prompt column's logits.
        last = slice(width - 1, width)
        step = model(input_ids=ids[:, last], attention_mask=mask[:, :shared + width],
                     position_ids=positions(mask)[:, shared:][:, last], cache=cache,
                     use_cache=True).logits[:, -1].float()
        alone_loss, alone_n, alone_step = 0.0, 0, []
        for x, y, p in rows:
            logits = model(input_ids=x[None].to(device), use_cache=False).logits
            row_loss, row_n = logits_loss_sum(logits, y[None].to(device))
            alone_loss, alone_n = alone_loss + float(row_loss), alone_n + row_n
            alone_step.append(logits[0, p - 1].float())
    except Exception as err:  # noqa: BLE001 - any failure means "run the prompts twice"
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    alone_step = torch.stack(alone_step)
    scale = float(alone_step.abs().max()) or 1.0
    if n != alone_n or not abs(loss - alone_loss) <= 2e-2 * abs(alone_loss) + 1e-3:
        return f"its loss over the shared pass differs from the rows' own ({loss:.6g} against {alone_loss:.6g})"
    if not float((step - alone_step).abs().max()) <= 2e-2 * scale:
        return "its cache does not continue the prompts as their own forward passes do"
    return None
