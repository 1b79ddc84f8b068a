"""The adapter battery: every registered method × every layer geometry × the generic PEFT invariants.

Cases are generated at collection time from ``visadapt.METHODS``, so a method registered later gets the whole
battery without editing this file. A method is only paired with layer kinds its config's ``supported_types``
accepts; every other combination must work.

Checks (issue 2): identity init gives the base output; with non-zero adapter weights merged == unmerged, unmerge
restores the weights, remove restores the original module; the forced 'weight' and 'bypass' paths agree in outputs
and gradients; save → load into a fresh model reproduces outputs and tensors; training changes only adapter and
``train_modules`` parameters and every adapter parameter receives a gradient; fp16/bf16 base models run forward and
backward with fp32 adapters; state_dict keys are the base keys plus adapter keys only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from visadapt_testing import (
    TinyNet,
    adapter_params,
    assert_unchanged,
    method_config,
    randomize_adapters,
    small_cnn,
    state_snapshot,
)

import visadapt
from visadapt.core.layer import iter_adapted


# ---- layer cases ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerCase:
    id: str
    factory: Callable[[], nn.Module]
    input_shape: Tuple[int, ...]


LAYER_CASES: List[LayerCase] = [
    LayerCase('linear', lambda: nn.Linear(16, 32), (2, 5, 16)),
    LayerCase('linear_nobias', lambda: nn.Linear(32, 16, bias=False), (2, 3, 32)),
    LayerCase('conv1d', lambda: nn.Conv1d(16, 32, 3, padding=1), (2, 16, 11)),
    LayerCase('conv1d_s2_d2_reflect', lambda: nn.Conv1d(16, 16, 5, stride=2, padding=4, dilation=2,
                                                         padding_mode='reflect'), (2, 16, 13)),
    LayerCase('conv2d_3x3_s2', lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1), (2, 16, 9, 9)),
    LayerCase('conv2d_same', lambda: nn.Conv2d(16, 32, 3, padding='same'), (2, 16, 7, 8)),
    LayerCase('conv2d_same_even_2x4', lambda: nn.Conv2d(16, 16, (2, 4), padding='same', bias=False), (2, 16, 6, 7)),
    LayerCase('conv2d_reflect', lambda: nn.Conv2d(16, 32, 3, padding=1, padding_mode='reflect'), (2, 16, 7, 7)),
    LayerCase('conv2d_replicate_s2_d2', lambda: nn.Conv2d(16, 32, 3, stride=2, padding=2, dilation=2,
                                                           padding_mode='replicate'), (2, 16, 9, 9)),
    LayerCase('conv2d_circular', lambda: nn.Conv2d(16, 16, 3, padding=(1, 2), padding_mode='circular'), (2, 16, 6, 6)),
    LayerCase('conv2d_dilation2', lambda: nn.Conv2d(16, 32, 3, padding=2, dilation=2), (2, 16, 9, 9)),
    LayerCase('conv2d_3x1', lambda: nn.Conv2d(16, 32, (3, 1), padding=(1, 0)), (2, 16, 7, 5)),
    LayerCase('conv2d_1x5_s12', lambda: nn.Conv2d(16, 32, (1, 5), stride=(1, 2), padding=(0, 2)), (2, 16, 5, 9)),
    LayerCase('conv2d_1x1', lambda: nn.Conv2d(32, 16, 1), (2, 32, 6, 6)),
    LayerCase('conv2d_1x1_s2_valid_nobias', lambda: nn.Conv2d(16, 32, 1, stride=2, padding='valid', bias=False),
              (2, 16, 7, 7)),
    LayerCase('conv2d_groups2', lambda: nn.Conv2d(16, 32, 3, padding=1, groups=2), (2, 16, 7, 7)),
    LayerCase('conv2d_groups4_s2', lambda: nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=4, bias=False),
              (2, 32, 9, 9)),
    LayerCase('conv2d_depthwise7x7_convnext', lambda: nn.Conv2d(16, 16, 7, padding=3, groups=16), (2, 16, 9, 9)),
    LayerCase('conv2d_depthwise3x3_s2_effnet', lambda: nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16,
                                                                  bias=False), (2, 16, 9, 9)),
    LayerCase('conv2d_depthwise_mult2', lambda: nn.Conv2d(16, 32, 3, padding=1, groups=16), (2, 16, 6, 6)),
    LayerCase('conv3d', lambda: nn.Conv3d(16, 16, 3, padding=1), (2, 16, 4, 5, 5)),
    LayerCase('conv3d_1x3x3_s2_groups2', lambda: nn.Conv3d(16, 32, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1),
                                                            groups=2), (2, 16, 3, 7, 7)),
]

#: extra config variants tested per method (fields a method lacks are dropped by ``method_config``)
METHOD_VARIANTS: Dict[str, List[Dict[str, Any]]] = {
    'lora': [{}, {'conv_form': 'reshape'}],
    'flora': [{}, {'r': 32, 'r3': 5, 'scale': 4.0}],  # ranks above some mode sizes: clamping
}
#: methods whose identity-init output can differ from the base output in the last bits (e.g. a weight-norm
#: re-parameterization m·W/‖W‖); everything else must be bit-exact. Add a method here only with that reason.
IDENTITY_ATOL: Dict[str, float] = {}


def _variant_id(variant: Dict[str, Any]) -> str:
    return '-'.join(f'{k}={v}' for k, v in variant.items()) or 'default'


def _battery_params() -> List[Any]:
    params = []
    for method in sorted(visadapt.METHODS):
        cls = visadapt.METHODS[method]
        for variant in METHOD_VARIANTS.get(method, [{}]):
            for case in LAYER_CASES:
                if not isinstance(case.factory(), tuple(cls.supported_types)):
                    continue  # the method declares it cannot adapt this layer kind
                params.append(pytest.param(method, variant, case,
                                           id=f'{cls.method}[{_variant_id(variant)}]-{case.id}'))
    return params


BATTERY = _battery_params()
# torch warns that padding='same' with an even kernel copies the input; that case is here on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
battery = pytest.mark.parametrize('method,variant,case', BATTERY)


# ---- helpers ----------------------------------------------------------------------------------------------------------
def build(case: LayerCase, dtype: torch.dtype = torch.float32) -> TinyNet:
    """The same base model every time (seeded), so a 'fresh' model equals the original one."""
    torch.random.default_generator.manual_seed(1234)  # CPU only: torch.manual_seed also queues CUDA seeding
    return TinyNet(case.factory()).eval().to(dtype)


def make_input(case: LayerCase, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(99)
    return torch.randn(case.input_shape, generator=gen).to(dtype)


def config(method: str, variant: Dict[str, Any], **overrides: Any) -> visadapt.AdapterConfig:
    return method_config(method, include=['layer'], train_modules=['head'], **{**variant, **overrides})


def inject(model: nn.Module, method: str, variant: Dict[str, Any], **overrides: Any) -> visadapt.InjectReport:
    return visadapt.inject(model, config(method, variant, **overrides))


def the_adapter(model: TinyNet, name: str = 'default') -> visadapt.Adapter:
    return model.layer.visadapt[name]


_PATHS: Dict[Tuple[str, str, str], List[str]] = {}


def available_paths(method: str, variant: Dict[str, Any], case: LayerCase) -> List[str]:
    """Forced paths this method offers on this layer (read from a built adapter: LoRA's depends on the layer)."""
    key = (method, _variant_id(variant), case.id)
    if key not in _PATHS:
        model = build(case)
        inject(model, method, variant)
        adapter = the_adapter(model)
        _PATHS[key] = [p for p, ok in (('weight', adapter.has_weight_path), ('bypass', adapter.has_bypass)) if ok]
    return _PATHS[key]


def tolerance(ref: torch.Tensor, rtol: float = 1e-5) -> Dict[str, float]:
    """rtol plus an atol relative to the tensor's scale (sums of O(100) products lose a few ulps of the largest)."""
    return dict(rtol=rtol, atol=rtol * max(ref.abs().max().item(), 1e-3))


def grads_and_output(model: TinyNet, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    out = model.layer(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()
    grads = {'input': x.grad}
    grads.update({n: p.grad for n, p in adapter_params(model).items() if p.requires_grad})
    return out.detach(), grads


# ---- the checks -------------------------------------------------------------------------------------------------------
@battery
def test_identity_init_gives_base_output(method, variant, case):
    x = make_input(case)
    for path in available_paths(method, variant, case):
        model = build(case)
        with torch.no_grad():
            base_layer, base = model.layer(x), model(x)
        report = inject(model, method, variant, forward_path=path)
        assert report.layers == ['layer']
        assert report.adapter_params == sum(p.numel() for p in adapter_params(model).values() if p.requires_grad)
        assert report.trainable == report.adapter_params + sum(p.numel() for p in model.head.parameters())
        with torch.no_grad():
            out_layer, out = model.layer(x), model(x)
        atol = IDENTITY_ATOL.get(method, 0.0)
        torch.testing.assert_close(out_layer, base_layer, rtol=0, atol=atol, msg=f'path={path}')
        torch.testing.assert_close(out, base, rtol=0, atol=atol, msg=f'path={path}')


@battery
def test_merge_equals_unmerged_and_unmerge_restores(method, variant, case):
    model = build(case)
    x = make_input(case)
    with torch.no_grad():
        base = model.layer(x)
    w0 = {n: p.detach().clone() for n, p in model.layer.named_parameters()}
    inject(model, method, variant)
    randomize_adapters(model)
    adapter = the_adapter(model)
    with torch.no_grad():
        adapted = model.layer(x)
    assert (adapted - base).abs().max() > 1e-4, 'non-zero adapter weights did not change the output'
    if not adapter.mergeable:
        before = state_snapshot(model)
        with pytest.raises(ValueError, match='cannot be merged'):
            visadapt.merge(model)
        assert_unchanged(model, before)
        return
    visadapt.merge(model)
    assert visadapt.summary(model).rows[0]['path'] == 'merged'
    with torch.no_grad():
        merged = model.layer(x)
        # merged forward is the base layer's own op on the merged weight
        exact = model.layer._conv_forward(x, model.layer.weight, model.layer.bias) if not isinstance(
            model.layer, nn.Linear) else F.linear(x, model.layer.weight, model.layer.bias)
    assert torch.equal(merged, exact)
    torch.testing.assert_close(merged, adapted, **tolerance(adapted))
    visadapt.merge(model)  # merging again is a no-op, not a second ΔW
    with torch.no_grad():
        torch.testing.assert_close(model.layer(x), merged, rtol=0, atol=0)
    visadapt.unmerge(model)
    for n, p in model.layer.named_parameters():
        if n in w0:
            torch.testing.assert_close(p.detach(), w0[n], **tolerance(w0[n], 1e-5))
    with torch.no_grad():
        torch.testing.assert_close(model.layer(x), adapted, **tolerance(adapted))
    visadapt.unmerge(model)  # unmerging an unmerged adapter is a no-op
    for n, p in model.layer.named_parameters():
        if n in w0:
            torch.testing.assert_close(p.detach(), w0[n], **tolerance(w0[n], 1e-5))


#: methods whose update is exactly a product of small factors on every layer their config accepts (``factor_form``
#: must exist there and rebuild ΔW); any other method must refuse with a ValueError naming itself
FACTORED = {'lora', 'dora', 'moslora', 'melora', 'vera', 'flora', 'sera', 'svft'}


@battery
def test_factor_form_rebuilds_delta_exactly(method, variant, case):
    """Every export reads ``Adapter.factor_form()``: where declared it must rebuild ΔW (and the Tucker form's
    chain too); where not, it refuses by name. LoRA's conv reshape form and MPC_n have no such form."""
    model = build(case)
    inject(model, method, variant)
    randomize_adapters(model)
    adapter = the_adapter(model)
    weight = model.layer.weight.detach()
    reshape = variant.get('conv_form') == 'reshape' and weight.dim() > 2 and weight.shape[2] > 1  # rows: out × k_1
    if method not in FACTORED or reshape:
        with pytest.raises(ValueError, match=visadapt.METHODS[method].method):
            adapter.factor_form()
        return
    form = adapter.factor_form()
    with torch.no_grad():
        expected = (adapter.adapted_weight(weight) - weight) if form.magnitude is None \
            else adapter.delta_weight()  # DoRA: the factors are its LoRA part, the magnitude is m
        for rebuilt in (form.delta_weight(), form.as_chain().delta_weight(), form.simplified().delta_weight()):
            torch.testing.assert_close(rebuilt, expected, rtol=1e-5, atol=1e-6)
    if form.magnitude is not None:
        assert torch.equal(form.magnitude, adapter.m)
    if form.mid is not None:
        assert form.down.shape[2:] == (1,) * (weight.dim() - 2) and form.mid.shape[2:] == weight.shape[2:]


@battery
def test_remove_restores_original_module(method, variant, case):
    model = build(case)
    x = make_input(case)
    layer_cls = type(model.layer)
    keys = list(model.state_dict())
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    flags0 = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        base = model(x)
    inject(model, method, variant)
    randomize_adapters(model)
    visadapt.remove(model)
    assert type(model.layer) is layer_cls
    assert not hasattr(model.layer, 'visadapt')
    assert list(model.state_dict()) == keys
    assert visadapt.adapter_names(model) == []
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state0[k]), k
    with torch.no_grad():
        assert torch.equal(model(x), base)

    # merged, then removed without merging: the weights come back (up to rounding)
    inject(model, method, variant)
    randomize_adapters(model)
    with torch.no_grad():
        adapted = model(x)
    if the_adapter(model).mergeable:
        visadapt.merge(model)
        visadapt.remove(model)
        assert type(model.layer) is layer_cls
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, state0[k], **tolerance(state0[k], 1e-5))
        # merge-and-unload keeps the update in the weights
        inject(model, method, variant)
        randomize_adapters(model)
        with torch.no_grad():
            adapted = model(x)
        visadapt.remove(model, merge_weights=True)
        assert type(model.layer) is layer_cls and list(model.state_dict()) == keys
        with torch.no_grad():
            torch.testing.assert_close(model(x), adapted, **tolerance(adapted))
    else:
        with pytest.raises(ValueError):
            visadapt.remove(model, merge_weights=True)
        assert visadapt.adapter_names(model) == ['default']


@battery
def test_forward_paths_agree(method, variant, case):
    paths = available_paths(method, variant, case)
    x = make_input(case)
    if len(paths) < 2:  # the missing path must be refused clearly, without touching the model
        missing = ({'weight', 'bypass'} - set(paths)).pop()
        model = build(case)
        before = state_snapshot(model)
        with pytest.raises(ValueError, match=missing):
            inject(model, method, variant, forward_path=missing)
        assert_unchanged(model, before)
        return
    results = {}
    state = None
    for path in ('weight', 'bypass', 'auto'):
        model = build(case)
        inject(model, method, variant, forward_path=path)
        if state is None:
            randomize_adapters(model)
            state = visadapt.adapter_state_dict(model)
        else:
            visadapt.load_adapter_state_dict(model, state)
        results[path] = grads_and_output(model, x)
    (out_w, grads_w), (out_b, grads_b) = results['weight'], results['bypass']
    torch.testing.assert_close(out_b, out_w, **tolerance(out_w))
    assert grads_w.keys() == grads_b.keys()
    for n in grads_w:
        assert grads_w[n] is not None and grads_b[n] is not None, n
        torch.testing.assert_close(grads_b[n], grads_w[n], **tolerance(grads_w[n], 1e-4), msg=n)
    out_a, grads_a = results['auto']
    torch.testing.assert_close(out_a, out_w, **tolerance(out_w))
    for n in grads_w:
        torch.testing.assert_close(grads_a[n], grads_w[n], **tolerance(grads_w[n], 1e-4), msg=n)


@battery
def test_save_load_roundtrip(method, variant, case, tmp_path):
    model = build(case)
    x = make_input(case)
    cfg = config(method, variant)
    visadapt.inject(model, cfg)
    randomize_adapters(model)
    with torch.no_grad():
        model.head.weight.add_(0.5)  # a trained extra module travels with the adapter
    visadapt.save_adapter(model, tmp_path / 'ad')
    assert sorted(os.listdir(tmp_path / 'ad')) == ['adapter_config.json', 'adapter_model.safetensors']
    fresh = build(case)
    loaded_cfg = visadapt.load_adapter(fresh, tmp_path / 'ad')
    assert loaded_cfg == cfg
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    saved, got = visadapt.adapter_state_dict(model), visadapt.adapter_state_dict(fresh)
    assert saved.keys() == got.keys()
    assert any(k.startswith('trained.head.') for k in saved)
    for k in saved:
        assert torch.equal(saved[k], got[k]), k
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert {n: p.requires_grad for n, p in fresh.named_parameters()} == \
        {n: p.requires_grad for n, p in model.named_parameters()}


@battery
def test_training_changes_only_adapter_and_train_modules(method, variant, case):
    model = build(case)
    x = make_input(case)
    target = torch.arange(x.shape[0]) % 3
    inject(model, method, variant)
    adapters = adapter_params(model)
    head = {f'head.{n}' for n, _ in model.head.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in adapters.items() if p.requires_grad} | head
    assert any(p.requires_grad for p in adapters.values())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    got_grad = {n: False for n in trainable}
    model.train()
    for _ in range(4):  # zero-init factors (LoRA's A, FLoRA's A^(n)) get their first gradient at step 2
        opt.zero_grad()
        F.cross_entropy(model(x), target).backward()
        for n, p in model.named_parameters():
            if n in trainable and p.grad is not None and p.grad.abs().sum() > 0:
                got_grad[n] = True
        opt.step()
    assert [n for n, ok in got_grad.items() if not ok] == [], 'trainable parameters that never got a gradient'
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p.detach(), before[n]), f'{n} did not change'
        else:
            assert torch.equal(p.detach(), before[n]), f'frozen {n} changed'
    for n, b in model.named_buffers():
        if '.visadapt.' not in f'.{n}':
            assert torch.equal(b, buffers[n]), f'base buffer {n} changed'


