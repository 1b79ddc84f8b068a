"""LoRA baseline: parameter counts of the Linear / conv-chain / conv-reshape forms, ΔW against naive references,
the conv chain against an explicit convolution with ΔW, init, scaling, path choice and config validation. The
generic invariants (merge, save/load, dtypes, ...) are in tests/test_battery.py."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from flop_count import layer_flops
from visadapt_testing import flop_only_cost_model

import visadapt
from visadapt.core.site import site_from_module
from visadapt.methods.lora import LoRAConfig, lora_bypass, lora_delta_weight, lora_shapes


def _layer_adapter(layer: nn.Module, **cfg):
    model = nn.Sequential(layer)
    visadapt.inject(model, LoRAConfig(**cfg))
    return model, model[0].visadapt['default']


# ---- parameter counts -------------------------------------------------------------------------------------------------
COUNT_CASES = [
    # (layer, r, form, count from the docstring formulas written out)
    (lambda: nn.Linear(64, 128), 8, 'chain', 8 * (64 + 128)),
    (lambda: nn.Linear(64, 128), 8, 'reshape', 8 * (64 + 128)),  # Linear has one form
    (lambda: nn.Conv2d(64, 128, 3), 8, 'chain', 8 * (64 * 9 + 128)),  # r·(in/g·Πk + out)
    (lambda: nn.Conv2d(64, 128, 3), 8, 'reshape', 8 * (128 * 3 + 64 * 3)),  # r·(out·k1 + in/g·k2)
    (lambda: nn.Conv2d(32, 64, (3, 5), groups=4), 4, 'chain', 4 * (8 * 15 + 64)),
    (lambda: nn.Conv2d(32, 64, (3, 5), groups=4), 4, 'reshape', 4 * (64 * 3 + 8 * 5)),
    (lambda: nn.Conv2d(96, 96, 7, groups=96), 4, 'chain', 4 * (1 * 49 + 96)),
    (lambda: nn.Conv2d(96, 96, 7, groups=96), 4, 'reshape', 4 * (96 * 7 + 1 * 7)),
    (lambda: nn.Conv1d(16, 24, 5), 4, 'chain', 4 * (16 * 5 + 24)),
    (lambda: nn.Conv1d(16, 24, 5), 4, 'reshape', 4 * (24 * 5 + 16)),
    (lambda: nn.Conv3d(8, 16, (3, 3, 2)), 2, 'chain', 2 * (8 * 18 + 16)),
    (lambda: nn.Conv3d(8, 16, (3, 3, 2)), 2, 'reshape', 2 * (16 * 3 + 8 * 3 * 2)),
]


@pytest.mark.parametrize('factory,r,form,count', COUNT_CASES, ids=[str(i) for i in range(len(COUNT_CASES))])
def test_parameter_count(factory, r, form, count):
    layer = factory()
    a_shape, b_shape = lora_shapes(site_from_module(layer), r, form)
    assert math.prod(a_shape) + math.prod(b_shape) == count
    _, adapter = _layer_adapter(layer, r=r, conv_form=form)
    assert adapter.num_trainable() == count


# ---- ΔW against naive references --------------------------------------------------------------------------------------
def _random_factors(site, r, form, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a_shape, b_shape = lora_shapes(site, r, form)
    return (torch.randn(a_shape, generator=gen, dtype=torch.float64),
            torch.randn(b_shape, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize('factory', [lambda: nn.Linear(6, 5), lambda: nn.Conv1d(6, 4, 3),
                                     lambda: nn.Conv2d(6, 4, (3, 2), groups=2), lambda: nn.Conv3d(4, 6, 2)])
def test_chain_delta_weight_is_sum_over_rank_of_outer_products(factory):
    """Chain form: ΔW[o, c, κ] = s · Σ_j B[o, j] A[j, c, κ]."""
    site = site_from_module(factory())
    A, B = _random_factors(site, 3, 'chain')
    ref = torch.zeros(site.weight_shape, dtype=torch.float64)
    for j in range(3):
        ref += B[:, j].reshape(-1, *([1] * (len(site.weight_shape) - 1))) * A[j]
    torch.testing.assert_close(lora_delta_weight(site, A, B, 0.5, 'chain'), 0.5 * ref)


@pytest.mark.parametrize('factory', [lambda: nn.Conv1d(6, 4, 3), lambda: nn.Conv2d(6, 4, (3, 2)),
                                     lambda: nn.Conv2d(8, 4, (2, 3), groups=4), lambda: nn.Conv3d(4, 6, (2, 3, 2))])
def test_reshape_delta_weight_matches_eq3_index_map(factory):
    """Reshape form (FLoRA eq. 3): M = B A is (out·k1) × (in/g·k2···kd); ΔW[o, c, a, b...] = s · M[o·k1 + a,
    c·(k2···kd) + flat(b...)], written out element by element."""
    site = site_from_module(factory())
    out, cin, k = site.out_features, site.in_features, site.kernel_size
    A, B = _random_factors(site, 2, 'reshape')
    M = B @ A
    assert M.shape == (out * k[0], cin * math.prod(k[1:]))
    ref = torch.zeros(site.weight_shape, dtype=torch.float64)
    rest = list(itertools.product(*[range(s) for s in k[1:]]))
    for o, c, a in itertools.product(range(out), range(cin), range(k[0])):
        for flat, b in enumerate(rest):
            ref[(o, c, a, *b)] = M[o * k[0] + a, c * len(rest) + flat]
    torch.testing.assert_close(lora_delta_weight(site, A, B, 3.0, 'reshape'), 3.0 * ref)


def test_reshape_form_has_rank_r_in_the_eq3_matrix_not_in_the_channel_matrix():
    """The two conv forms are different parameterizations: the chain's ΔW is rank r as an out × (in·k²) matrix,
    the reshape form's as an (out·k) × (in·k) matrix (and generally full rank as out × (in·k²))."""
    site = site_from_module(nn.Conv2d(16, 16, 3))
    A, B = _random_factors(site, 2, 'reshape')
    delta = lora_delta_weight(site, A, B, 1.0, 'reshape')
    assert torch.linalg.matrix_rank(delta.movedim(2, 1).reshape(16 * 3, 16 * 3)) == 2
    assert torch.linalg.matrix_rank(delta.reshape(16, -1)) > 2
    A, B = _random_factors(site, 2, 'chain')
    assert torch.linalg.matrix_rank(lora_delta_weight(site, A, B, 1.0, 'chain').reshape(16, -1)) == 2


