"""FLoRA: parameter count, rank clamping, the pure Tucker functions against naive references, the factorized conv
chain against an explicit convolution with ΔW, the automatic path choice against measured FLOPs, init and config
validation. The generic invariants (merge, save/load, dtypes, ...) are in tests/test_battery.py."""
from __future__ import annotations

import math
import string

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from flop_count import layer_flops
from visadapt_testing import adapter_params, flop_only_cost_model, randomize_adapters

import visadapt
from visadapt.core.site import site_from_module
from visadapt.methods import flora
from visadapt.methods.flora import (
    FLoRAConfig,
    flora_bypass,
    flora_delta_weight,
    flora_num_params,
    flora_ranks,
    mode_product,
    tucker_weight,
)


def _layer_adapter(layer: nn.Module, **cfg):
    model = nn.Sequential(layer)
    visadapt.inject(model, FLoRAConfig(**cfg))
    return model, model[0].visadapt['default']


# ---- parameter count and ranks ----------------------------------------------------------------------------------------
PARAM_CASES = [
    # (layer, r, r3, expected ranks J, expected count Σ I_n J_n + Π J_n written out by hand)
    (lambda: nn.Linear(64, 128), 8, 2, (8, 8), 128 * 8 + 64 * 8 + 8 * 8),
    (lambda: nn.Conv2d(64, 128, 3), 8, 2, (8, 8, 2, 2), 128 * 8 + 64 * 8 + 3 * 2 + 3 * 2 + 8 * 8 * 2 * 2),
    (lambda: nn.Conv2d(16, 32, 1), 8, 2, (8, 8, 1, 1), 32 * 8 + 16 * 8 + 1 + 1 + 8 * 8),
    (lambda: nn.Conv2d(96, 96, 7, groups=96), 8, 2, (8, 1, 2, 2), 96 * 8 + 1 * 1 + 7 * 2 + 7 * 2 + 8 * 1 * 2 * 2),
    (lambda: nn.Conv2d(32, 64, 3, groups=4), 16, 3, (16, 8, 3, 3), 64 * 16 + 8 * 8 + 3 * 3 + 3 * 3 + 16 * 8 * 3 * 3),
    (lambda: nn.Conv2d(3, 40, 4, stride=4), 8, 2, (8, 3, 2, 2), 40 * 8 + 3 * 3 + 4 * 2 + 4 * 2 + 8 * 3 * 2 * 2),
    (lambda: nn.Conv2d(16, 32, (3, 1)), 4, 2, (4, 4, 2, 1), 32 * 4 + 16 * 4 + 3 * 2 + 1 * 1 + 4 * 4 * 2 * 1),
    (lambda: nn.Conv1d(24, 12, 5), 4, 3, (4, 4, 3), 12 * 4 + 24 * 4 + 5 * 3 + 4 * 4 * 3),
    (lambda: nn.Conv3d(8, 16, (1, 3, 3)), 4, 2, (4, 4, 1, 2, 2), 16 * 4 + 8 * 4 + 1 + 3 * 2 + 3 * 2 + 4 * 4 * 2 * 2),
    (lambda: nn.Linear(3, 5), 8, 2, (5, 3), 5 * 5 + 3 * 3 + 5 * 3),  # both ranks clamped to the mode sizes
]


@pytest.mark.parametrize('factory,r,r3,ranks,count', PARAM_CASES, ids=[str(i) for i in range(len(PARAM_CASES))])
def test_parameter_count_and_ranks(factory, r, r3, ranks, count):
    layer = factory()
    shape = tuple(layer.weight.shape)
    assert flora_ranks(shape, r, r3) == ranks
    assert flora_num_params(shape, r, r3) == count
    model, adapter = _layer_adapter(layer, r=r, r3=r3)
    assert adapter.num_trainable() == count
    assert tuple(adapter.G.shape) == ranks
    assert [tuple(f.shape) for f in adapter.factors] == list(zip(shape, ranks))
    assert visadapt.summary(model).rows[0]['trainable'] == count


def test_docstring_example_count():
    """The module docstring's worked example (3×3 conv 64→128, r=8, r3=2) is 1,804 parameters."""
    assert '1,804' in flora.__doc__
    assert flora_num_params((128, 64, 3, 3), 8, 2) == 1804


def test_rank_pattern_overrides_rank_per_layer():
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 1))
    visadapt.inject(model, FLoRAConfig(r=4, rank_pattern={'1': 16}))
    assert model[0].visadapt['default'].ranks == (4, 4, 2, 2)
    assert model[1].visadapt['default'].ranks == (16, 16, 1, 1)