@battery
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['fp16', 'bf16'])
def test_low_precision_base(method, variant, case, dtype):
    x32 = make_input(case)
    ref_model = build(case, dtype).float()  # the same rounded base weights, computed in fp32
    inject(ref_model, method, variant)
    randomize_adapters(ref_model)
    state = visadapt.adapter_state_dict(ref_model)
    with torch.no_grad():
        ref = ref_model.layer(x32.to(dtype).float())
    for path in available_paths(method, variant, case):
        model = build(case, dtype)
        inject(model, method, variant, forward_path=path)
        for n, p in adapter_params(model).items():
            assert p.dtype == torch.float32, f'{n} is {p.dtype}; adapters keep fp32 by default'
        visadapt.load_adapter_state_dict(model, state)
        x = x32.to(dtype).requires_grad_(True)
        out = model.layer(x)
        assert out.dtype == dtype
        assert torch.isfinite(out).all()
        model(x).float().square().mean().backward()
        assert torch.isfinite(x.grad).all()
        for n, p in adapter_params(model).items():
            if p.requires_grad:
                assert p.grad is not None and p.grad.dtype == torch.float32, n
                assert torch.isfinite(p.grad).all(), n
        for p in model.layer.parameters(recurse=False):
            assert p.grad is None and p.dtype == dtype
        err = (out.float() - ref).norm() / ref.norm()
        assert err < 3e-2, f'path={path}: relative error {err:.3g} vs the fp32 model'
        if the_adapter(model).mergeable:  # merging into a half-precision weight rounds once, no more
            with torch.no_grad():
                visadapt.merge(model)
                merged = model.layer(x)
                assert merged.dtype == dtype
                err = (merged.float() - ref).norm() / ref.norm()
                assert err < 3e-2, f'path={path}: merged relative error {err:.3g} vs the fp32 model'
                visadapt.unmerge(model)