GEOMETRIES = [
    (lambda: nn.Linear(12, 10), (3, 4, 12)),
    (lambda: nn.Conv1d(12, 8, 3, stride=2, padding=1, padding_mode='reflect'), (2, 12, 9)),
    (lambda: nn.Conv2d(12, 8, 3, stride=2, padding=1), (2, 12, 7, 8)),
    (lambda: nn.Conv2d(8, 16, (3, 5), padding='same', dilation=(2, 1), padding_mode='circular'), (2, 8, 9, 9)),
    (lambda: nn.Conv2d(16, 16, 7, padding=3, groups=16), (2, 16, 8, 8)),
    (lambda: nn.Conv2d(16, 24, 3, padding=1, groups=4, padding_mode='replicate'), (2, 16, 5, 5)),
    (lambda: nn.Conv3d(8, 8, 3, stride=(1, 2, 2), padding=1, groups=2), (2, 8, 3, 6, 6)),
]


@pytest.mark.parametrize('factory,x_shape', GEOMETRIES, ids=[str(i) for i in range(len(GEOMETRIES))])
def test_chain_bypass_matches_explicit_op_with_delta_weight(factory, x_shape):
    layer = factory().double()
    site = site_from_module(layer)
    A, B = _random_factors(site, 3, 'chain', seed=4)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    delta = lora_delta_weight(site, A, B, 2.0, 'chain')
    ref = F.linear(x, delta) if isinstance(layer, nn.Linear) else layer._conv_forward(x, delta, None)
    torch.testing.assert_close(lora_bypass(site, x, A, B, 2.0), ref)


