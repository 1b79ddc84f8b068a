"""MPC regularizers (o, d) and MPC_n: the losses, regularization_loss, attach_regularizer, and the bad inputs."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from visadapt_testing import TinyNet, assert_unchanged, randomize_adapters, small_cnn, state_snapshot

import visadapt
from visadapt.core import attach_regularizer, detach_regularizer, mpc_loss

MPC_CONFIGS = [
    lambda kind: visadapt.LoRAConfig(r=3, mpc=kind, mpc_weight=0.5),
    lambda kind: visadapt.LoRAConfig(r=3, conv_form='reshape', mpc=kind),
    lambda kind: visadapt.DoRAConfig(r=3, mpc=kind),
    lambda kind: visadapt.MoSLoRAConfig(r=3, mpc=kind, mpc_weight=2.0),
    lambda kind: visadapt.MELoRAConfig(r=2, n=2, mpc=kind),
    lambda kind: visadapt.FLoRAConfig(r=3, mpc=kind),
]


def _numpy_mpc(A: np.ndarray, B: np.ndarray, kind: str) -> float:
    """The paper's eq. (20)/(21) in its own notation: A_p = Aᵀ (in×r), B_p = Bᵀ (r×out)."""
    Ap, Bp = A.T, B.T
    r = Ap.shape[1]
    first = np.sum((Ap.T @ Ap - np.eye(r)) ** 2)
    bbt = Bp @ Bp.T
    second = np.sum((bbt - np.eye(r)) ** 2) if kind == 'o' else np.sum((bbt - np.diag(np.diag(bbt))) ** 2)
    return float(first + second)


@pytest.mark.parametrize('kind', ['o', 'd'])
def test_loss_matches_the_paper_formula(kind):
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 9, generator=gen), torch.randn(7, 4, generator=gen)
    assert mpc_loss([(A, B)], kind).item() == pytest.approx(_numpy_mpc(A.numpy(), B.numpy(), kind), rel=1e-5)
    Q = torch.linalg.qr(torch.randn(9, 4, generator=gen))[0]
    assert mpc_loss([(Q.T, torch.linalg.qr(torch.randn(7, 4, generator=gen))[0])], kind).item() < 1e-10
    # batched pairs (MELoRA's mini-LoRAs) equal the sum over the pairs
    A2, B2 = torch.randn(3, 2, 5, generator=gen), torch.randn(3, 6, 2, generator=gen)
    assert mpc_loss([(A2, B2)], kind).item() == pytest.approx(sum(mpc_loss([(A2[i], B2[i])], kind).item()
                                                                 for i in range(3)), rel=1e-6)


def test_d_only_penalizes_off_diagonal_gram_entries():
    B = torch.diag(torch.tensor([3.0, 0.5])).repeat(2, 1)  # orthogonal but not unit columns
    A = torch.eye(2, 5)
    assert mpc_loss([(A, B)], 'd').item() == 0.0
    assert mpc_loss([(A, B)], 'o').item() > 1.0


def test_regularization_loss_total_is_weighted_mean_over_layers():
    model = small_cnn()
    assert visadapt.regularization_loss(model).item() == 0.0  # nothing injected
    visadapt.inject(model, visadapt.LoRAConfig(r=2, include=['pw', 'fc'], mpc='o', mpc_weight=0.3), name='a')
    visadapt.inject(model, visadapt.FLoRAConfig(r=2, include=['stem'], mpc='d', mpc_weight=2.0), name='b')
    visadapt.inject(model, visadapt.LoRAConfig(r=2, include=['head']), name='plain')  # no MPC: not counted
    randomize_adapters(model)
    expect = 0.3 * (mpc_loss(model.pw.visadapt['a'].mpc_factors(), 'o') + mpc_loss(model.fc.visadapt['a'].mpc_factors(),
                                                                                  'o')) / 2
    expect = expect + 2.0 * mpc_loss(model.stem.visadapt['b'].mpc_factors(), 'd')
    total = visadapt.regularization_loss(model)
    assert total.dim() == 0 and total.requires_grad
    torch.testing.assert_close(total, expect)


@pytest.mark.parametrize('make', MPC_CONFIGS)
@pytest.mark.parametrize('kind', ['o', 'd'])
def test_attached_regularizer_gives_the_gradients_of_loss_plus_regularization(make, kind):
    x = torch.randn(2, 3, 8, 8)
    model = small_cnn()
    visadapt.inject(model, make(kind))
    randomize_adapters(model, std=0.3)
    hooked = copy.deepcopy(model)
    plain = copy.deepcopy(model)

    (model(x).square().mean() + visadapt.regularization_loss(model)).backward()
    handle = attach_regularizer(hooked)
    hooked(x).square().mean().backward()
    plain(x).square().mean().backward()

    params = dict(hooked.named_parameters())
    differs = False
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(params[n].grad, p.grad, rtol=1e-5, atol=1e-6, msg=n)
            differs |= not torch.allclose(dict(plain.named_parameters())[n].grad, p.grad)
    assert differs, 'the regularizer must change some gradient'
    # once per backward: a second backward accumulates exactly twice the first
    first = {n: p.grad.clone() for n, p in hooked.named_parameters() if p.requires_grad}
    hooked(x).square().mean().backward()
    for n, p in hooked.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 2 * first[n], rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match='already called'):
        attach_regularizer(hooked)
    handle.remove()
    attach_regularizer(hooked)
    detach_regularizer(hooked)