@battery
def test_autocast_bf16_on_fp32_base(method, variant, case):
    """Mixed precision as timm's --amp runs it on CPU: fp32 base and adapter, ops autocast to bf16."""
    x = make_input(case)
    state = None
    for path in available_paths(method, variant, case):
        model = build(case)
        inject(model, method, variant, forward_path=path)
        if state is None:
            randomize_adapters(model)
            state = visadapt.adapter_state_dict(model)
            with torch.no_grad():
                ref = model.layer(x)
        else:
            visadapt.load_adapter_state_dict(model, state)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model.layer(x)
            loss = model(x).float().square().mean()
        loss.backward()
        assert torch.isfinite(out).all()
        err = (out.float() - ref).norm() / ref.norm()
        assert err < 3e-2, f'path={path}: relative error {err:.3g} vs fp32'
        for n, p in adapter_params(model).items():
            if p.requires_grad:
                assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n


@battery
def test_state_dict_keys(method, variant, case):
    model = build(case)
    x = make_input(case)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    inject(model, method, variant)
    randomize_adapters(model)
    keys = list(model.state_dict())
    adapter_keys = [k for k in keys if k.startswith('layer.visadapt.default.')]
    assert adapter_keys, 'the adapter has no state'
    assert [k for k in keys if k not in adapter_keys] == list(base_sd)
    assert set(adapter_params(model)) <= set(adapter_keys)
    adapter_state = {k: v.clone() for k, v in model.state_dict().items() if k in adapter_keys}
    # a (pretrained) base checkpoint loads into the injected model; only the adapter keys are missing
    with torch.no_grad():
        for p in model.layer.parameters(recurse=False):
            p.add_(1.0)
    result = model.load_state_dict(base_sd, strict=False)
    assert sorted(result.missing_keys) == sorted(adapter_keys)
    assert result.unexpected_keys == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, base_sd[k] if k in base_sd else adapter_state[k]), k
    # the full injected state dict round-trips strictly into another injected model
    other = build(case)
    inject(other, method, variant)
    other.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


