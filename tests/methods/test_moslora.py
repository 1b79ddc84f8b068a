"""MoSLoRA: ΔW = (α/r) B M A with a Kaiming-uniform mixer M and B = 0."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from visadapt_testing import TinyNet, randomize_adapters

import visadapt


@pytest.mark.parametrize('layer,count', [
    (lambda: nn.Linear(16, 32), 4 * (16 + 32) + 16),
    (lambda: nn.Conv2d(16, 32, 3, padding=1, groups=4), 4 * (4 * 9 + 32) + 16),
    (lambda: nn.Conv1d(16, 8, 5), 4 * (16 * 5 + 8) + 16),
])
def test_parameter_count_and_init(layer, count):
    model = TinyNet(layer())
    report = visadapt.inject(model, visadapt.MoSLoRAConfig(r=4, include=['layer']))
    adapter = model.layer.visadapt['default']
    assert report.adapter_params == count
    assert torch.count_nonzero(adapter.B) == 0
    assert adapter.M.shape == (4, 4) and torch.count_nonzero(adapter.M) == 16
    bound = 1 / 2  # kaiming_uniform(a=√5) on (4, 4): U(-1/√fan_in, 1/√fan_in)
    assert adapter.M.abs().max() <= bound
    assert torch.count_nonzero(adapter.delta_weight()) == 0


@pytest.mark.parametrize('conv_form', ['chain', 'reshape'])
def test_delta_weight_is_b_m_a(conv_form):
    torch.manual_seed(0)
    model = TinyNet(nn.Linear(12, 10))
    visadapt.inject(model, visadapt.MoSLoRAConfig(r=3, alpha=6.0, conv_form=conv_form, include=['layer']))
    randomize_adapters(model)
    a = model.layer.visadapt['default']
    torch.testing.assert_close(a.delta_weight(), 2.0 * a.B @ a.M @ a.A)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(model.layer(x), nn.functional.linear(x, model.layer.weight + 2.0 * a.B @ a.M @ a.A,
                                                                    model.layer.bias))
