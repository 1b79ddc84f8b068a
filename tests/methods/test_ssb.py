"""SSB: W' = diag(l) W diag(s); out + in trainable scales, ones at init."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from visadapt_testing import TinyNet, randomize_adapters

import visadapt


@pytest.mark.parametrize('make,x_shape', [
    (lambda: nn.Linear(16, 32), (2, 5, 16)),
    (lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2), (2, 16, 7, 7)),
])
def test_scales_both_sides(make, x_shape):
    torch.manual_seed(0)
    layer = make()
    model = TinyNet(layer)
    x = torch.randn(x_shape)
    report = visadapt.inject(model, visadapt.SSBConfig(include=['layer']))
    adapter = model.layer.visadapt['default']
    out_c, in_c = (layer.out_features, layer.in_features) if isinstance(layer, nn.Linear) else \
        (layer.out_channels, layer.in_channels)
    assert report.adapter_params == out_c + in_c
    assert torch.all(adapter.l == 1) and torch.all(adapter.s == 1)
    randomize_adapters(model, std=0.5)
    l, s = adapter.l.detach(), adapter.s.detach()
    if not isinstance(layer, nn.Linear):
        l, s = l.view(-1, 1, 1), s.view(-1, 1, 1)
    base = layer._va_class.forward
    bias = 0 if layer.bias is None else (layer.bias.detach() if isinstance(layer, nn.Linear)
                                         else layer.bias.detach().view(-1, 1, 1))
    with torch.no_grad():
        expected = l * (base(layer, x * s) - bias) + bias
        torch.testing.assert_close(model.layer(x), expected)
    # the merged weight is diag(l) W diag(s) and unmerge divides both back out
    w0 = layer.weight.detach().clone()
    visadapt.merge(model)
    visadapt.unmerge(model)
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=1e-6, atol=1e-7)
