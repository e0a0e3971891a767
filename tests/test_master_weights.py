"""bf16 model weights with fp32 masters: conversion, updates below bf16's resolution, state round trips."""

from __future__ import annotations

import pytest
import torch

from instructflow.kernels.master_weights import MasterWeights


def _tied_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def test_parameters_become_bf16_and_the_masters_keep_the_exact_fp32_values():
    model = _tied_llama()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.dtype for name, b in model.named_buffers()}
    masters = MasterWeights(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert {name: b.dtype for name, b in model.named_buffers()} == buffers  # rotary frequencies stay fp32
    # The tied embedding / head is one parameter, so it has one master, and stays tied.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(masters.masters) == len(list(model.parameters()))
    state = masters.state_dict()
    assert set(state) == set(original)
    for name, tensor in original.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], tensor)
        assert torch.equal(dict(model.named_parameters())[name], tensor.to(torch.bfloat16))


def test_updates_smaller_than_bf16_resolution_accumulate_in_the_master():
    # bf16 holds 1.0 and its neighbours 1 - 2**-8 and 1 + 2**-7; a step of 1e-3 rounds back to 1.0.
    layer = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    plain = torch.nn.Parameter(torch.ones(1, 1, dtype=torch.bfloat16))
    masters = MasterWeights(layer)
    sgd, plain_sgd = torch.optim.SGD(masters.masters, lr=1e-3), torch.optim.SGD([plain], lr=1e-3)
    for _ in range(10):
        layer(torch.ones(1, 1, dtype=torch.bfloat16)).sum().backward()
        (plain * 1.0).sum().backward()
        masters.step(sgd)
        assert layer.weight.grad is None and masters.masters[0].grad is None
        plain_sgd.step()
        plain_sgd.zero_grad()
    assert plain.item() == 1.0  # every update rounded away
    assert masters.masters[0].item() == pytest.approx(0.99, abs=1e-6)
    assert torch.equal(layer.weight, masters.masters[0].detach().to(torch.bfloat16))
    assert layer.weight.item() < 1.0


def test_state_round_trip_and_restoring_fp32_for_export():
    model = _tied_llama()
    masters = MasterWeights(model)
    saved = {name: t.clone() + 0.5 for name, t in masters.state_dict().items()}
    masters.load_state_dict(saved)
    for name, p in model.named_parameters():
        assert torch.equal(p, saved[name].to(torch.bfloat16))
    masters.restore_fp32()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, saved[name])
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("max_norm", [0.0, 1e-3])
def test_chunked_step_matches_one_adamw_step_over_all_fp32_gradients(max_norm):
    # The reference: fp32 copies of every gradient at once, clipped by the norm torch computes for them
    # scaled as the step scales (its coefficient comes from bf16 per-tensor norms), one AdamW step.
    model = _tied_llama()
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    masters = MasterWeights(model)
    assert len(masters.chunks) > 1  # the step really runs in pieces
    optimizer = torch.optim.AdamW(masters.masters, lr=1e-2, weight_decay=0.1, fused=True)
    ref_optimizer = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.1, fused=True)
    ids = torch.randint(0, 64, (2, 8))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        for ref, p in zip(reference, model.parameters()):
            ref.grad = p.grad.float()
        norm = masters.step(optimizer, max_norm)
        # The norm before clipping is returned either way (metrics.jsonl logs it).
        expected_norm = float(torch.nn.utils.get_total_norm([ref.grad for ref in reference]))
        assert float(norm) == pytest.approx(expected_norm, rel=5e-3)
        if max_norm:
            assert float(norm) > max_norm  # so the step clipped
            torch._foreach_mul_([ref.grad for ref in reference], max_norm / (float(norm) + 1e-6))
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        for ref, master, p in zip(reference, masters.masters, model.parameters()):
            torch.testing.assert_close(master, ref, rtol=1e-6, atol=1e-7)
            assert torch.equal(p, master.detach().to(torch.bfloat16))
