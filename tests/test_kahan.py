"""bf16 weights with Kahan-compensated updates (optimi): the compensation starts from the rounding
error, updates below bf16's resolution accumulate, export restores fp32, weight decay is refused."""

from __future__ import annotations

import pytest
import torch

from conftest import HAS_COMPILER
from instructflow.kernels import fused
from instructflow.config import ConfigError, train_settings
from instructflow.kernels.kahan import optimizer_for, restore_fp32


def _layer(value: float = 1.0) -> torch.nn.Linear:
    layer = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(value)
    return layer


def test_weights_become_bf16_and_weight_plus_compensation_is_the_fp32_value():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64)
    original = {name: p.detach().clone() for name, p in layer.named_parameters()}
    optimizer = optimizer_for(layer, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    for name, p in layer.named_parameters():
        assert p.dtype == torch.bfloat16
        comp = optimizer.state[p]["kahan_comp"]
        assert comp.abs().max() > 0  # the rounding error, not zeros
        restored = p.float() + comp.float()
        err = (restored - original[name]).abs().max() / original[name].abs().max()
        rounded_err = (p.float() - original[name]).abs().max() / original[name].abs().max()
        assert err < rounded_err / 100


def test_updates_smaller_than_bf16_resolution_accumulate():
    # At 1.0 bf16 steps are 2**-8 down and 2**-7 up; Adam moves each weight by about lr = 1e-3 a step.
    kahan, plain = _layer(), _layer()
    optimizer = optimizer_for(kahan, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    import optimi

    plain.weight.data = plain.weight.data.to(torch.bfloat16)
    plain_optimizer = optimi.AdamW(plain.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0,
                                   kahan_sum=False)
    x = torch.ones(1, 4, dtype=torch.bfloat16)
    for _ in range(10):
        for layer, opt in ((kahan, optimizer), (plain, plain_optimizer)):
            layer(x).sum().backward()
            opt.step()
            opt.zero_grad()
    assert torch.all(plain.weight == 1.0)  # every update rounded away
    restore_fp32(kahan, optimizer)
    assert kahan.weight.dtype == torch.float32
    assert kahan.weight.detach() == pytest.approx(torch.full((2, 4), 0.99), abs=2e-4)
    assert not optimizer.state  # released on the way


def test_weight_decay_is_refused_for_kahan_full_fine_tuning():
    with pytest.raises(ConfigError, match="advanced.bf16_mode: kahan needs weight_decay 0"):
        train_settings({"advanced": {"bf16_mode": "kahan"}, "weight_decay": 0.01})
    assert train_settings({"advanced": {"bf16_mode": "kahan"}})["weight_decay"] == 0
    assert train_settings({"advanced": {"bf16_mode": "kahan"}, "weight_decay": 0.01, "method": "lora"})  # autocast


@pytest.mark.parametrize("setting, native, expected", [
    ("auto", True, "bf16"), ("auto", False, "fp32"), ("fp32", True, "fp32"), ("bf16", True, "bf16"),
])
def test_auto_precision(monkeypatch, setting, native, expected):
    from instructflow import precision

    monkeypatch.setattr(precision, "bf16_supported", lambda device: native)
    assert precision.resolve(setting, torch.device("cpu")) == expected


def test_bf16_where_it_is_not_native_warns_and_runs_emulated(monkeypatch):
    from instructflow import precision

    monkeypatch.setattr(precision, "bf16_supported", lambda device: False)
    with pytest.warns(RuntimeWarning, match="not native"):
        assert precision.resolve("bf16", torch.device("cpu")) == "bf16"


@pytest.mark.skipif(not HAS_COMPILER, reason="torch.compile needs a C++ compiler")
def test_fused_step_moves_weights_as_optimis_own_step():
    torch.manual_seed(0)
    fused_layer, optimi_layer = torch.nn.Linear(64, 48), torch.nn.Linear(64, 48)
    optimi_layer.load_state_dict(fused_layer.state_dict())
    start = [p.detach().clone() for p in fused_layer.parameters()]
    fused_opt = optimizer_for(fused_layer, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    optimi_opt = optimizer_for(optimi_layer, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    fused.reset()
    try:
        for step in range(6):
            if step == 3:  # a scheduler's new learning rate is new data for the compiled kernel
                for opt in (fused_opt, optimi_opt):
                    opt.param_groups[0]["lr"] = 3e-4
            # From step 2 on, clipping's scale: the kernel applies it as it reads the gradient, optimi gets the
            # gradient scaled beforehand (a power of two: the same values, no rounding in between).
            scale = torch.tensor(0.25) if step >= 2 else None
            for a, b in zip(fused_layer.parameters(), optimi_layer.parameters()):
                a.grad = torch.randn_like(a)
                b.grad = a.grad.clone() if scale is None else a.grad * scale
            fused_opt.step(grad_scale=scale)
            with fused.unfused():  # optimi's per-tensor loop
                optimi_opt.step()
        assert fused.report()["kahan_adamw"] == "compiled"
    finally:
        fused.reset()
    for a, b, before in zip(fused_layer.parameters(), optimi_layer.parameters(), start):
        got = a.float() + fused_opt.state[a]["kahan_comp"].float()
        want = b.float() + optimi_opt.state[b]["kahan_comp"].float()
        # Six Adam steps of random gradients move a weight by about 2e-3; optimi rounds the moments and
        # the step to bf16 after each operation, the kernel once, so the two differ by a small part of that.
        assert (want - before).abs().mean() > 1e-3
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        for key in ("exp_avg", "exp_avg_sq"):  # bf16 moments, each step rounded differently: a few ulps
            torch.testing.assert_close(fused_opt.state[a][key].float(), optimi_opt.state[b][key].float(),
                                       rtol=2**-5, atol=1e-6)


def test_the_fused_steps_scale_is_the_gradients_scaled_first_where_the_step_falls_back():
    # Fused kernels off: optimi's own step runs, on the gradients scaled in place first (Plain's clipping).
    torch.manual_seed(0)
    scaled_layer, plain_layer = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    plain_layer.load_state_dict(scaled_layer.state_dict())
    scaled_opt = optimizer_for(scaled_layer, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    plain_opt = optimizer_for(plain_layer, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    with fused.unfused():
        for _ in range(3):
            for a, b in zip(scaled_layer.parameters(), plain_layer.parameters()):
                a.grad = torch.randn_like(a)
                b.grad = a.grad * 0.25
            scaled_opt.step(grad_scale=torch.tensor(0.25))
            plain_opt.step()
    for a, b in zip(scaled_layer.parameters(), plain_layer.parameters()):
        assert torch.equal(a, b) and torch.equal(scaled_opt.state[a]["exp_avg"], plain_opt.state[b]["exp_avg"])
