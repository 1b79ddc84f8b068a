"""SVFT: patterns, Table 7 counts, U/V from the SVD, weight == bypass, init options, fingerprint and bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from visadapt_testing import TinyNet, assert_unchanged, randomize_adapters, state_snapshot

import visadapt
from visadapt.methods.svft import banded_count, svft_bases, svft_num_params, svft_pattern

PATTERNS = ['plain', 'banded', 'random', 'top_k']


def _adapter(model, name='default'):
    return model.layer.visadapt[name]


def _dense_m(adapter) -> torch.Tensor:
    M = torch.zeros(adapter.p, adapter.p)
    M[adapter.indices[0], adapter.indices[1]] = adapter.m_values().detach()
    return M


# ---- patterns and counts -------------------------------------------------------------------------------------------
def test_patterns():
    p = 6
    plain = svft_pattern('plain', p)
    assert torch.equal(plain, torch.stack([torch.arange(p)] * 2))
    band = svft_pattern('banded', p, off_diag=2)
    assert band.shape[1] == banded_count(p, 2) == 6 * 5 - 6
    assert ((band[0] - band[1]).abs() <= 2).all()
    rand = svft_pattern('random', p, k=10, seed=3)
    flat = rand[0] * p + rand[1]
    assert rand.shape == (2, 10) and flat.unique().numel() == 10               # distinct entries
    assert torch.equal(rand, svft_pattern('random', p, k=10, seed=3))        # reproducible
    assert not torch.equal(rand, svft_pattern('random', p, k=10, seed=4))
    W = torch.randn(p, p, generator=torch.Generator().manual_seed(0))
    U, V = svft_bases(W)
    top = svft_pattern('top_k', p, k=5, U=U, V=V)
    align = (U.t() @ V).abs()
    picked = align[top[0], top[1]]
    mask = torch.ones(p, p, dtype=torch.bool)
    mask[top[0], top[1]] = False
    assert picked.min() >= align[mask].max()                                  # the 5 largest |u_iᵀ v_j|


@pytest.mark.parametrize('pattern,extra', [('plain', {}), ('banded', {'off_diag': 2}), ('banded', {'off_diag': 8}),
                                           ('random', {'k': 37}), ('random', {}), ('top_k', {'k': 20})])
def test_parameter_counts_table7(pattern, extra):
    model = TinyNet(nn.Linear(24, 24))
    report = visadapt.inject(model, visadapt.SVFTConfig(pattern=pattern, include=['layer'], **extra))
    d = extra.get('off_diag', 2)
    table7_banded = 24 * d + (24 - d) * (d + 1)                  # Table 7: D·k + (D − k)(k + 1)
    expected = {'plain': 24, 'banded': table7_banded}.get(pattern, extra.get('k', table7_banded))
    assert report.adapter_params == expected == svft_num_params(24, 24, pattern, **extra)


def test_counts_non_square_truncated_and_gated():
    model = TinyNet(nn.Linear(48, 20))
    assert visadapt.inject(model, visadapt.SVFTConfig(include=['layer'])).adapter_params == 20   # min(out, in)
    model = TinyNet(nn.Linear(48, 20))
    report = visadapt.inject(model, visadapt.SVFTConfig(pattern='banded', off_diag=1, r=8, include=['layer']))
    assert report.adapter_params == 8 * 3 - 2 and _adapter(model).U.shape == (20, 8)
    model = TinyNet(nn.Linear(16, 16))
    report = visadapt.inject(model, visadapt.SVFTConfig(init='gated', include=['layer']))
    assert report.adapter_params == 16 + 1


# ---- the bases --------------------------------------------------------------------------------------------------------
def test_bases_are_the_svd_of_w_frozen_and_not_saved():
    torch.manual_seed(0)
    model = TinyNet(nn.Linear(12, 20))
    visadapt.inject(model, visadapt.SVFTConfig(include=['layer']))
    adapter = _adapter(model)
    U, V = adapter.U, adapter.V
    assert U.shape == (20, 12) and V.shape == (12, 12)
    torch.testing.assert_close(U.t() @ U, torch.eye(12), atol=1e-5, rtol=0)
    sigma = torch.linalg.svdvals(model.layer.weight.detach())
    torch.testing.assert_close(U @ torch.diag(sigma) @ V.t(), model.layer.weight.detach(), atol=1e-5, rtol=0)
    # canonical signs: the largest-magnitude entry of every u_i is positive
    assert (U.gather(0, U.abs().argmax(0, keepdim=True)) > 0).all()
    keys = set(model.state_dict())
    assert 'layer.visadapt.default.U' not in keys and 'layer.visadapt.default.V' not in keys
    assert {'layer.visadapt.default.values', 'layer.visadapt.default.indices'} <= keys
    assert not any(b.requires_grad for b in (U, V))


def test_svd_in_float32_for_half_weights_and_bf16_storage():
    torch.manual_seed(0)
    model = TinyNet(nn.Linear(16, 16)).to(torch.bfloat16)
    visadapt.inject(model, visadapt.SVFTConfig(include=['layer'], basis_dtype='bfloat16'))
    adapter = _adapter(model)
    assert adapter.U.dtype == torch.bfloat16 and adapter.values.dtype == torch.float32
    model.float()                                                    # casts everything else, not U and V
    assert adapter.U.dtype == torch.bfloat16 and adapter.V.dtype == torch.bfloat16
    ref_U, _ = svft_bases(model.layer.weight.detach())
    torch.testing.assert_close(adapter.U.float(), ref_U, atol=1e-2, rtol=0)


# ---- the update ------------------------------------------------------------------------------------------------------
_LINEAR = (lambda: nn.Linear(16, 16), (2, 5, 16))
_CONV = (lambda: nn.Conv2d(8, 12, 3, padding=1, groups=2), (2, 8, 6, 6))   # matrix (12, 4·9): not square, no top-k


@pytest.mark.parametrize('pattern,layer,shape', [(p, *_LINEAR) for p in PATTERNS]
                         + [(p, *_CONV) for p in PATTERNS if p != 'top_k'])
def test_delta_is_u_m_vt_and_paths_agree(pattern, layer, shape):
    x = torch.randn(shape)
    results = {}
    for path in ('weight', 'bypass'):
        torch.manual_seed(0)
        model = TinyNet(layer())
        visadapt.inject(model, visadapt.SVFTConfig(pattern=pattern, k=9 if pattern in ('random', 'top_k') else None,
                                                   include=['layer'], forward_path=path))
        randomize_adapters(model)
        adapter = _adapter(model)
        delta = (adapter.U @ _dense_m(adapter) @ adapter.V.t()).reshape(model.layer.weight.shape)
        torch.testing.assert_close(adapter.delta_weight().detach(), delta, rtol=1e-5, atol=1e-6)
        out = model.layer(x)
        out.square().sum().backward()
        results[path] = out.detach(), adapter.values.grad.clone()
    torch.testing.assert_close(results['bypass'][0], results['weight'][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results['bypass'][1], results['weight'][1], rtol=1e-4, atol=1e-4)


# M folded into Vᵀ once (in ≤ positions·groups) or applied to the activations (few positions), Linear and conv
_COST_CASES = [
    ('linear-fold', lambda: nn.Linear(24, 40), (2, 30, 24)),
    ('linear-activations', lambda: nn.Linear(40, 24), (1, 3, 40)),
    ('conv-fold', lambda: nn.Conv2d(8, 12, 3, padding=1, groups=2), (2, 8, 6, 6)),
    ('conv-activations', lambda: nn.Conv2d(16, 24, 3, stride=2, groups=2), (1, 16, 3, 3)),
]


@pytest.mark.parametrize('pattern', ['plain', 'banded', 'random'])
@pytest.mark.parametrize('layer,shape', [c[1:] for c in _COST_CASES], ids=[c[0] for c in _COST_CASES])
def test_cost_counts_are_the_measured_flops_and_both_paths_agree(pattern, layer, shape):
    """delta_macs / bypass_macs (what the path choice compares) are the FLOPs each path really runs, in both bypass
    forms, and the forms give the weight path's output and gradient."""
    from flop_count import layer_flops, measured_flops
    x = torch.randn(shape)
    shared = layer_flops(layer(), shape, training=False)
    results = {}
    for path in ('weight', 'bypass'):
        torch.manual_seed(0)
        model = TinyNet(layer())
        visadapt.inject(model, visadapt.SVFTConfig(pattern=pattern, off_diag=1, include=['layer'],
                                                   forward_path=path))
        randomize_adapters(model)
        adapter = _adapter(model)
        with torch.no_grad():
            extra = measured_flops(lambda: model.layer(x)) - shared
        expected = adapter.delta_macs() if path == 'weight' else adapter.bypass_macs(shape)
        if pattern == 'plain':  # M = diag: its product is a scaling (p·max(out, in) MACs), which the counter skips
            assert 0 < 2 * expected - extra <= 2 * adapter.p * max(adapter.site.matrix_shape()), (path, extra, expected)
        else:
            assert extra == 2 * expected, (path, extra, expected)
        out = model.layer(x)
        out.square().sum().backward()
        results[path] = out.detach(), adapter.values.grad.clone()
    torch.testing.assert_close(results['bypass'][0], results['weight'][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results['bypass'][1], results['weight'][1], rtol=1e-4, atol=1e-4)


def test_gated_init_is_official_codes():
    torch.manual_seed(0)
    model = TinyNet(nn.Linear(32, 32))
    visadapt.inject(model, visadapt.SVFTConfig(pattern='banded', off_diag=2, init='gated', include=['layer']))
    adapter = _adapter(model)
    k = adapter.values.numel()
    assert adapter.gate.item() == 0 and adapter.gate.requires_grad
    assert abs(adapter.values.std().item() - math.sqrt(2 / k)) < 0.3 * math.sqrt(2 / k)
    torch.testing.assert_close(adapter.m_values(), adapter.values * 0.5)    # σ(0) = 1/2
    assert adapter.delta_weight().abs().max() > 0                             # not the base model at step 0
    x = torch.randn(2, 3, 32)
    model(x).sum().backward()
    assert adapter.gate.grad is not None and adapter.gate.grad.abs() > 0


def test_zero_init_is_the_base_model():
    model = TinyNet(nn.Linear(16, 16))
    x = torch.randn(2, 3, 16)
    base = model(x)
    visadapt.inject(model, visadapt.SVFTConfig(pattern='banded', include=['layer']))
    assert torch.equal(model(x), base)


def test_path_choice_follows_the_shapes():
    model = TinyNet(nn.Linear(256, 256))
    visadapt.inject(model, visadapt.SVFTConfig(include=['layer']))
    adapter = _adapter(model)
    assert adapter.use_bypass(torch.randn(1, 2, 256))                 # few tokens: apply Vᵀ, M, U to activations
    assert not adapter.use_bypass(torch.randn(64, 256, 256))          # many tokens: build U M Vᵀ once


# ---- save / load and the fingerprint -----------------------------------------------------------------------------------
def test_pattern_travels_with_the_file_and_other_base_weights_are_refused(tmp_path):
    torch.manual_seed(0)
    model = TinyNet(nn.Linear(16, 16))
    visadapt.inject(model, visadapt.SVFTConfig(pattern='random', k=20, seed=5, include=['layer']))
    randomize_adapters(model)
    visadapt.save_adapter(model, tmp_path / 'a')
    x = torch.randn(2, 3, 16)
    # same base weights, also rounded to bf16: accepted
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        same = TinyNet(nn.Linear(16, 16)).to(dtype)
        visadapt.load_adapter(same, tmp_path / 'a')
        assert torch.equal(_adapter(same).indices, _adapter(model).indices)
        if dtype == torch.float32:
            assert torch.equal(same(x), model(x))
    # other base weights: the M values would multiply other singular vectors
    torch.manual_seed(1)
    other = TinyNet(nn.Linear(16, 16))
    before = state_snapshot(other)
    with pytest.raises(ValueError, match='different base weight'):
        visadapt.load_adapter(other, tmp_path / 'a')
    assert_unchanged(other, before)


# ---- bad input ---------------------------------------------------------------------------------------------------------
def test_top_k_on_a_non_square_weight_is_a_clear_error():
    model = TinyNet(nn.Linear(16, 24))
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=r"top_k.*square weight.*\(24, 16\)"):
        visadapt.inject(model, visadapt.SVFTConfig(pattern='top_k', k=4, include=['layer']))
    assert_unchanged(model, before)


