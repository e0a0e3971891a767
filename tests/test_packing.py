"""Packing and padding give the loss of the rows run one by one: no cross-row attention, positions
restart per row, padding is never trained. For every architecture the test fixtures build."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, build_model
from instructflow.batching import collate
from instructflow.examples import IGNORE_INDEX, Examples
from instructflow.loss import response_loss_sum

VOCAB, EOS, PAD = 64, 0, 1


def _examples(seed: int = 0) -> Examples:
    gen = torch.Generator().manual_seed(seed)
    rows, plens = [], []
    for length, plen in ((9, 4), (17, 10), (5, 2), (12, 7)):
        ids = torch.randint(2, VOCAB, (length,), generator=gen).tolist()
        rows.append((ids, [IGNORE_INDEX] * plen + ids[plen:]))
        plens.append(plen)
    return Examples.from_rows(rows, list(range(len(rows))), plens,
                              {"eos_token_id": EOS, "pad_token_id": PAD, "max_length": 64})


def _loss(model, batch) -> tuple[float, int]:
    with torch.no_grad():
        loss, n = response_loss_sum(model, batch["input_ids"], batch["labels"], batch["position_ids"])
    return float(loss), n


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_and_padded_loss_equal_rows_one_by_one(arch):
    model = build_model(arch, VOCAB, EOS, PAD)
    examples = _examples()
    rows = list(range(len(examples)))
    singles = [_loss(model, collate(examples, [i], pack=False)) for i in rows]
    expected, count = sum(s for s, _ in singles), sum(n for _, n in singles)
    for pack in (False, True):
        loss, n = _loss(model, collate(examples, rows, pack=pack))
        assert n == count
        assert loss == pytest.approx(expected, rel=1e-5), f"pack={pack}"

    # The check can fail: without positions restarting per row, packed rows see each other.
    packed = collate(examples, rows, pack=True)
    leaky = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).unsqueeze(0)}
    assert _loss(model, leaky)[0] != pytest.approx(expected, rel=1e-3)


def test_packed_gradients_match_padded():
    model = build_model("llama", VOCAB, EOS, PAD)
    examples = _examples(seed=1)
    rows = list(range(len(examples)))
    grads = []
    for pack in (False, True):
        model.zero_grad()
        batch = collate(examples, rows, pack=pack)
        loss, _ = response_loss_sum(model, batch["input_ids"], batch["labels"], batch["position_ids"])
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