def test_training_with_the_attached_regularizer_orthogonalizes_a_and_b():
    torch.manual_seed(0)
    model = TinyNet(nn.Linear(12, 10))
    visadapt.inject(model, visadapt.LoRAConfig(r=3, include=['layer'], train_modules=['head'], mpc='o',
                                               mpc_weight=1.0))
    randomize_adapters(model, std=0.3)
    attach_regularizer(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x = torch.randn(8, 4, 12)
    start = visadapt.regularization_loss(model).item()
    for _ in range(200):
        opt.zero_grad()
        (0.0 * model(x).sum()).backward()  # a task loss with no gradient: only the regularizer acts
        opt.step()
    assert visadapt.regularization_loss(model).item() < 1e-3 * start


@pytest.mark.parametrize('make', [lambda: visadapt.LoRAConfig(r=3, mpc='n', mpc_act='gelu'),
                                  lambda: visadapt.MoSLoRAConfig(r=3, mpc='n'),
                                  lambda: visadapt.MELoRAConfig(r=2, n=2, mpc='n', mpc_act='tanh')])
def test_mpc_n_forward_is_b_sigma_a_x_and_cannot_merge(make, tmp_path):
    torch.manual_seed(0)
    model = TinyNet(nn.Linear(8, 6))
    cfg = make()
    visadapt.inject(model, cfg.__class__(**{**cfg.__dict__, 'include': ['layer'], 'train_modules': ['head']}))
    randomize_adapters(model, std=0.5)
    a = model.layer.visadapt['default']
    x = torch.randn(2, 3, 8)
    act = {'gelu': nn.functional.gelu, 'relu': torch.relu, 'tanh': torch.tanh}[cfg.mpc_act]
    if cfg.method == 'MELoRA':
        z = act(torch.einsum('bsnc,nrc->bsnr', x.unflatten(-1, (2, 4)), a.A))
        delta = torch.einsum('bsnr,nor->bsno', z, a.B[0]).flatten(-2)
    else:
        up = a.B @ a.M if cfg.method == 'MoSLoRA' else a.B
        delta = act(x @ a.A.T) @ up.T
    with torch.no_grad():
        torch.testing.assert_close(model.layer(x), model.layer._va_class.forward(model.layer, x) + a.scale * delta)
    assert not a.mergeable and not a.has_weight_path
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=r"cannot be merged .*mpc='n'"):
        visadapt.merge(model)
    with pytest.raises(ValueError, match='cannot be merged'):
        visadapt.remove(model, merge_weights=True)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match='no ΔW'):
        a.delta_weight()
    visadapt.save_adapter(model, tmp_path / 'n')
    fresh = TinyNet(nn.Linear(8, 6))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if '.visadapt.' not in k})
    visadapt.load_adapter(fresh, tmp_path / 'n')
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_bad_input():
    # a method without A/B factors has no MPC fields: a clear error at config time, by keyword or from a dict
    for method in ('IA3', 'VeRA', 'SSB', 'BitFit'):
        with pytest.raises(ValueError, match=r"unknown .*Config field\(s\) \['mpc'\].*has no down/up factors A, B"):
            visadapt.config_from_dict({'method': method, 'mpc': 'o'})
    with pytest.raises(TypeError, match="unexpected keyword argument 'mpc'"):
        visadapt.IA3Config(mpc='o')
    with pytest.raises(ValueError, match=r"mpc='x' is not valid"):
        visadapt.LoRAConfig(mpc='x')
    with pytest.raises(ValueError, match='mpc_weight must be a finite number >= 0'):
        visadapt.LoRAConfig(mpc='o', mpc_weight=-1.0)
    with pytest.raises(ValueError, match="mpc_act='swish' is not valid"):
        visadapt.LoRAConfig(mpc='n', mpc_act='swish')
    for cls in (visadapt.FLoRAConfig, visadapt.DoRAConfig):
        with pytest.raises(ValueError, match=r"mpc='n' is not valid"):
            cls(mpc='n')
    # MPC_n needs the chain: LoRA's reshape conv form has none; a forced weight path is refused
    model = TinyNet(nn.Conv2d(4, 4, 3))
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="mpc='n' needs the factorized bypass"):
        visadapt.inject(model, visadapt.LoRAConfig(r=2, conv_form='reshape', mpc='n', include=['layer']))
    with pytest.raises(ValueError, match="forward_path='weight' is not available with mpc='n'"):
        visadapt.inject(model, visadapt.LoRAConfig(r=2, mpc='n', forward_path='weight', include=['layer']))
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="no adapter in this model has mpc='o' or mpc='d'"):
        attach_regularizer(model)
