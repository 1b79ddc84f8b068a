"""SSL: W' = W diag(s), s ∈ R^{in} per input channel (ConvNd: all groups), s = 1 at init."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from visadapt_testing import TinyNet, randomize_adapters

import visadapt


@pytest.mark.parametrize('make,x_shape', [
    (lambda: nn.Linear(16, 32), (2, 5, 16)),
    (lambda: nn.Conv2d(16, 32, 3, padding=1, groups=4), (2, 16, 6, 6)),
    (lambda: nn.Conv2d(16, 32, 3, padding=1, groups=16), (2, 16, 6, 6)),
    (lambda: nn.Conv3d(8, 4, 3, padding=1), (1, 8, 3, 4, 4)),
])
def test_equals_scaling_the_input_channels(make, x_shape):
    torch.manual_seed(0)
    layer = make()
    model = TinyNet(layer)
    x = torch.randn(x_shape)
    report = visadapt.inject(model, visadapt.SSLConfig(include=['layer']))
    adapter = model.layer.visadapt['default']
    in_channels = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    assert report.adapter_params == in_channels and adapter.s.shape == (in_channels,)
    assert torch.all(adapter.s == 1)
    with torch.no_grad():
        torch.testing.assert_close(model.layer(x), layer._va_class.forward(layer, x), rtol=0, atol=0)
    randomize_adapters(model, std=0.5)
    s = adapter.s.detach()
    scaled_x = x * (s if isinstance(layer, nn.Linear) else s.view(-1, *([1] * (len(x_shape) - 2))))
    with torch.no_grad():
        torch.testing.assert_close(model.layer(x), layer._va_class.forward(layer, scaled_x))


def test_weight_path_only():
    model = TinyNet(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="forward_path='bypass' is not available"):
        visadapt.inject(model, visadapt.SSLConfig(include=['layer'], forward_path='bypass'))
