"""visadapt.core.path_cost: the fitted per-call and traffic charges change the choice where they should, per device."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from visadapt_testing import flop_only_cost_model

import visadapt
from visadapt.core import path_cost
from visadapt.core.path_cost import CPU, PathCost, cost_model, set_cost_model


def _adapter(layer: nn.Module, config: visadapt.AdapterConfig):
    model = nn.Sequential(layer)
    visadapt.inject(model, config)
    return model[0].visadapt['default']


def _choice(adapter, x_shape, training=True) -> str:
    adapter._path_cache.clear()
    with torch.set_grad_enabled(training):
        return 'bypass' if adapter.use_bypass(torch.randn(x_shape, requires_grad=training)) else 'weight'


def test_per_call_cost_keeps_tiny_conv_chains_on_the_weight_path():
    """EfficientNet-Lite0's blocks.3.0.conv_pwl at 8×96²: by MACs the rank-8 chain is cheaper, but its three conv
    calls (~470 µs each per training step on the 2-core CPU) cost more than the 80×240 weight gradient: measured
    2.98 ms (weight) vs 3.72 ms (bypass) per layer step, docs/bench.md."""
    adapter = _adapter(nn.Conv2d(240, 80, 1, bias=False), visadapt.FLoRAConfig(r=8))
    with flop_only_cost_model():
        assert _choice(adapter, (8, 240, 6, 6)) == 'bypass'
    assert _choice(adapter, (8, 240, 6, 6)) == 'weight'
    # a dense 3×3 conv (SDXL's resnets.0.conv1 at 64²): the 640×320×9 weight gradient outweighs the call charge
    # (measured 16.7 ms weight vs 8.5 ms bypass per layer step)
    dense = _adapter(nn.Conv2d(320, 640, 3, padding=1), visadapt.FLoRAConfig(r=8))
    assert _choice(dense, (1, 320, 8, 8)) == 'bypass'


def test_linear_chains_pay_the_cheaper_matmul_call():
    """A matmul call is charged less than a conv call: the same 1×1 map as a Linear takes the chain earlier."""
    conv = _adapter(nn.Conv2d(240, 80, 1, bias=False), visadapt.FLoRAConfig(r=8))
    linear = _adapter(nn.Linear(240, 80, bias=False), visadapt.FLoRAConfig(r=8))
    shape_conv, shape_linear = (8, 240, 6, 6), (8, 6, 6, 240)
    assert CPU.bypass_cost(linear, shape_linear, True) < CPU.bypass_cost(conv, shape_conv, True)


def test_input_gradient_pass_only_when_the_input_needs_one():
    """A stem reading images (no input gradient) skips the chain's input-gradient pass; a conv reading ≤ 4 channels
    pays ``narrow_input_grad`` for it (mkldnn's input gradient of an RGB conv ran 5× its forward)."""
    stem = _adapter(nn.Conv2d(3, 384, 16, stride=16), visadapt.SVFTConfig(pattern='banded', off_diag=16))
    shape = (4, 3, 96, 96)
    one = CPU.bypass_cost(stem, shape, training=False)
    assert CPU.bypass_cost(stem, shape, True, input_grad=False) == pytest.approx(2 * one)
    assert CPU.bypass_cost(stem, shape, True, input_grad=True) == pytest.approx((2 + CPU.narrow_input_grad) * one)
    wide = _adapter(nn.Conv2d(64, 64, 3), visadapt.FLoRAConfig(r=8))
    assert CPU.bypass_cost(wide, (2, 64, 8, 8), True) == pytest.approx(3 * CPU.bypass_cost(wide, (2, 64, 8, 8), False))
    # ViT-S's patch embedding at 4×96² (measured per layer step: weight 12.5 ms, bypass 14.6 ms with an input
    # gradient): the weight path with an input gradient, the chain for a stem reading images
    x = torch.randn(shape)
    assert not stem.use_bypass(x.requires_grad_(True))
    assert stem.use_bypass(x.detach())


def test_costs_decompose_as_documented():
    adapter = _adapter(nn.Conv2d(64, 128, 3, padding=1), visadapt.FLoRAConfig(r=8, r3=2))
    shape = (2, 64, 16, 16)
    model = PathCost(bypass_elem_macs=10, cached_elems=1, weight_elem_macs=3, conv_op_macs=100, matmul_op_macs=7)
    elems = math.prod(shape) + 2 * 16 * 16 * 128
    one_bypass = adapter.bypass_macs(shape) + 10 * elems + 100 * adapter.bypass_ops()
    assert model.bypass_cost(adapter, shape, training=False) == pytest.approx(one_bypass)
    assert model.bypass_cost(adapter, shape, training=True) == pytest.approx(3 * one_bypass)
    one_weight = adapter.delta_macs() + 7 * adapter.delta_ops() + 3 * 128 * 64 * 9
    assert model.weight_cost(adapter, shape, training=False) == pytest.approx(one_weight)
    base = 2 * 16 * 16 * 128 * 64 * 9
    assert model.weight_cost(adapter, shape, training=True) == pytest.approx(base + 3 * one_weight)


def test_models_are_per_device_type_and_replaceable():
    assert cost_model('cpu') is CPU and cost_model('mps') is CPU
    assert cost_model('cuda') is path_cost.CUDA and path_cost.CUDA.conv_op_macs > CPU.conv_op_macs
    adapter = _adapter(nn.Linear(256, 256), visadapt.FLoRAConfig(r=8))
    x = torch.randn(4, 50, 256, requires_grad=True)
    adapter.use_bypass(x)
    assert (tuple(x.shape), 'cpu', True, True) in adapter._path_cache   # per shape, device, mode, input grad
    try:
        set_cost_model('cpu', PathCost(conv_op_macs=0, matmul_op_macs=1e15))   # calls made absurdly expensive
        assert _choice(adapter, (4, 50, 256)) == 'weight'                        # 2 matmuls to build < 3 per pass
    finally:
        set_cost_model('cpu', CPU)
    assert _choice(adapter, (4, 50, 256)) == 'bypass'


@pytest.mark.parametrize('bad,match', [
    (dict(conv_op_macs=-1.0), "conv_op_macs': -1.0"),
    (dict(bypass_elem_macs=float('nan')), "bypass_elem_macs': nan"),
])
def test_set_cost_model_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        set_cost_model('cpu', PathCost(**bad))
    with pytest.raises(TypeError, match='needs a visadapt.core.path_cost.PathCost, got dict'):
        set_cost_model('cpu', {'conv_op_macs': 1})
    assert cost_model('cpu') is CPU
