"""DoRA: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_c with a detached norm; a LoRA variant."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from visadapt_testing import TinyNet, assert_unchanged, randomize_adapters, state_snapshot

import visadapt
from visadapt.methods.dora import DoRAAdapter


def _reference(layer: nn.Module, adapter: DoRAAdapter, detach: bool = True) -> torch.Tensor:
    W = layer.weight.detach()
    V = W + adapter.scale * (adapter.B @ adapter.A.flatten(1)).reshape(W.shape)
    norm = V.flatten(1).norm(dim=1)
    if detach:
        norm = norm.detach()
    return adapter.m.view(-1, *([1] * (W.dim() - 1))) * V / norm.view(-1, *([1] * (W.dim() - 1)))


@pytest.mark.parametrize('layer,count', [
    (lambda: nn.Linear(16, 32), 4 * (16 + 32) + 32),
    (lambda: nn.Conv2d(16, 32, 3, padding=1, groups=2), 4 * (8 * 9 + 32) + 32),
])
def test_parameter_count_and_init(layer, count):
    model = TinyNet(layer())
    report = visadapt.inject(model, visadapt.DoRAConfig(r=4, include=['layer']))
    adapter = model.layer.visadapt['default']
    assert report.adapter_params == count
    torch.testing.assert_close(adapter.m.detach(), model.layer.weight.detach().flatten(1).norm(dim=1), rtol=0, atol=0)
    assert torch.count_nonzero(adapter.B) == 0
    assert torch.equal(adapter.adapted_weight(model.layer.weight.detach()), model.layer.weight.detach())


@pytest.mark.parametrize('make', [lambda: nn.Linear(8, 12), lambda: nn.Conv2d(8, 12, 3, padding=1, groups=4)])
def test_weight_and_detached_norm_gradients_match_the_paper(make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(2, 8) if isinstance(layer, nn.Linear) else torch.randn(2, 8, 5, 5)
    model = TinyNet(layer)
    visadapt.inject(model, visadapt.DoRAConfig(r=3, alpha=6.0, include=['layer']))
    randomize_adapters(model, std=0.3)
    adapter = model.layer.visadapt['default']
    run = (lambda w: nn.functional.linear(x, w, layer.bias)) if isinstance(layer, nn.Linear) else \
        (lambda w: layer._conv_forward(x, w, layer.bias))
    out = model.layer(x)
    torch.testing.assert_close(out, run(_reference(layer, adapter)))
    grads = torch.autograd.grad(out.square().sum(), [adapter.A, adapter.B, adapter.m])
    ref = torch.autograd.grad(run(_reference(layer, adapter)).square().sum(), [adapter.A, adapter.B, adapter.m])
    undetached = torch.autograd.grad(run(_reference(layer, adapter, detach=False)).square().sum(), [adapter.A])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)
    assert not torch.allclose(grads[0], undetached[0]), 'the norm must be treated as a constant (DoRA §4.3)'


def test_merge_unmerge_with_a_second_adapter_merged_later():
    torch.manual_seed(0)
    model = TinyNet(nn.Linear(16, 8))
    w0 = model.layer.weight.detach().clone()
    x = torch.randn(3, 4, 16)
    visadapt.inject(model, visadapt.DoRAConfig(r=2, include=['layer']), name='dora')
    visadapt.inject(model, visadapt.LoRAConfig(r=2, include=['layer']), name='lora')
    randomize_adapters(model, std=0.2)
    with torch.no_grad():
        adapted = model(x)
    visadapt.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    visadapt.unmerge(model, 'lora')  # DoRA's recorded norms stay valid while LoRA is taken out
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    visadapt.merge(model, 'lora')
    visadapt.unmerge(model)  # LoRA comes out first, then DoRA divides its norms back out
    torch.testing.assert_close(model.layer.weight.detach(), w0, rtol=1e-5, atol=1e-6)


def test_bad_input():
    model = TinyNet(nn.Linear(8, 8))
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="forward_path='bypass' is not available"):
        visadapt.inject(model, visadapt.DoRAConfig(r=2, include=['layer'], forward_path='bypass'))
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"mpc='n' is not valid"):
        visadapt.DoRAConfig(r=2, mpc='n')
    visadapt.inject(model, visadapt.DoRAConfig(r=2, include=['layer']))
    with pytest.raises(ValueError, match='needs the norms recorded'):
        model.layer.visadapt['default'].restored_weight(model.layer.weight.detach())


def test_torch_compile_traces_dora_in_one_graph():
    """DoRA records its merge norms in the forward; that must not break a fullgraph trace."""
    torch.manual_seed(0)
    model = TinyNet(nn.Conv2d(8, 12, 3, padding=1, groups=2))
    visadapt.inject(model, visadapt.DoRAConfig(r=2, include=['layer'], train_modules=['head']))
    randomize_adapters(model)
    x = torch.randn(2, 8, 6, 6)
    ref = model(x)
    torch._dynamo.reset()
    out = torch.compile(model, backend='eager', fullgraph=True)(x)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    assert model.layer.visadapt['default'].m.grad is not None
    torch._dynamo.reset()
