"""SeRA: ΔW against a block-diagonal reference, parameter counts, init, cost scaling, MPC and bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from visadapt_testing import TinyNet, assert_unchanged, randomize_adapters, state_snapshot

import visadapt
from visadapt.methods.sera import sera_bypass, sera_delta_weight, sera_num_params


def _blocks(s, r, in_f, out_f, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(s, r // s, in_f // s, generator=gen), torch.randn(r, r, generator=gen),
            torch.randn(s, out_f // s, r // s, generator=gen))


@pytest.mark.parametrize('s,r,in_f,out_f', [(1, 4, 12, 8), (2, 4, 12, 8), (4, 4, 12, 8), (4, 8, 16, 32),
                                            (8, 8, 64, 24)])
def test_delta_weight_and_bypass_match_block_diagonal_reference(s, r, in_f, out_f):
    A, C, B = _blocks(s, r, in_f, out_f)
    reference = 0.5 * torch.block_diag(*B) @ C @ torch.block_diag(*A)      # α · B C A, (out, in)
    torch.testing.assert_close(sera_delta_weight(A, C, B, 0.5), reference)
    x = torch.randn(3, 5, in_f)
    torch.testing.assert_close(sera_bypass(x, A, C, B, 0.5), x @ reference.t(), rtol=1e-5, atol=1e-4)


def test_block_structure_is_the_papers():
    """Output segment i of ΔW x depends on input segment j only through C's (i, j) block."""
    s, r, in_f, out_f = 4, 8, 16, 12
    A, C, B = _blocks(s, r, in_f, out_f)
    C_block = torch.zeros_like(C)
    C_block[2:4, 4:6] = C[2:4, 4:6]            # keep only C's block (segment 1 ← segment 2)
    delta = sera_delta_weight(A, C_block, B, 1.0)
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    mask[3:6, 8:12] = True                       # out segment 1 (rows 3..5) × in segment 2 (cols 8..11)
    assert delta[~mask].abs().max() == 0 and delta[mask].abs().max() > 0


@pytest.mark.parametrize('in_f,out_f,r,split', [(16, 32, 4, None), (16, 32, 4, 2), (32, 16, 8, 1), (768, 768, 16, 16),
                                                (768, 3072, 32, 8)])
