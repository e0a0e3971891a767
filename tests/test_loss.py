"""Response-only loss equals transformers' own loss, padded or packed, for every supported architecture."""

from __future__ import annotations

import pytest
import torch

from instructflow.batching import collate
from instructflow.examples import IGNORE_INDEX, Examples
from instructflow.loss import response_loss_sum

from conftest import ARCHS, build_model

VOCAB, PAD, EOS = 300, 0, 1


def _examples():
    g = torch.Generator().manual_seed(0)
    rows, plens = [], []
    for p, r in [(5, 3), (9, 6), (3, 1), (12, 4)]:
        ids = torch.randint(2, VOCAB, (p + r,), generator=g).tolist() + [EOS]
        rows.append((ids, [IGNORE_INDEX] * p + ids[p:]))
        plens.append(p)
    return Examples.from_rows(rows, list(range(4)), plens, {"eos_token_id": EOS, "pad_token_id": PAD})


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return build_model(request.param, VOCAB, EOS, PAD)


def test_response_loss_matches_model_loss(model):
    ex = _examples()
    with torch.no_grad():
        for rows in ([1], [0, 1, 2, 3]):
            batch = collate(ex, rows, pack=False)
            total, n = response_loss_sum(model, batch["input_ids"], batch["labels"])
            assert n == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            # Right padding needs no attention mask: labels -100 keep pads out, causality keeps them unseen.
            reference = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
            torch.testing.assert_close(total / n, reference, rtol=1e-5, atol=1e-6)


def test_packed_loss_equals_padded_loss(model):
    ex = _examples()
    rows = [0, 1, 2, 3]
    with torch.no_grad():
        padded = collate(ex, rows, pack=False)
        packed = collate(ex, rows, pack=True)
        pad_sum, pad_n = response_loss_sum(model, padded["input_ids"], padded["labels"])
        pack_sum, pack_n = response_loss_sum(model, packed["input_ids"], packed["labels"], packed["position_ids"])
    # Each packed row starts with a prompt token (label -100), so no pair crosses a row boundary.
    assert pack_n == pad_n
    torch.testing.assert_close(pack_sum, pad_sum, rtol=1e-5, atol=1e-5)


def test_packed_rows_do_not_attend_to_each_other(model):
    ex = _examples()
    packed = collate(ex, [0, 1], pack=True)
    first = len(ex.get(0)[0])
    with torch.no_grad():
        alone = model(input_ids=ex.get(1)[0].long().unsqueeze(0), use_cache=False).logits
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    torch.testing.assert_close(together[:, first:], alone, rtol=1e-4, atol=1e-5)


def test_loss_through_a_peft_wrapper_and_empty_batches(model):
    from peft import LoraConfig, get_peft_model

    ex = _examples()
    batch = collate(ex, [0, 1], pack=False)
    with torch.no_grad():
        plain, n = response_loss_sum(model, batch["input_ids"], batch["labels"])
    # A fresh LoRA adapter is zero, so the wrapped model computes exactly the same loss.
    wrapped = get_peft_model(build_model(model.config.model_type, VOCAB, EOS, PAD),
                             LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        lora, n_lora = response_loss_sum(wrapped, batch["input_ids"], batch["labels"])
    assert n_lora == n
    torch.testing.assert_close(lora, plain, rtol=1e-5, atol=1e-5)

    empty, n_empty = response_loss_sum(model, batch["input_ids"], torch.full_like(batch["labels"], IGNORE_INDEX))
    assert n_empty == 0 and float(empty.detach()) == 0.0 and empty.requires_grad