# ---- pure functions against naive references --------------------------------------------------------------------------
def _einsum_tucker(core: torch.Tensor, factors) -> torch.Tensor:
    """G ×_1 A1 ... ×_N AN written as one einsum: out[i1..iN] = Σ_j G[j1..jN] Π_n A_n[i_n, j_n]."""
    n = core.dim()
    js, is_ = string.ascii_lowercase[:n], string.ascii_uppercase[:n]
    spec = js + ',' + ','.join(i + j for i, j in zip(is_, js)) + '->' + is_
    return torch.einsum(spec, core, *factors)


@pytest.mark.parametrize('shape', [(6, 5), (7, 4, 3), (8, 3, 3, 2), (5, 4, 3, 2, 3)])
def test_tucker_weight_matches_einsum(shape):
    gen = torch.Generator().manual_seed(0)
    ranks = tuple(max(1, s - 1) for s in shape)
    core = torch.randn(ranks, generator=gen, dtype=torch.float64)
    factors = [torch.randn(i, j, generator=gen, dtype=torch.float64) for i, j in zip(shape, ranks)]
    ref = _einsum_tucker(core, factors)
    torch.testing.assert_close(tucker_weight(core, factors), ref)
    torch.testing.assert_close(flora_delta_weight(core, factors, 2.5), 2.5 * ref)
    # a subset of modes leaves the others at rank size
    partial = tucker_weight(core, factors, modes=range(2, len(shape)))
    assert partial.shape == ranks[:2] + tuple(shape[2:])
    torch.testing.assert_close(tucker_weight(partial, factors, modes=[0, 1]), ref)


def test_mode_product_matches_unfolding_definition():
    """(T ×_n M)_(n) = M T_(n): the mode-n unfolding is multiplied from the left."""
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    for mode in range(3):
        m = torch.randn(7, t.shape[mode], generator=gen, dtype=torch.float64)
        unfolded = t.movedim(mode, 0).reshape(t.shape[mode], -1)
        expected_shape = list(t.shape)
        expected_shape[mode] = 7
        ref = (m @ unfolded).reshape([7] + [s for i, s in enumerate(t.shape) if i != mode]).movedim(0, mode)
        out = mode_product(t, m, mode)
        assert list(out.shape) == expected_shape
        torch.testing.assert_close(out, ref)


GEOMETRIES = [
    (lambda: nn.Linear(12, 10), (3, 4, 12)),
    (lambda: nn.Conv1d(12, 8, 3, stride=2, padding=1), (2, 12, 9)),
    (lambda: nn.Conv1d(8, 8, 5, padding=4, dilation=2, groups=4, padding_mode='circular'), (2, 8, 10)),
    (lambda: nn.Conv2d(12, 8, 3, stride=2, padding=1), (2, 12, 7, 8)),
    (lambda: nn.Conv2d(8, 16, (3, 5), padding='same', dilation=(2, 1), padding_mode='reflect'), (2, 8, 9, 9)),
    (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, padding_mode='replicate'), (2, 8, 9, 9)),
    (lambda: nn.Conv2d(16, 16, 7, padding=3, groups=16), (2, 16, 8, 8)),
    (lambda: nn.Conv2d(8, 16, 3, padding=1, groups=8), (2, 8, 5, 5)),
    (lambda: nn.Conv2d(16, 24, 3, padding=1, groups=4), (2, 16, 5, 5)),
    (lambda: nn.Conv3d(8, 8, 3, stride=(1, 2, 2), padding=1, groups=2), (2, 8, 3, 6, 6)),
    (lambda: nn.Conv3d(4, 8, (1, 1, 1)), (2, 4, 2, 3, 3)),
]


@pytest.mark.parametrize('factory,x_shape', GEOMETRIES, ids=[str(i) for i in range(len(GEOMETRIES))])
def test_bypass_chain_matches_explicit_op_with_delta_weight(factory, x_shape):
    """s · op(x, ΔW) through the 1×1 → k×k → 1×1 chain equals the layer's op run on ΔW itself (float64)."""
    layer = factory().double()
    site = site_from_module(layer)
    gen = torch.Generator().manual_seed(2)
    ranks = flora_ranks(site.weight_shape, 3, 2)
    core = torch.randn(ranks, generator=gen, dtype=torch.float64)
    factors = [torch.randn(i, j, generator=gen, dtype=torch.float64) for i, j in zip(site.weight_shape, ranks)]
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64)
    delta = flora_delta_weight(core, factors, 1.5)
    if isinstance(layer, nn.Linear):
        ref = F.linear(x, delta)
    else:  # nn.ConvNd's own forward (incl. padding_mode) with ΔW as the weight and no bias
        ref = layer._conv_forward(x, delta, None)
    torch.testing.assert_close(flora_bypass(site, x, core, factors, 1.5), ref)


