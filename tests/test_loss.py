"""Response-only loss equals transformers' own loss, padded or packed, for the fixtures' architectures (the
whole matrix: test_architectures.py); the fast path's fused form equals the plain one."""

from __future__ import annotations

import pytest
import torch

from instructflow.batching import collate
from instructflow.examples import IGNORE_INDEX, Examples
from instructflow.kernels import linear_cross_entropy as fast
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

    no_labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    for loss_sum in (response_loss_sum, fast.response_loss_sum):
        # Training: a zero that still reaches every parameter (DDP); evaluation: a constant zero.
        empty, n_empty = loss_sum(model, batch["input_ids"], no_labels)
        assert n_empty == 0 and float(empty.detach()) == 0.0 and empty.requires_grad
        empty.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        model.zero_grad(set_to_none=True)
        with torch.inference_mode():
            empty, n_empty = loss_sum(model, batch["input_ids"], no_labels)
        assert n_empty == 0 and float(empty) == 0.0


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_linear_cross_entropy_matches_linear_then_cross_entropy(monkeypatch, autocast):
    import torch.nn.functional as F

    loss_module = fast

    # Small chunks so the rows span several of them, the last one partial.
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", 4)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (11,), generator=g)

    def run(fn):
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = fn()
        (value * 0.5).backward()
        return value.detach(), hidden.grad.clone(), weight.grad.clone()

    fused = run(lambda: loss_module.linear_cross_entropy(hidden, weight, targets))
    plain = run(lambda: F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        evaluated = loss_module.linear_cross_entropy(hidden, weight, targets)
    assert not evaluated.requires_grad
    torch.testing.assert_close(evaluated, fused[0])
    assert fused[0].dtype == torch.float32 and fused[1].dtype == fused[2].dtype == torch.float32
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, **tol)


def test_fused_loss_equals_the_plain_loss_and_its_check_catches_a_head_it_would_get_wrong(model):
    batch = collate(_examples(), [0, 1, 2, 3], pack=False)
    with torch.no_grad():
        plain, n = response_loss_sum(model, batch["input_ids"], batch["labels"])
        fused, n_fused = fast.response_loss_sum(model, batch["input_ids"], batch["labels"])
    assert n_fused == n
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert fast.agrees(model) is None
    # The fused loss soft-caps where the config says so; a model whose forward ignores the setting (these
    # do) then computes another loss, and the check says so instead of letting training change the loss.
    model.config.final_logit_softcapping = 0.01
    try:
        assert "does not reproduce the model's logits" in fast.agrees(model)
    finally:
        del model.config.final_logit_softcapping
