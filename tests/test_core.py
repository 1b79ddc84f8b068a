"""The model-level API: bad input (one clear error, model unchanged), targeting, train_modules, enable/disable,
several named adapters on one model, summary, deepcopy (timm's EMA) and whole-model pickling."""
from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch
import torch.nn as nn
from visadapt_testing import (
    adapter_params,
    assert_unchanged,
    method_config,
    randomize_adapters,
    small_cnn,
    state_snapshot,
)

import visadapt
from visadapt.core.tuner import get_injection

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


# ---- bad input: one clear error naming the value, and nothing changes ---------------------------------------------
RANKED_METHODS = sorted(m for m, cls in visadapt.METHODS.items() if any(f.name == 'r' for f in dataclasses.fields(cls)))


@pytest.mark.parametrize('method', RANKED_METHODS)
@pytest.mark.parametrize('r', [0, -2])
def test_rank_not_positive_is_rejected_by_every_method(method, r):
    with pytest.raises(ValueError, match=f'got {r}'):
        method_config(method, r=r)


def _expect_error(model, exc, match, fn, *args, **kwargs):
    before = state_snapshot(model)
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)
    assert_unchanged(model, before)


def test_include_pattern_matching_nothing_lists_existing_names():
    model = small_cnn()
    _expect_error(model, ValueError, r"include pattern 'blocks\.\*' matches no module; modules include 'stem', 'norm'",
                  visadapt.inject, model, visadapt.FLoRAConfig(include=['blocks.*']))


@pytest.mark.parametrize('field,match', [
    ('exclude', "exclude pattern 'nope' matches no module; modules include 'stem'"),
    ('train_modules', "train_modules pattern 'nope' matches no module with parameters; modules include 'stem'"),
])
def test_other_patterns_matching_nothing(field, match):
    model = small_cnn()
    _expect_error(model, ValueError, match, visadapt.inject, model, visadapt.FLoRAConfig(**{field: ['nope']}))


def test_rank_pattern_matching_no_adapted_layer():
    model = small_cnn()
    _expect_error(model, ValueError, "rank_pattern key 'norm' matches no adapted layer; adapted layers include 'stem'",
                  visadapt.inject, model, visadapt.FLoRAConfig(rank_pattern={'norm': 2}))


def test_unsupported_layer_named_exactly():
    """A LayerNorm selected by its exact name: the error names its type and the types FLoRA can adapt."""
    model = small_cnn()
    _expect_error(model, ValueError, r"include pattern 'ln' matches only modules of type\(s\) \['LayerNorm'\], which "
                  r"FLoRA cannot adapt.*'Conv2d'", visadapt.inject, model, visadapt.FLoRAConfig(include=['ln']))


def test_include_pattern_naming_a_container_suggests_a_glob():
    model = nn.Sequential()
    model.add_module('stage', nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)))
    model.add_module('head', nn.Linear(8, 2))
    _expect_error(model, ValueError, r"include pattern 'stage' matches container module\(s\) of type\(s\) "
                  r"\['Sequential'\], not layers; to adapt the layers inside use a glob such as 'stage\.\*' "
                  r"\(e\.g\. 'stage\.0', 'stage\.2'\)", visadapt.inject, model, visadapt.FLoRAConfig(include=['stage']))
    assert visadapt.inject(model, visadapt.FLoRAConfig(include=['stage.*'])).layers == ['stage.0', 'stage.2']


def test_timm_conv2d_same_subclass_is_refused_and_nothing_is_converted():
    """timm's Conv2dSame subclasses nn.Conv2d but pads in forward(): adapting it as a plain conv would be wrong."""
    from timm.layers import Conv2dSame
    model = small_cnn()
    model.same = Conv2dSame(16, 16, 3, stride=2)
    _expect_error(model, TypeError, r"cannot adapt layer 'same': unsupported layer type "
                  r"timm\.layers\.conv2d_same\.Conv2dSame.*overrides forward.*\(leave it out with "
                  r"exclude=\['same'\]\)",
                  visadapt.inject, model, visadapt.FLoRAConfig(target_types=['Conv2d']))
    # leaving it out works
    report = visadapt.inject(model, visadapt.FLoRAConfig(target_types=['Conv2d'], exclude=['same']))
    assert report.layers == ['stem', 'dw', 'pw']