# ---- automatic path choice --------------------------------------------------------------------------------------------
def _path_flops(layer_factory, x_shape, path: str, training: bool) -> int:
    torch.random.default_generator.manual_seed(0)
    return layer_flops(layer_factory(), x_shape, training, FLoRAConfig(r=8, r3=2, forward_path=path))


def _auto_uses_bypass(layer_factory, x_shape, training: bool) -> bool:
    model, adapter = _layer_adapter(layer_factory(), r=8, r3=2)
    x = torch.randn(x_shape)
    with torch.set_grad_enabled(training):
        return adapter.use_bypass(x)


PATH_CASES = [
    # (id, layer, input, training, expected auto path); the expectation is the measured-cheaper path, reasoned:
    # depthwise: ΔW is tiny (C·k²) while the chain runs r-channel convs per group → weight path
    ('dw7x7-train', lambda: nn.Conv2d(64, 64, 7, padding=3, groups=64), (2, 64, 14, 14), True, 'weight'),
    ('dw3x3s2-infer', lambda: nn.Conv2d(64, 64, 3, 2, 1, groups=64), (2, 64, 16, 16), False, 'weight'),
    # big dense 1×1 on a tiny batch at inference: building ΔW (r·C_out·C_in MACs) dwarfs a 4-position chain
    ('1x1-big-tiny-infer', lambda: nn.Conv2d(512, 512, 1), (1, 512, 2, 2), False, 'bypass'),
    # training a dense layer on the weight path pays the full weight gradient (positions·|W|) → the chain is cheaper
    ('3x3-dense-train', lambda: nn.Conv2d(64, 64, 3, padding=1), (2, 64, 16, 16), True, 'bypass'),
    ('linear-train', lambda: nn.Linear(256, 256), (4, 50, 256), True, 'bypass'),
    # inference on many positions: ΔW is built once, the chain would run at every position → weight path
    ('3x3-dense-big-infer', lambda: nn.Conv2d(64, 64, 3, padding=1), (8, 64, 32, 32), False, 'weight'),
    ('conv1d-infer', lambda: nn.Conv1d(32, 32, 5, padding=2), (4, 32, 256), False, 'weight'),
    ('conv3d-train', lambda: nn.Conv3d(32, 32, 3, padding=1), (1, 32, 6, 8, 8), True, 'bypass'),
]


@pytest.mark.parametrize('layer_factory,x_shape,training,expected', [c[1:] for c in PATH_CASES],
                         ids=[c[0] for c in PATH_CASES])
def test_auto_path_picks_measured_cheaper_path(layer_factory, x_shape, training, expected):
    """Where one path needs at least 1.5× the FLOPs of the other, auto counting FLOPs only takes the cheaper one: the
    MAC counts are right. (The fitted CPU model adds per-call and memory-traffic charges, tests/test_path_cost.py.)"""
    flops = {p: _path_flops(layer_factory, x_shape, p, training) for p in ('weight', 'bypass')}
    cheaper = min(flops, key=flops.get)
    assert cheaper == expected, f'measured FLOPs {flops}'
    shared = layer_flops(layer_factory(), x_shape, training)  # the frozen layer's own work, paid by both paths
    extra = {p: f - shared for p, f in flops.items()}
    assert max(extra.values()) >= 1.5 * min(extra.values()), f'not a clear case: extra FLOPs {extra}'
    with flop_only_cost_model():
        chosen = 'bypass' if _auto_uses_bypass(layer_factory, x_shape, training) else 'weight'
        assert chosen == cheaper, f'auto chose {chosen}; measured FLOPs {flops}'
        # and the auto model really runs that path (same FLOPs as the forced one)
        assert _path_flops(layer_factory, x_shape, 'auto', training) == flops[cheaper]


def test_forced_path_is_respected_whatever_the_cost():
    _, adapter = _layer_adapter(nn.Conv2d(64, 64, 7, padding=3, groups=64), forward_path='bypass')
    assert adapter.use_bypass(torch.randn(2, 64, 14, 14))
    _, adapter = _layer_adapter(nn.Conv2d(512, 512, 1), forward_path='weight')
    with torch.no_grad():
        assert not adapter.use_bypass(torch.randn(1, 512, 2, 2))