def test_parameter_count_is_the_papers_formula(in_f, out_f, r, split):
    model = TinyNet(nn.Linear(in_f, out_f))
    report = visadapt.inject(model, visadapt.SeRAConfig(r=r, split=split, include=['layer']))
    s = r if split is None else split
    expected = (in_f + out_f) * r // s + r * r
    assert report.adapter_params == expected == sera_num_params(in_f, out_f, r, s)
    adapter = model.layer.visadapt['default']
    assert adapter.A.shape == (s, r // s, in_f // s) and adapter.B.shape == (s, out_f // s, r // s)
    assert adapter.C.shape == (r, r)


def test_init_a_and_c_kaiming_b_zero():
    torch.manual_seed(0)
    model = TinyNet(nn.Linear(64, 32))
    visadapt.inject(model, visadapt.SeRAConfig(r=8, split=4, include=['layer']))
    adapter = model.layer.visadapt['default']
    assert torch.count_nonzero(adapter.B) == 0
    assert adapter.A.abs().max() <= 1 / math.sqrt(64 / 4) and adapter.A.std() > 0.5 / math.sqrt(3 * 16)
    assert adapter.C.abs().max() <= 1 / math.sqrt(8) and torch.count_nonzero(adapter.C) == 64
    assert torch.count_nonzero(adapter.delta_weight()) == 0


def test_bypass_cost_scales_with_segment_count():
    """Per token: (in + out)·r/s + r² MACs, not in·r; the core's measured MACs match."""
    model = TinyNet(nn.Linear(768, 768))
    visadapt.inject(model, visadapt.SeRAConfig(r=64, include=['layer']))
    adapter = model.layer.visadapt['default']
    assert adapter.bypass_macs((2, 10, 768)) == 20 * ((768 + 768) * 64 // 64 + 64 * 64)
    lora_macs = 20 * (768 + 768) * 64
    assert adapter.bypass_macs((2, 10, 768)) < lora_macs / 10


def test_weight_and_bypass_paths_agree_with_gradients():
    x = torch.randn(2, 7, 24)
    results = {}
    for path in ('weight', 'bypass'):
        torch.manual_seed(0)
        model = TinyNet(nn.Linear(24, 36))
        visadapt.inject(model, visadapt.SeRAConfig(r=6, split=3, alpha=2.0, include=['layer'], forward_path=path))
        randomize_adapters(model)
        out = model.layer(x)
        out.square().sum().backward()
        adapter = model.layer.visadapt['default']
        results[path] = out.detach(), [p.grad.clone() for p in (adapter.A, adapter.C, adapter.B)]
        reference = F.linear(x, model.layer.weight + 2.0 * torch.block_diag(*adapter.B) @ adapter.C
                             @ torch.block_diag(*adapter.A), model.layer.bias)
        torch.testing.assert_close(out.detach(), reference.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results['weight'][0], results['bypass'][0], rtol=1e-5, atol=1e-5)
    for g_w, g_b in zip(results['weight'][1], results['bypass'][1]):
        torch.testing.assert_close(g_w, g_b, rtol=1e-4, atol=1e-4)


def test_mpc_on_blocks_equals_dense_block_diagonal_penalty():
    model = TinyNet(nn.Linear(16, 24))
    visadapt.inject(model, visadapt.SeRAConfig(r=8, split=4, include=['layer'], mpc='d', mpc_weight=1.0))
    randomize_adapters(model, std=0.3)
    adapter = model.layer.visadapt['default']
    A, B = torch.block_diag(*adapter.A), torch.block_diag(*adapter.B)
    eye = torch.eye(8)
    gram_b = B.t() @ B
    dense = (A @ A.t() - eye).square().sum() + (gram_b - torch.diag(torch.diag(gram_b))).square().sum()
    torch.testing.assert_close(visadapt.regularization_loss(model), dense)


def test_mpc_n_puts_the_nonlinearity_after_a_and_refuses_merge():
    model = TinyNet(nn.Linear(8, 8))
    visadapt.inject(model, visadapt.SeRAConfig(r=4, split=2, include=['layer'], mpc='n', mpc_act='relu'))
    randomize_adapters(model, std=0.5)
    adapter = model.layer.visadapt['default']
    x = torch.randn(3, 8)
    z = torch.relu(torch.block_diag(*adapter.A) @ x.t())
    expected = model.layer.weight @ x.t() + model.layer.bias[:, None] + torch.block_diag(*adapter.B) @ adapter.C @ z
    with torch.no_grad():
        torch.testing.assert_close(model.layer(x), expected.t(), rtol=1e-5, atol=1e-5)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match='cannot be merged'):
        visadapt.merge(model)
    assert_unchanged(model, before)


def test_split_must_divide_r():
    with pytest.raises(ValueError, match='split=3 must divide the rank r=8'):
        visadapt.SeRAConfig(r=8, split=3)


@pytest.mark.parametrize('layer,bad', [(nn.Linear(10, 16), 'in_features=10'), (nn.Linear(16, 6), 'out_features=6')])
def test_split_not_dividing_the_layer_is_a_clear_error_and_changes_nothing(layer, bad):
    model = TinyNet(layer)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=f"cannot adapt layer 'layer'.*split=4.*{bad}"):
        visadapt.inject(model, visadapt.SeRAConfig(r=4, include=['layer']))
    assert_unchanged(model, before)


def test_convs_are_not_supported_types():
    with pytest.raises(ValueError, match="target type 'Conv2d' is not supported by SeRA"):
        visadapt.SeRAConfig(target_types=['Conv2d'])
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 8))
    report = visadapt.inject(cnn, visadapt.SeRAConfig(r=4))
    assert report.layers == ['2']            # the conv is skipped, the Linear adapted
