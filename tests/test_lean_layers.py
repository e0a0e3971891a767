"""Lean RMSNorm / SwiGLU layers: same outputs and gradients as transformers' own, less kept for
backward, and modules computing something else are left alone."""

from __future__ import annotations

import copy

import pytest
import torch

from instructflow.kernels import lean_layers


def _llama(dtype=torch.float32):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # trained-looking norm weights, not all ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _saved_bytes_loss_and_grads(model, ids):
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(saved.values()), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_llama_matches_the_original_and_keeps_less_for_backward(dtype):
    base = _llama(dtype)
    lean = copy.deepcopy(base)
    assert lean_layers.patch(lean) == {"rms_norm": 5, "swiglu_mlp": 2}  # 2 per layer + the final norm
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    base_bytes, base_loss, base_grads = _saved_bytes_loss_and_grads(base, ids)
    lean_bytes, lean_loss, lean_grads = _saved_bytes_loss_and_grads(lean, ids)
    assert lean_bytes < 0.8 * base_bytes
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.02}
    torch.testing.assert_close(lean_loss, base_loss, **tol)
    for name, grad in base_grads.items():
        if dtype == torch.float32:
            torch.testing.assert_close(lean_grads[name], grad, **tol)
        else:  # bf16 rounding differs op by op; the gradients agree in direction and size
            cos = torch.nn.functional.cosine_similarity(lean_grads[name].float().flatten(), grad.float().flatten(), dim=0)
            assert cos > 0.99, name


class GemmaLikeRMSNorm(torch.nn.Module):
    """Normalises like RMSNorm but scales by (1 + weight), as Gemma does."""

    def __init__(self, width):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(width))
        self.eps = 1e-6

    def forward(self, x):
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * (1 + self.weight)


class SwappedMLP(torch.nn.Module):
    """The SwiGLU modules' names, but the activation on the up projection."""

    def __init__(self, width):
        super().__init__()
        self.gate_proj = torch.nn.Linear(width, 2 * width, bias=False)
        self.up_proj = torch.nn.Linear(width, 2 * width, bias=False)
        self.down_proj = torch.nn.Linear(2 * width, width, bias=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))


def test_modules_that_compute_something_else_keep_their_own_forward():
    model = torch.nn.Sequential(GemmaLikeRMSNorm(8), SwappedMLP(8))
    x = torch.randn(3, 8)
    before = model(x)
    assert lean_layers.patch(model) == {"rms_norm": 0, "swiglu_mlp": 0}
    assert "forward" not in vars(model[0]) and "forward" not in vars(model[1])
    torch.testing.assert_close(model(x), before)