# ---- init, scaling, paths ---------------------------------------------------------------------------------------------
def test_init_A_kaiming_uniform_B_zero():
    """A ~ U(-1/√fan_in, 1/√fan_in) (Kaiming-uniform with a=√5, as PEFT), B = 0."""
    _, adapter = _layer_adapter(nn.Conv2d(64, 32, 3), r=8)
    bound = 1 / math.sqrt(64 * 9)
    A = adapter.A.detach()
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
    assert torch.count_nonzero(adapter.B) == 0


@pytest.mark.parametrize('r,alpha,scale', [(4, None, 1.0), (4, 8, 2.0), (8, 4.0, 0.5)])
def test_alpha_over_r_scaling(r, alpha, scale):
    _, adapter = _layer_adapter(nn.Linear(16, 16), r=r, alpha=alpha)
    assert LoRAConfig(r=r, alpha=alpha).scale == scale
    with torch.no_grad():
        adapter.B.normal_()
    torch.testing.assert_close(adapter.delta_weight(), scale * adapter.B @ adapter.A)


def test_reshape_form_refuses_bypass_and_auto_uses_weight_path():
    with pytest.raises(ValueError, match="conv_form='chain'"):
        _layer_adapter(nn.Conv2d(8, 8, 3), conv_form='reshape', forward_path='bypass')
    _, adapter = _layer_adapter(nn.Conv2d(8, 8, 3), conv_form='reshape')
    assert not adapter.has_bypass and not adapter.use_bypass(torch.randn(1, 8, 5, 5))
    # a Linear has only one LoRA form, with both paths
    _, adapter = _layer_adapter(nn.Linear(8, 8), conv_form='reshape', forward_path='bypass')
    assert adapter.has_bypass


PATH_CASES = [
    ('dw7x7-train', lambda: nn.Conv2d(64, 64, 7, padding=3, groups=64), (2, 64, 14, 14), True, 'weight'),
    ('3x3-dense-train', lambda: nn.Conv2d(64, 64, 3, padding=1), (2, 64, 16, 16), True, 'bypass'),
    ('1x1-big-tiny-infer', lambda: nn.Conv2d(512, 512, 1), (1, 512, 2, 2), False, 'bypass'),
    ('3x3-dense-big-infer', lambda: nn.Conv2d(64, 64, 3, padding=1), (8, 64, 32, 32), False, 'weight'),
]


@pytest.mark.parametrize('factory,x_shape,training,expected', [c[1:] for c in PATH_CASES],
                         ids=[c[0] for c in PATH_CASES])
def test_auto_path_picks_measured_cheaper_path(factory, x_shape, training, expected):
    def flops(path):
        torch.random.default_generator.manual_seed(0)
        return layer_flops(factory(), x_shape, training, LoRAConfig(r=8, forward_path=path))
    measured = {p: flops(p) for p in ('weight', 'bypass')}
    assert min(measured, key=measured.get) == expected, measured
    shared = layer_flops(factory(), x_shape, training)  # the frozen layer's own work, paid by both paths
    extra = {p: f - shared for p, f in measured.items()}
    assert max(extra.values()) >= 1.5 * min(extra.values()), f'not a clear case: extra FLOPs {extra}'
    with flop_only_cost_model():  # the MAC counts decide (per-call charges: tests/test_path_cost.py)
        assert flops('auto') == measured[expected]


@pytest.mark.parametrize('kwargs,match', [
    (dict(r=0), 'LoRA rank r must be a positive integer, got 0'),
    (dict(r=-1), 'got -1'),
    (dict(conv_form='tucker'), "conv_form='tucker' is not valid; use one of \\('chain', 'reshape'\\)"),
    (dict(alpha=float('nan')), 'alpha must be a finite number or None, got nan'),
    (dict(alpha='8'), "got '8'"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)