def test_random_k_larger_than_m_is_a_clear_error():
    model = TinyNet(nn.Linear(8, 8))
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=r'k=65 is larger than the 8×8 matrix M \(64 entries\)'):
        visadapt.inject(model, visadapt.SVFTConfig(pattern='random', k=65, include=['layer']))
    assert_unchanged(model, before)


@pytest.mark.parametrize('kwargs,match', [({'pattern': 'diag'}, 'pattern'), ({'off_diag': -1}, 'off_diag'),
                                          ({'k': 3}, "only applies to pattern='random' or 'top_k'"),
                                          ({'init': 'ones'}, 'init'), ({'basis_dtype': 'int8'}, 'basis_dtype'),
                                          ({'r': 0}, 'truncation rank')])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        visadapt.SVFTConfig(**kwargs)


def test_training_moves_only_m():
    torch.manual_seed(0)
    model = TinyNet(nn.Linear(16, 16))
    visadapt.inject(model, visadapt.SVFTConfig(pattern='banded', include=['layer'], train_modules=['head']))
    adapter = _adapter(model)
    U0, idx0 = adapter.U.clone(), adapter.indices.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 3, 16)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), torch.arange(4) % 3).backward()
        opt.step()
    assert adapter.values.abs().max() > 0
    assert torch.equal(adapter.U, U0) and torch.equal(adapter.indices, idx0)
