"""(IA)³: y = l ⊙ (W x) + b, l = 1 at init; a mergeable row scaling diag(l) W."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from visadapt_testing import TinyNet, randomize_adapters

import visadapt


@pytest.mark.parametrize('make,x_shape', [
    (lambda: nn.Linear(16, 32), (2, 5, 16)),
    (lambda: nn.Conv2d(16, 32, 3, padding=1, groups=4), (2, 16, 6, 6)),
    (lambda: nn.Conv1d(8, 8, 3, groups=8, bias=False), (2, 8, 9)),
])
@pytest.mark.parametrize('path', ['weight', 'bypass'])
def test_scales_the_output_channels(make, x_shape, path):
    torch.manual_seed(0)
    layer = make()
    model = TinyNet(layer)
    x = torch.randn(x_shape)
    channel = (lambda v: v) if isinstance(layer, nn.Linear) else (lambda v: v.view(-1, *([1] * (len(x_shape) - 2))))
    with torch.no_grad():
        base = layer(x)
        wx = base if layer.bias is None else base - channel(layer.bias)
    report = visadapt.inject(model, visadapt.IA3Config(include=['layer'], forward_path=path))
    adapter = model.layer.visadapt['default']
    assert report.adapter_params == layer.weight.shape[0]
    assert torch.all(adapter.l == 1)
    randomize_adapters(model, std=0.5)
    with torch.no_grad():
        torch.testing.assert_close(model.layer(x), channel(adapter.l) * wx + (base - wx))


def test_bypass_is_chosen_for_training_and_merge_scales_rows():
    model = TinyNet(nn.Conv2d(16, 32, 3, padding=1))
    w0 = model.layer.weight.detach().clone()
    visadapt.inject(model, visadapt.IA3Config(include=['layer']))
    adapter = model.layer.visadapt['default']
    assert adapter.use_bypass(torch.randn(2, 16, 8, 8, requires_grad=True))  # no weight gradient needed
    randomize_adapters(model, std=0.5)
    visadapt.merge(model)
    torch.testing.assert_close(model.layer.weight.detach(), w0 * adapter.l.detach().view(-1, 1, 1, 1))


def test_unmerge_refuses_a_zero_scale_and_changes_nothing():
    model = TinyNet(nn.Linear(4, 4))
    visadapt.inject(model, visadapt.IA3Config(include=['layer']))
    with torch.no_grad():
        model.layer.visadapt['default'].l[1] = 0.0
    visadapt.merge(model)
    merged = model.layer.weight.detach().clone()
    with pytest.raises(ValueError, match='zero entries'):
        visadapt.unmerge(model)
    assert torch.equal(model.layer.weight.detach(), merged)
    assert model.layer._va_merged == ['default']
