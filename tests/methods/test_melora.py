"""MELoRA: ΔW = (α/r) blockdiag(B_i A_i), n mini-LoRAs of rank r, computed without loops over blocks."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from visadapt_testing import TinyNet, randomize_adapters

import visadapt
from visadapt.core.site import site_from_module
from visadapt.methods.melora import melora_blocks


def _reference_delta(layer: nn.Module, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """Loop over groups and blocks, writing each block B_{g,i} A_i into a zero matrix."""
    out, cin = layer.weight.shape[:2]
    g = getattr(layer, 'groups', 1)
    n = A.shape[0]
    O, C = out // (g * n), cin // n
    delta = torch.zeros(out, layer.weight[0].numel())
    K = layer.weight[0, 0].numel()
    for gi in range(g):
        for i in range(n):
            block = B[gi, i] @ A[i].flatten(1)            # (O, C·K)
            rows = slice(gi * out // g + i * O, gi * out // g + (i + 1) * O)
            delta[rows, i * C * K:(i + 1) * C * K] = block
    return scale * delta.reshape(layer.weight.shape)


@pytest.mark.parametrize('make,n,count', [
    (lambda: nn.Linear(16, 32), 4, 2 * (16 + 32)),
    (lambda: nn.Conv2d(16, 32, 3, padding=1), 2, 2 * (16 * 9 + 32)),
    (lambda: nn.Conv2d(16, 32, 3, padding=1, groups=2), 4, 2 * (8 * 9 + 32)),
    (lambda: nn.Conv1d(12, 24, 3, groups=3), 2, 2 * (4 * 3 + 24)),
])
def test_count_block_structure_and_rank(make, n, count):
    torch.manual_seed(0)
    layer = make()
    model = TinyNet(layer)
    report = visadapt.inject(model, visadapt.MELoRAConfig(r=2, n=n, alpha=4.0, include=['layer']))
    adapter = model.layer.visadapt['default']
    assert report.adapter_params == count
    assert adapter.n == n
    assert torch.count_nonzero(adapter.delta_weight()) == 0
    randomize_adapters(model)
    delta = adapter.delta_weight()
    torch.testing.assert_close(delta, _reference_delta(layer, adapter.A, adapter.B, 2.0))
    g = getattr(layer, 'groups', 1)
    rows, cols = delta.shape[0] // g, delta[0].numel()
    rank = torch.linalg.matrix_rank(delta.detach().flatten(1).reshape(g, rows, cols))
    expected = n * min(2, rows // n, cols // n)  # n blocks of rank r = 2 each
    assert rank.tolist() == [expected] * g, 'a mini-ensemble of n rank-r blocks has rank n·r per group'


def test_layer_n_is_gcd_with_the_channel_counts():
    assert melora_blocks(site_from_module(nn.Linear(12, 18)), 4) == 2
    assert melora_blocks(site_from_module(nn.Conv2d(16, 16, 3, groups=16)), 4) == 1  # depthwise: plain LoRA
    assert melora_blocks(site_from_module(nn.Conv2d(16, 32, 3, groups=2)), 8) == 8


@pytest.mark.parametrize('bad', [dict(n=0), dict(r=-1), dict(alpha=float('nan'))])
def test_bad_config(bad):
    with pytest.raises(ValueError, match='MELoRA'):
        visadapt.MELoRAConfig(**bad)