def test_conv_subclass_overriding_conv_forward_is_refused():
    """A weight-standardized conv that only overrides _conv_forward would be silently wrong if adapted."""
    class StdConv(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            w = (weight - weight.mean(dim=(1, 2, 3), keepdim=True)) / (weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
            return super()._conv_forward(x, w, bias)
    model = small_cnn()
    model.std = StdConv(16, 16, 3)
    _expect_error(model, TypeError, r"cannot adapt layer 'std': unsupported layer type .*StdConv: it subclasses "
                  r"nn\.Conv2d but overrides forward\(\) or _conv_forward\(\)", visadapt.inject, model,
                  visadapt.FLoRAConfig(target_types=['Conv2d']))


def test_target_type_not_supported_by_method():
    with pytest.raises(ValueError, match="target type 'BatchNorm2d' is not supported by FLoRA; supported: "):
        visadapt.FLoRAConfig(target_types=['BatchNorm2d'])


def test_same_adapter_name_twice():
    model = small_cnn()
    visadapt.inject(model, visadapt.FLoRAConfig(r=2))
    randomize_adapters(model)
    _expect_error(model, ValueError, r"an adapter named 'default' is already injected; pick another name or remove it "
                  r"first \(present: \['default'\]\)", visadapt.inject, model, visadapt.LoRAConfig(r=2))


@pytest.mark.parametrize('name', ['', 'my adapter', '1st', 'a.b', None, 3])
def test_bad_adapter_name(name):
    model = small_cnn()
    _expect_error(model, ValueError, 'is not valid; use a Python identifier', visadapt.inject, model,
                  visadapt.FLoRAConfig(), name=name)


@pytest.mark.parametrize('name', ['keys', 'training', 'forward', '_modules'])
def test_adapter_name_reserved_by_module_dict(name):
    model = small_cnn()
    _expect_error(model, ValueError, f"adapter name '{name}' is reserved", visadapt.inject, model,
                  visadapt.FLoRAConfig(), name=name)


def test_config_must_be_a_config_object():
    model = small_cnn()
    _expect_error(model, TypeError, r'config must be an AdapterConfig .*got dict', visadapt.inject, model,
                  {'method': 'FLoRA', 'r': 4})


@pytest.mark.parametrize('fn', [visadapt.merge, visadapt.unmerge, visadapt.remove, visadapt.enable_adapter,
                                visadapt.disable_adapter])
def test_unknown_adapter_name_in_model_functions(fn):
    model = small_cnn()
    visadapt.inject(model, visadapt.FLoRAConfig(r=2))
    _expect_error(model, ValueError, r"no adapter named 'other' in this model; adapters present: \['default'\]",
                  fn, model, 'other')


def test_method_build_error_names_the_layer_and_changes_nothing():
    """SeRA's split must divide in/out features: layer '1' (16 → 3) fails after layer '0' was built fine, and the
    whole injection is abandoned with the model untouched."""
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 3), nn.Linear(3, 5))
    _expect_error(model, ValueError, r"cannot adapt layer '1': SeRA split=8 .* out_features=3", visadapt.inject,
                  model, visadapt.get_config_class('SeRA')())


def test_failure_while_attaching_rolls_back(monkeypatch):
    """Even an unexpected error in the modifying phase (here: the third attach) leaves no half-injected model."""
    import visadapt.core.tuner as tuner
    model = small_cnn()
    visadapt.inject(model, visadapt.LoRAConfig(r=2, include=['pw'], train_modules=['head']), name='first')
    before = state_snapshot(model)
    real_attach, calls = tuner.attach, []

    def flaky(module, name, adapter):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError('simulated failure')
        real_attach(module, name, adapter)
    monkeypatch.setattr(tuner, 'attach', flaky)
    with pytest.raises(RuntimeError, match='simulated failure'):
        visadapt.inject(model, visadapt.FLoRAConfig(r=2), name='second')
    assert_unchanged(model, before)
    assert list(model.pw.visadapt.keys()) == ['first']


@pytest.mark.parametrize('data,exc,match', [
    ({'r': 4}, ValueError, "adapter config needs a 'method' \\(or 'type'\\) key"),
    ({'method': 'LoRAX'}, ValueError, "unknown adapter method 'LoRAX'; registered methods: .*'FLoRA'"),
    ({'type': 'FLoRA', 'rank': 4}, ValueError, r"unknown FLoRAConfig field\(s\) \['rank'\]; valid fields: .*'r'"),
])
def test_config_from_dict_errors(data, exc, match):
    with pytest.raises(exc, match=match):
        visadapt.config_from_dict(data)


# ---- targeting and train_modules -------------------------------------------------------------------------------------
def test_targeting_by_type_include_exclude_and_glob():
    model = small_cnn()
    assert visadapt.inject(model, visadapt.FLoRAConfig(target_types=['Conv2d'])).layers == ['stem', 'dw', 'pw']
    visadapt.remove(model)
    assert visadapt.inject(model, visadapt.FLoRAConfig(include=['*w'], exclude=['dw'])).layers == ['pw']
    visadapt.remove(model)
    assert visadapt.inject(model, visadapt.FLoRAConfig(target_types='Linear')).layers == ['fc', 'head']


