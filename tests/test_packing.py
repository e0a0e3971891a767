"""Packing and padding give the loss of the rows run one by one: no cross-row attention, positions
restart per row, padding is never trained. For every architecture the test fixtures build, through
both attention paths packed rows can take: instructflow's row-by-row attention (the default) and
transformers' SDPA with the block-diagonal mask it builds from position ids."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, build_model
from instructflow.kernels import attention
from instructflow.batching import collate
from instructflow.examples import IGNORE_INDEX, Examples
from instructflow.loss import response_loss_sum

VOCAB, EOS, PAD = 64, 0, 1
KERNELS = (attention.register(), "sdpa")


def _forward_kwargs(model, batch) -> dict:
    """Row boundaries for the row-by-row attention; the stock ones read packed position ids."""
    return attention.forward_kwargs(batch, "cpu") if model.config._attn_implementation == attention.NAME else {}


def _examples(seed: int = 0, shape=((9, 4), (17, 10), (5, 2), (12, 7))) -> Examples:
    gen = torch.Generator().manual_seed(seed)
    rows, plens = [], []
    for length, plen in shape:
        ids = torch.randint(2, VOCAB, (length,), generator=gen).tolist()
        rows.append((ids, [IGNORE_INDEX] * plen + ids[plen:]))
        plens.append(plen)
    return Examples.from_rows(rows, list(range(len(rows))), plens,
                              {"eos_token_id": EOS, "pad_token_id": PAD, "max_length": 512})


def _loss(model, batch) -> tuple[float, int]:
    with torch.no_grad():
        loss, n = response_loss_sum(model, batch["input_ids"], batch["labels"], batch["position_ids"],
                                    **_forward_kwargs(model, batch))
    return float(loss), n


def _leaky(packed: dict) -> dict:
    """The packed batch without its row boundaries: one position run over all rows, so they see each other."""
    return {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).unsqueeze(0), "seq_lens": None}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_and_padded_loss_equal_rows_one_by_one(arch, kernel):
    model = build_model(arch, VOCAB, EOS, PAD, attn=kernel)
    examples = _examples()
    rows = list(range(len(examples)))
    singles = [_loss(model, collate(examples, [i], pack=False)) for i in rows]
    expected, count = sum(s for s, _ in singles), sum(n for _, n in singles)
    for pack in (False, True):
        loss, n = _loss(model, collate(examples, rows, pack=pack))
        assert n == count
        assert loss == pytest.approx(expected, rel=1e-5), f"pack={pack}"

    # The check can fail: without the row boundaries, packed rows see each other, which moves the loss of
    # these random models by 1e-4 to 1e-3 of itself: well outside the 1e-5 of the exact check.
    assert _loss(model, _leaky(collate(examples, rows, pack=True)))[0] != pytest.approx(expected, rel=5e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_gradients_match_padded(kernel):
    model = build_model("llama", VOCAB, EOS, PAD, attn=kernel)
    # Lengths on both sides of attention.matmul_max_length (256 in fp32), so both of its paths run.
    examples = _examples(seed=1, shape=((9, 4), (300, 100), (5, 2), (270, 30), (12, 7), (2, 1)))
    rows = list(range(len(examples)))
    packed = collate(examples, rows, pack=True)
    grads = []
    # The check can fail: without the row boundaries, packed rows see each other.
    for batch in (collate(examples, rows, pack=False), packed, _leaky(packed)):
        model.zero_grad()
        loss, _ = response_loss_sum(model, batch["input_ids"], batch["labels"], batch["position_ids"],
                                    **_forward_kwargs(model, batch))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    # fp32 summed in another order (other shapes, other kernels): a few units in the last place of the largest
    # gradient (max 15 here; packed and padded differed by up to 8e-6 on a Xeon with AMX, where leaking
    # rows moves them by up to 4.8).
    atol = 1e-6 * float(grads[0].abs().max())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=atol)
    assert not torch.allclose(grads[2], grads[0], rtol=1e-4, atol=atol)


def test_row_groups_cover_every_row_once_with_bounded_length_spread():
    lengths = [120, 7, 300, 119, 64, 1, 90, 256, 257, 0, 400, 512, 513, 350]
    for matmul_max in (256, 512):
        groups = attention.group_rows(lengths, matmul_max)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for group in groups:
            longest, shortest = lengths[group[0]], min(lengths[i] for i in group)
            assert longest == max(lengths[i] for i in group)
            assert len(group) == 1 or (longest <= matmul_max
                                       and longest <= attention.GROUP_LENGTH_RATIO * max(shortest, 1))
    # Rows past the limit stay alone (SDPA's kernel), rows within it share a group.
    assert [257] in [[lengths[i] for i in g] for g in attention.group_rows(lengths, 256)]
    assert [[513], [512, 400, 350]] == [[lengths[i] for i in g] for g in attention.group_rows(lengths, 512)][:2]


def test_bf16_rows_on_both_sides_of_the_matmul_limit_attend_as_each_row_alone(monkeypatch):
    """In bf16, rows up to 512 tokens run by matmul + softmax (256 in fp32) and longer ones by SDPA's kernel;
    either way each row gets its own causal attention, forward and backward."""
    assert attention.matmul_max_length(torch.bfloat16) == 512
    assert attention.matmul_max_length(torch.float32) == 256
    widths = []
    matmul_causal = attention._matmul_causal
    monkeypatch.setattr(attention, "_matmul_causal", lambda q, *a: widths.append(q.shape[3]) or matmul_causal(q, *a))
    lengths = [600, 300, 513, 200, 512, 7]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, sum(lengths), 16, generator=generator).bfloat16().requires_grad_() for h in (4, 2, 2))
    weight = torch.randn(1, sum(lengths), 4, 16, generator=generator)
    out, _ = attention.segment_attention(None, q, k, v, None, **attention.segment_kwargs(lengths))
    got = (out, *torch.autograd.grad((out.float() * weight).sum(), (q, k, v)))
    assert sorted(widths) == [7, 300, 512]  # 600 and 513 went to SDPA's kernel; 200 shares 300's group
    # Reference: each row alone, SDPA in fp32 on the same bf16 inputs.
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attention.causal_rows_alone(q32, k32, v32, lengths)
    want = (ref, *torch.autograd.grad((ref * weight).sum(), (q32, k32, v32)))
    for name, a, b in zip(("output", "query grad", "key grad", "value grad"), got, want):
        error = float((a.float() - b).abs().max() / b.abs().max())
        assert error < 0.02, (name, error)


def test_the_varlen_flash_kernel_is_for_cuda_and_a_cpu_keeps_the_row_by_row_attention():
    """PyTorch's FlashAttention varlen kernel is CUDA-only: on a CPU its self-test says why without raising, the
    packed attention is the row-by-row one even in bf16, and a bf16 packed forward never takes the varlen branch
    (on a GPU the self-test decides; bench/gpu.sh measures it there)."""
    from instructflow.kernels import _packed_attention

    assert "CUDA only" in attention.use_varlen("cpu")
    assert str(torch.device("cpu")) not in attention._varlen_why
    # The self-test itself, where the kernel cannot run, says why instead of raising.
    assert attention._varlen_self_test(torch.device("cpu")).startswith("NotImplementedError")
    model = build_model("llama", vocab_size=64, eos_id=1, pad_id=0)
    assert _packed_attention(model, bf16=True) == "row-by-row (instructflow_segments)"
    attention._varlen_why["cpu"] = None  # even where a (wrong) entry says it works, a CPU tensor stays row by row
    try:
        q, k, v = (torch.randn(1, h, 9, 16, dtype=torch.bfloat16) for h in (4, 2, 2))
        out, _ = attention.segment_attention(None, q, k, v, None, **attention.segment_kwargs([4, 5]))
        assert out.shape == (1, 9, 4, 16)
    finally:
        attention._varlen_why.pop("cpu")