# ---- real timm models -------------------------------------------------------------------------------------------------
TIMM_CASES = [
    pytest.param('convnext_atto', 'FLoRA', dict(r=4, r3=2, scale=4.0), id='convnext_atto-FLoRA'),
    pytest.param('efficientnet_lite0', 'FLoRA', dict(r=4, r3=2, scale=4.0), id='efficientnet_lite0-FLoRA'),
    pytest.param('efficientnet_lite0', 'LoRA', dict(r=4), id='efficientnet_lite0-LoRA'),
]


def _timm_model(arch: str) -> nn.Module:
    import timm
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, num_classes=5).eval()


@pytest.mark.parametrize('arch,method,kwargs', TIMM_CASES)
def test_timm_model_all_convs(arch, method, kwargs):
    model = _timm_model(arch)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    classifier = model.pretrained_cfg['classifier']
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(x)
    cfg = method_config(method, target_types=['Conv2d'], train_modules=[classifier], **kwargs)
    report = visadapt.inject(model, cfg)
    assert report.layers == convs  # every conv, depthwise ones included
    with torch.no_grad():
        assert torch.equal(model(x), base)
    # keys unchanged; a base checkpoint loads with only the adapter keys missing
    result = model.load_state_dict(base_sd, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys and \
        all('.visadapt.default.' in k for k in result.missing_keys)
    assert [k for k in model.state_dict() if '.visadapt.' not in k] == list(base_sd)

    randomize_adapters(model, std=0.05)
    out = model(x)
    assert torch.isfinite(out).all() and (out - base).abs().max() > 1e-4
    out.square().mean().backward()
    for n, p in adapter_params(model).items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    frozen = [n for n, p in model.named_parameters() if '.visadapt.' not in n and not n.startswith(classifier + '.')]
    assert all(not dict(model.named_parameters())[n].requires_grad for n in frozen)

    with torch.no_grad():
        adapted = model(x)
        visadapt.merge(model)
        merged = model(x)
        torch.testing.assert_close(merged, adapted, **tolerance(adapted, 1e-4))
        visadapt.unmerge(model)
        visadapt.remove(model)
    assert all(type(m) in (nn.Conv2d, nn.Linear) for n, m in model.named_modules() if n in convs)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, base_sd[k], **tolerance(base_sd[k], 1e-5), msg=k)