def test_train_modules_are_trained_not_adapted():
    model = small_cnn()
    report = visadapt.inject(model, visadapt.FLoRAConfig(r=2, train_modules=['head', 'norm']))
    assert report.layers == ['stem', 'dw', 'pw', 'fc']  # 'head' is a Linear but trained fully
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_params(model)) | {'head.weight', 'head.bias', 'norm.weight', 'norm.bias'}
    assert report.trainable == sum(model.get_parameter(n).numel() for n in trainable)
    assert 'trainable' in str(report) and 'FLoRA' in str(report)


def test_train_module_holding_another_adapters_layer_is_saved_without_it(tmp_path):
    """Adapter 'a' adapts fc; adapter 'b' trains fc fully: b's file holds fc's own tensors, not a's."""
    model = small_cnn()
    visadapt.inject(model, visadapt.LoRAConfig(r=2, include=['fc']), name='a')
    visadapt.inject(model, visadapt.FLoRAConfig(r=2, include=['pw'], train_modules=['fc']), name='b')
    randomize_adapters(model)
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    state = visadapt.adapter_state_dict(model, 'b')
    assert sorted(k for k in state if k.startswith('trained.')) == ['trained.fc.bias', 'trained.fc.weight']
    visadapt.save_adapter(model, tmp_path, name='b')
    fresh = small_cnn()
    visadapt.inject(fresh, visadapt.LoRAConfig(r=2, include=['fc']), name='a')
    visadapt.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh.fc.weight, model.fc.weight, rtol=0, atol=0)
    torch.testing.assert_close(fresh.pw.visadapt['b'].G, model.pw.visadapt['b'].G, rtol=0, atol=0)


# ---- enable / disable ------------------------------------------------------------------------------------------------
def _flora_cnn():
    """The small CNN with a trained-looking FLoRA adapter: (model, base output, adapted output)."""
    model = small_cnn()
    base = _out(model)
    visadapt.inject(model, visadapt.FLoRAConfig(r=2, scale=2.0))
    randomize_adapters(model)
    return model, base, _out(model)


def test_disable_enable_and_context_manager():
    model, base, adapted = _flora_cnn()
    assert not torch.allclose(adapted, base)
    visadapt.disable_adapter(model)
    assert torch.equal(_out(model), base)
    assert {r['path'] for r in visadapt.summary(model).rows} == {'disabled'}
    visadapt.enable_adapter(model)
    assert torch.equal(_out(model), adapted)
    with visadapt.adapters_disabled(model):
        assert torch.equal(_out(model), base)
    assert torch.equal(_out(model), adapted)
    with pytest.raises(RuntimeError, match='boom'):
        with visadapt.adapters_disabled(model):
            raise RuntimeError('boom')
    assert torch.equal(_out(model), adapted)  # re-enabled even after an exception


def test_disable_merged_adapter_unmerges_it():
    model = small_cnn()
    w0 = model.pw.weight.detach().clone()
    base = _out(model)
    visadapt.inject(model, visadapt.LoRAConfig(r=2))
    randomize_adapters(model)
    adapted = _out(model)
    visadapt.merge(model)
    visadapt.disable_adapter(model)
    torch.testing.assert_close(_out(model), base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.pw.weight, w0, rtol=1e-5, atol=1e-7)
    visadapt.enable_adapter(model)
    torch.testing.assert_close(_out(model), adapted, rtol=1e-5, atol=1e-6)
    # merge skips disabled adapters: they must not be folded in
    visadapt.disable_adapter(model)
    visadapt.merge(model)
    torch.testing.assert_close(model.pw.weight, w0, rtol=1e-5, atol=1e-7)


def test_adapters_disabled_context_remerges_merged_adapters():
    model, base, adapted = _flora_cnn()
    visadapt.merge(model)
    with visadapt.adapters_disabled(model):
        torch.testing.assert_close(_out(model), base, rtol=1e-5, atol=1e-6)
    assert {r['path'] for r in visadapt.summary(model).rows} == {'merged'}
    torch.testing.assert_close(_out(model), adapted, rtol=1e-5, atol=1e-6)