# ---- init and config --------------------------------------------------------------------------------------------------
def test_init_core_zero_factors_gaussian_with_documented_std():
    """G = 0 and A^(n) ~ N(0, 1/I_n), as the module docstring states."""
    assert 'N(0, 1/I_n)' in flora.__doc__
    _, adapter = _layer_adapter(nn.Linear(2048, 1024), r=16)
    assert torch.count_nonzero(adapter.G) == 0
    for factor in adapter.factors:
        std = factor.detach().std().item()
        assert abs(std - factor.shape[0] ** -0.5) < 0.05 * factor.shape[0] ** -0.5, (factor.shape, std)
        assert abs(factor.detach().mean().item()) < 3 * std / math.sqrt(factor.numel())


def test_scale_multiplies_delta_weight():
    layer = nn.Conv2d(8, 8, 3)
    m1, a1 = _layer_adapter(layer, r=4, scale=1.0)
    randomize_adapters(m1)
    m4, a4 = _layer_adapter(nn.Conv2d(8, 8, 3), r=4, scale=4.0)
    a4.load_state_dict(a1.state_dict())
    torch.testing.assert_close(a4.delta_weight(), 4.0 * a1.delta_weight())


@pytest.mark.parametrize('kwargs,match', [
    (dict(r=0), 'FLoRA rank r must be a positive integer, got 0'),
    (dict(r=-3), 'got -3'),
    (dict(r=2.5), 'got 2.5'),
    (dict(r=True), 'got True'),
    (dict(r3=0), 'FLoRA spatial rank r3 must be a positive integer, got 0'),
    (dict(scale=float('nan')), 'scale must be a finite number, got nan'),
    (dict(scale=float('inf')), 'got inf'),
    (dict(rank_pattern={'conv': 0}), "rank_pattern\\['conv'\\] must be a positive integer, got 0"),
    (dict(target_types=['LayerNorm']), "target type 'LayerNorm' is not supported by FLoRA"),
    (dict(forward_path='fast'), "forward_path='fast' is not valid"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FLoRAConfig(**kwargs)


def test_config_json_roundtrip():
    cfg = FLoRAConfig(r=4, r3=1, scale=4.0, include=['stages.*'], rank_pattern={'fc1': 8}, train_modules=['head'])
    assert visadapt.config_from_dict(cfg.to_dict()) == cfg
    assert visadapt.config_from_dict({'type': 'flora', 'r': 4}) == FLoRAConfig(r=4)


def test_adapter_params_are_fp32_on_the_base_device_and_trainable():
    model, adapter = _layer_adapter(nn.Conv2d(8, 16, 3).to(torch.bfloat16), r=4)
    params = adapter_params(model)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params.values())
    model2, adapter2 = _layer_adapter(nn.Conv2d(8, 16, 3).to(torch.bfloat16), r=4, adapter_dtype='base')
    assert all(p.dtype == torch.bfloat16 for p in adapter_params(model2).values())


@pytest.mark.parametrize('layer_factory,x_shape', [
    (lambda: nn.Linear(48, 40), (2, 7, 48)),
    (lambda: nn.Conv2d(32, 24, 1), (2, 32, 6, 6)),
    (lambda: nn.Conv2d(32, 24, 1, stride=2, padding=1, groups=2, padding_mode='reflect'), (2, 32, 7, 5)),
    (lambda: nn.Conv2d(16, 24, 3, stride=2, padding=1), (2, 16, 9, 9)),
    (lambda: nn.Conv2d(16, 16, 3, padding=1, groups=16), (2, 16, 6, 6)),
], ids=['linear', '1x1', '1x1-strided-padded-grouped-reflect', '3x3-strided', 'depthwise'])
def test_bypass_macs_are_the_measured_flops_and_paths_agree(layer_factory, x_shape):
    """The two-op chain of Linears/1×1 convs (core folded into the up factor, down in the layer's geometry) and the
    three-op chain of k×k convs: ``bypass_macs`` is what they run, and they equal the weight path."""
    from flop_count import measured_flops
    x = torch.randn(x_shape)
    shared = layer_flops(layer_factory(), x_shape, training=False)
    outputs = {}
    for path in ('weight', 'bypass'):
        torch.manual_seed(0)
        model, adapter = _layer_adapter(layer_factory(), r=4, r3=2, scale=2.0, forward_path=path)
        randomize_adapters(model)
        if path == 'bypass':
            with torch.no_grad():
                assert measured_flops(lambda: model[0](x)) - shared == 2 * adapter.bypass_macs(x_shape)
        out = model[0](x)
        out.square().sum().backward()
        outputs[path] = out.detach(), [p.grad.clone() for p in adapter.parameters()]
    torch.testing.assert_close(outputs['bypass'][0], outputs['weight'][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outputs['bypass'][1], outputs['weight'][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