@pytest.mark.parametrize('arch', ['convnext_atto', 'efficientnet_lite0'])
def test_timm_model_forward_paths_agree(arch):
    """Whole-model outputs and gradients with every FLoRA layer forced onto the weight vs the bypass path."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    results, state = {}, None
    for path in ('weight', 'bypass'):
        model = _timm_model(arch)
        visadapt.inject(model, visadapt.FLoRAConfig(r=4, r3=2, scale=4.0, target_types=['Conv2d'], forward_path=path))
        if state is None:
            randomize_adapters(model, std=0.05)
            state = visadapt.adapter_state_dict(model)
        else:
            visadapt.load_adapter_state_dict(model, state)
        out = model(x)
        out.square().sum().backward()
        results[path] = out.detach(), {n: p.grad for n, p in adapter_params(model).items()}
    (out_w, g_w), (out_b, g_b) = results['weight'], results['bypass']
    torch.testing.assert_close(out_b, out_w, **tolerance(out_w, 1e-4))
    for n in g_w:
        torch.testing.assert_close(g_b[n], g_w[n], **tolerance(g_w[n], 1e-3), msg=n)


# ---- a multi-layer model per method -----------------------------------------------------------------------------------
def _method_params() -> List[Any]:
    return [pytest.param(method, variant, id=f'{cls.method}[{_variant_id(variant)}]')
            for method, cls in sorted(visadapt.METHODS.items()) if cls.adapts_layers
            for variant in METHOD_VARIANTS.get(method, [{}])]


@pytest.mark.parametrize('method,variant', _method_params())
def test_multi_layer_model(method, variant, tmp_path):
    """Every supported layer of a small CNN at once (shared tensors across layers, per-layer save keys), with a
    fully trained head: identity, merge, save/load into a fresh model, remove."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    model = small_cnn()
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    classes0 = {n: type(m) for n, m in model.named_modules()}
    with torch.no_grad():
        base = model(x)
    report = visadapt.inject(model, method_config(method, train_modules=['head'], **variant))
    assert report.layers and 'head' not in report.layers
    with torch.no_grad():
        torch.testing.assert_close(model(x), base, rtol=0, atol=IDENTITY_ATOL.get(method, 0.0))
    randomize_adapters(model)
    with torch.no_grad():
        model.head.bias.add_(1.0)
        adapted = model(x)
    visadapt.save_adapter(model, tmp_path)
    fresh = small_cnn()
    visadapt.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x), adapted)
    if all(a.mergeable for _, m in iter_adapted(model) for a in m.visadapt.values()):
        visadapt.merge(fresh)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), adapted, **tolerance(adapted))
    visadapt.remove(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state0[k]) or k.startswith('head.'), k