def test_adapters_disabled_context_leaves_other_states_alone():
    model = small_cnn()
    visadapt.inject(model, visadapt.FLoRAConfig(r=2), name='a')
    visadapt.inject(model, visadapt.LoRAConfig(r=2), name='b')
    randomize_adapters(model)
    visadapt.disable_adapter(model, 'a')
    only_b = _out(model)
    with visadapt.adapters_disabled(model, 'b'):
        pass
    assert torch.equal(_out(model), only_b)  # 'a' stays disabled, 'b' enabled


# ---- several named adapters on one model -----------------------------------------------------------------------------
def test_two_adapters_merge_unmerge_and_remove_one():
    model = small_cnn()
    base = _out(model)
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    classes0 = {n: type(m) for n, m in model.named_modules()}
    visadapt.inject(model, visadapt.FLoRAConfig(r=2, scale=2.0, target_types=['Conv2d']), name='a')
    visadapt.inject(model, visadapt.LoRAConfig(r=2, include=['pw', 'fc']), name='b')
    assert visadapt.adapter_names(model) == ['a', 'b']
    assert sorted(model.pw.visadapt.keys()) == ['a', 'b']
    randomize_adapters(model)
    both = _out(model)
    with visadapt.adapters_disabled(model, 'a'):
        only_b = _out(model)
    with visadapt.adapters_disabled(model, 'b'):
        only_a = _out(model)
    assert not torch.allclose(both, only_a) and not torch.allclose(both, only_b)

    visadapt.merge(model, 'a')
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_out(model), both, **tol)
    visadapt.merge(model, 'b')
    torch.testing.assert_close(_out(model), both, **tol)
    visadapt.unmerge(model, 'a')  # 'b' was merged after 'a': it is taken out and put back
    torch.testing.assert_close(_out(model), both, **tol)
    assert model.pw._va_merged == ['b']
    visadapt.unmerge(model)
    torch.testing.assert_close(_out(model), both, **tol)

    visadapt.remove(model, 'a')
    assert visadapt.adapter_names(model) == ['b']
    assert not hasattr(model.stem, 'visadapt') and type(model.stem) is nn.Conv2d  # only 'a' was there
    assert list(model.pw.visadapt.keys()) == ['b']
    torch.testing.assert_close(_out(model), only_b, **tol)
    assert all(k in state0 or '.visadapt.b.' in k for k in model.state_dict())
    visadapt.remove(model, 'b')
    assert {n: type(m) for n, m in model.named_modules()} == classes0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state0[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_out(model), base, **tol)


def test_requires_grad_flags_survive_several_adapters_in_any_removal_order():
    model = small_cnn()
    model.norm.weight.requires_grad_(False)  # the user's own choice, before any adapter
    flags0 = {n: p.requires_grad for n, p in model.named_parameters()}
    visadapt.inject(model, visadapt.FLoRAConfig(r=2, include=['pw'], train_modules=['head']), name='a')
    visadapt.inject(model, visadapt.LoRAConfig(r=2, include=['fc']), name='b')
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # 'a' keeps its train module trainable when 'b' is added
    assert trainable == set(adapter_params(model)) | {'head.weight', 'head.bias'}
    visadapt.remove(model, 'a')
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter_params(model))
    visadapt.remove(model, 'b')
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags0


def test_remove_all_at_once_restores_everything():
    model = small_cnn()
    before = state_snapshot(model)
    visadapt.inject(model, visadapt.FLoRAConfig(r=2), name='a')
    visadapt.inject(model, visadapt.LoRAConfig(r=2, target_types=['Conv2d']), name='b')
    randomize_adapters(model)
    visadapt.remove(model)
    assert_unchanged(model, before)


def test_merge_refuses_tied_weights_but_not_a_module_registered_twice():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model[2].weight = model[0].weight  # tied
    visadapt.inject(model, visadapt.LoRAConfig(r=2))
    randomize_adapters(model)
    _expect_error(model, ValueError, r"layer '0' shares its weight with \['2'\] \(tied weights\)", visadapt.merge, model)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)  # one module used twice: merging it once is right
    visadapt.inject(model, visadapt.LoRAConfig(r=2))
    randomize_adapters(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        adapted = model(x)
        visadapt.merge(model)
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-6)


# ---- summary ---------------------------------------------------------------------------------------------------------
def test_summary_rows_and_table():
    model = small_cnn()
    visadapt.inject(model, visadapt.FLoRAConfig(r=2, r3=1, target_types=['Conv2d'], forward_path='bypass'), name='a')
    visadapt.inject(model, visadapt.LoRAConfig(r=2, include=['fc']), name='b')
    visadapt.merge(model, 'b')
    s = visadapt.summary(model)
    rows = [(r['layer'], r['adapter'], r['method'], r['weight_shape'], r['path'], r['trainable']) for r in s.rows]
    assert rows == [
        ('stem', 'a', 'FLoRA', (16, 3, 3, 3), 'bypass', 16 * 2 + 3 * 2 + 3 + 3 + 2 * 2),
        ('dw', 'a', 'FLoRA', (16, 1, 3, 3), 'bypass', 16 * 2 + 1 * 1 + 3 + 3 + 2 * 1),
        ('pw', 'a', 'FLoRA', (32, 16, 1, 1), 'bypass', 32 * 2 + 16 * 2 + 1 + 1 + 2 * 2),
        ('fc', 'b', 'LoRA', (32, 32), 'merged', 2 * (32 + 32)),
    ]
    trainable, total = visadapt.count_parameters(model)
    assert (s.trainable, s.total) == (trainable, total)
    assert trainable == sum(r[-1] for r in rows)
    text = str(s)
    assert text.splitlines()[0].split() == ['layer', 'adapter', 'method', 'weight', 'shape', 'path', 'trainable']
    assert '16x3x3x3' in text and f'trainable {trainable:,} / {total:,} parameters' in text


# ---- copies ----------------------------------------------------------------------------------------------------------
def test_deepcopy_of_injected_model_is_independent():
    model = small_cnn()
    visadapt.inject(model, visadapt.FLoRAConfig(r=2, train_modules=['head']))
    randomize_adapters(model)
    adapted = _out(model)
    clone = copy.deepcopy(model)
    assert torch.equal(_out(clone), adapted)
    assert type(clone.pw) is type(model.pw) and visadapt.adapter_names(clone) == ['default']
    assert get_injection(clone, 'default') is not get_injection(model, 'default')
    with torch.no_grad():
        clone.pw.visadapt['default'].G.add_(1.0)
    assert torch.equal(_out(model), adapted)
    visadapt.merge(clone)
    visadapt.remove(clone)
    assert type(clone.pw) is nn.Conv2d
    assert visadapt.adapter_names(model) == ['default'] and torch.equal(_out(model), adapted)


def test_timm_model_ema_of_injected_model():
    """timm's ModelEmaV3 deep-copies the model and averages every state tensor, adapters included."""
    from timm.utils import ModelEmaV3
    model = small_cnn()
    visadapt.inject(model, visadapt.FLoRAConfig(r=2))
    ema = ModelEmaV3(model, decay=0.5)
    randomize_adapters(model)
    ema.update(model, step=10)
    g_model, g_ema = model.pw.visadapt['default'].G, ema.module.pw.visadapt['default'].G
    torch.testing.assert_close(g_ema, 0.5 * g_model)
    assert torch.isfinite(ema.module(X)).all()


def test_whole_model_pickle_roundtrip_in_process():
    model = small_cnn()
    visadapt.inject(model, visadapt.FLoRAConfig(r=2), name='a')
    visadapt.inject(model, visadapt.LoRAConfig(r=2, include=['fc']), name='b')
    randomize_adapters(model)
    visadapt.merge(model, 'b')
    adapted = _out(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(_out(loaded), adapted)
    assert type(loaded.pw) is type(model.pw) and loaded.fc._va_merged == ['b']
    visadapt.remove(loaded)
    assert type(loaded.pw) is nn.Conv2d and type(loaded.fc) is nn.Linear
    torch.testing.assert_close(_out(loaded), _out(small_cnn()), rtol=1e-5, atol=1e-6)


def test_isinstance_and_base_attributes_kept():
    model = small_cnn()
    visadapt.inject(model, visadapt.FLoRAConfig(r=2))
    assert isinstance(model.pw, nn.Conv2d) and isinstance(model.fc, nn.Linear)
    assert model.pw.weight.shape == (32, 16, 1, 1) and model.pw.kernel_size == (1, 1)
    assert 'Adapted' in type(model.pw).__name__


def test_torch_compile_traces_an_injected_model_without_graph_breaks():
    """Class-swapped layers, the per-shape path choice and both paths trace as one graph (timm's --torchcompile)."""
    model = small_cnn()
    visadapt.inject(model, visadapt.FLoRAConfig(r=2))
    randomize_adapters(model)
    ref = model(X)
    compiled = torch.compile(model, backend='eager', fullgraph=True)
    out = compiled(X)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    assert all(p.grad is not None for p in adapter_params(model).values())
    torch._dynamo.reset()


def test_adapters_are_built_on_the_base_weight_device():
    model = small_cnn().to('meta')
    visadapt.inject(model, visadapt.LoRAConfig(r=2))
    assert {p.device.type for p in adapter_params(model).values()} == {'meta'}
