"""visadapt.integrations.timm_models (wrapping, presets, weights, merged checkpoints), visadapt.core.budget and the
classification trainer (visadapt-train-classifier on timm's machinery)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn

import visadapt
import visadapt.integrations.timm_models as vt
from visadapt.apps import train_classifier as classify
from visadapt.core import read_adapter
from visadapt.core.budget import BudgetCounter, budget_field, count_adapter_params, match_budget
from visadapt.core.tuner import get_injection

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=3)


def _conv_names(model: nn.Module) -> list:
    """Plain nn.Conv2d layers (also once adapted: injection swaps the class for a subclass)."""
    from visadapt.core.layer import is_adapted
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and (type(m) is nn.Conv2d or (is_adapted(m) and m._va_class is nn.Conv2d))]


# ---- offline weights ---------------------------------------------------------------------------------------------------
def _photo(mean, std, size=224) -> torch.Tensor:
    from skimage import data
    x = torch.tensor(data.chelsea()).permute(2, 0, 1).float()[None] / 255
    x = torch.nn.functional.interpolate(x, size=(size, size), mode='bilinear', antialias=True)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_packaged_efficientnet_lite0_recognizes_a_cat():
    model = vt.create_model('efficientnet_lite0', pretrained='packaged').eval()
    cfg = model.pretrained_cfg
    assert cfg['file'] == vt.PACKAGED_WEIGHTS['efficientnet_lite0'].path() and cfg['mean'] == (0.5, 0.5, 0.5)
    with torch.no_grad():
        top = model(_photo(cfg['mean'], cfg['std'])).argmax(1).item()
    assert top in (281, 282, 285), top  # tabby / tiger cat / Egyptian cat (scikit-image's "chelsea")


def test_packaged_mobilenetv2_equals_torchvision():
    import torchvision
    model = vt.create_model('mobilenetv2_100', pretrained='packaged').eval()
    ref = torchvision.models.mobilenet_v2()
    ref.load_state_dict(torch.load(vt.PACKAGED_WEIGHTS['mobilenetv2_100'].path(), weights_only=True))
    x = _photo(model.pretrained_cfg['mean'], model.pretrained_cfg['std'], size=96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.eval()(x), rtol=1e-5, atol=1e-5)


def test_packaged_weights_with_new_head_keep_the_backbone():
    path = vt.PACKAGED_WEIGHTS['efficientnet_lite0'].path()
    file_tensors = list(torch.load(path, weights_only=True).values())
    model = vt.create_model('efficientnet_lite0', pretrained='packaged', num_classes=7, adapter='FLoRA')
    assert model.classifier.weight.shape == (7, 1280) and model.num_classes == 7
    torch.testing.assert_close(model.conv_stem.weight, file_tensors[0], rtol=0, atol=0)
    torch.testing.assert_close(model.bn2.running_var, file_tensors[-4], rtol=0, atol=0)
    assert model.classifier.weight.requires_grad


def test_packaged_weights_onto_another_architecture_is_a_clear_error():
    model = timm.create_model('mobilenetv2_100')
    with pytest.raises(ValueError, match='296 tensors but the model has 314'):
        vt.load_pretrained(model, vt.PACKAGED_WEIGHTS['efficientnet_lite0'].path(), by_position=True)
    with pytest.raises(ValueError, match="'packaged' is available for"):
        vt.create_model('convnext_atto', pretrained='packaged')


@pytest.mark.parametrize('fmt', ['pth', 'wrapped', 'safetensors'])
def test_local_checkpoint_file_never_touches_the_hub(tmp_path, monkeypatch, fmt):
    torch.manual_seed(3)
    src = timm.create_model('convnext_atto', num_classes=10)
    state = src.state_dict()
    path = str(tmp_path / f'ckpt.{"safetensors" if fmt == "safetensors" else "pth"}')
    if fmt == 'safetensors':
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save({'state_dict': state, 'epoch': 3} if fmt == 'wrapped' else state, path)

    def no_hub(*args, **kwargs):
        raise AssertionError('the hub was touched')
    monkeypatch.setattr(timm.models._builder, 'load_pretrained', no_hub)
    monkeypatch.setattr(timm.models._builder, 'load_custom_pretrained', no_hub)
    same = vt.create_model('convnext_atto', pretrained=path, num_classes=10)
    for k, v in same.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert same.pretrained_cfg['file'] == os.path.abspath(path)
    # another head size: the backbone loads, the classifier is freshly initialized
    other = vt.create_model('convnext_atto', pretrained=path, num_classes=3, adapter=visadapt.LoRAConfig(r=2))
    torch.testing.assert_close(other.stem[0].weight, state['stem.0.weight'], rtol=0, atol=0)
    assert other.head.fc.weight.shape == (3, 320)


def test_bad_checkpoint_files_are_clear_errors(tmp_path):
    model = timm.create_model('convnext_atto', num_classes=10)
    state = model.state_dict()
    bad = dict(state, **{'stem.0.weight': torch.zeros(1, 3, 4, 4)})
    torch.save(bad, tmp_path / 'shape.pth')
    with pytest.raises(ValueError, match=r"'stem.0.weight' has shape \(1, 3, 4, 4\) in the file but \(40, 3, 4, 4\)"):
        vt.create_model('convnext_atto', pretrained=str(tmp_path / 'shape.pth'), num_classes=10)
    del state['stem.0.bias']
    torch.save(state, tmp_path / 'missing.pth')
    with pytest.raises(ValueError, match="'stem.0.bias' is missing from the file"):
        vt.create_model('convnext_atto', pretrained=str(tmp_path / 'missing.pth'), num_classes=10)
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='weights_only=True'):
        vt.read_state_dict(tmp_path / 'junk.pth')
    with pytest.raises(FileNotFoundError, match='is not a file'):
        vt.create_model('convnext_atto', pretrained=str(tmp_path / 'nope.pth'))


def test_pretrained_true_is_timms_own_loader_and_packaged_is_explicit(monkeypatch):
    """pretrained=True means what it means in timm (timm's loader with timm's pretrained_cfg), also for names that
    have packaged weights; 'packaged' alone gives the offline file."""
    asked = []

    def timm_loader(model, pretrained_cfg=None, **kwargs):
        asked.append(pretrained_cfg)
        raise RuntimeError('timm loader reached')
    monkeypatch.setattr(timm.models._builder, 'load_pretrained', timm_loader)
    with pytest.raises(RuntimeError, match='timm loader reached'):
        vt.create_model('efficientnet_lite0', pretrained=True, num_classes=10)
    packaged_file = vt.PACKAGED_WEIGHTS['efficientnet_lite0'].path()
    assert len(asked) == 1 and asked[0].get('file') != packaged_file and asked[0].get('hf_hub_id')
    model = vt.create_model('efficientnet_lite0', pretrained='packaged', num_classes=10)
    assert model.pretrained_cfg['file'] == packaged_file and len(asked) == 1


@pytest.mark.parametrize('arch, adapter, kwargs', [
    ('convnext_atto', {'method': 'FLoRA', 'r': 2}, {'mlp': True}),
    ('vit_tiny_patch16_224', {'method': 'LoRA', 'r': 4}, TINY_VIT),  # q and v slices of the fused qkv
    ('efficientnet_lite0', {'method': 'DoRA', 'r': 2}, {}),          # BatchNorms; DoRA's magnitude
])
def test_merged_checkpoint_loads_into_plain_timm_with_the_adapted_outputs(tmp_path, arch, adapter, kwargs):
    torch.manual_seed(0)
    model = vt.create_model(arch, num_classes=6, adapter=adapter, **kwargs).eval()
    with torch.no_grad():
        for p in visadapt.adapter_state_dict(model).values():
            p.add_(0.05 * torch.randn_like(p))  # a trained-looking, non-zero update
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        base = {k: v.clone() for k, v in model.state_dict().items()}
    for suffix in ('safetensors', 'pth'):
        path = tmp_path / f'merged.{suffix}'
        vt.save_merged_checkpoint(model, path)
        timm_kwargs = {k: v for k, v in kwargs.items() if k not in ('mlp', 'proj')}
        plain = timm.create_model(arch, num_classes=6, checkpoint_path=str(path), **timm_kwargs).eval()
        assert type(plain) is type(model) and not any('visadapt' in k for k in plain.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(plain(x), ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        visadapt.disable_adapter(model)
        assert (model(x) - ref).abs().max() > 1e-3  # the adapters mattered
    for k, v in model.state_dict().items():  # the adapted model itself is unchanged
        torch.testing.assert_close(v, base[k], rtol=0, atol=0)


def test_merged_checkpoint_refuses_what_it_would_drop(tmp_path):
    model = vt.create_model('convnext_atto', num_classes=4, adapter='LoRA')
    visadapt.disable_adapter(model)
    with pytest.raises(ValueError, match=r"adapter\(s\) \['default'\] are disabled"):
        vt.save_merged_checkpoint(model, tmp_path / 'a.safetensors')
    model = vt.create_model('efficientnet_lite0', num_classes=4, adapter={'method': 'BitFit', 'bias_free': 'add'})
    with pytest.raises(ValueError, match='cannot be merged'):
        vt.save_merged_checkpoint(model, tmp_path / 'b.safetensors')
    assert not list(tmp_path.iterdir())


# ---- wrapping and presets --------------------------------------------------------------------------------------------
def test_convnext_preset_all_convs_and_optional_mlp():
    model = timm.create_model('convnext_atto', num_classes=4)
    base_keys = set(model.state_dict())
    vt.wrap(model, visadapt.FLoRAConfig(r=4, r3=2, scale=4.0))
    inj = get_injection(model, 'default')
    convs = [n for n in _conv_names(model) if 'mlp' not in n]
    assert inj.layers == convs and len(convs) == 16  # stem, 3 downsamples, 12 depthwise 7x7
    assert any(n.endswith('conv_dw') for n in inj.layers) and 'stages.1.downsample.1' in inj.layers
    assert inj.train_modules == ['head.fc']
    assert {k for k in model.state_dict() if 'visadapt' not in k} == base_keys
    model.eval()(torch.randn(2, 3, 32, 32)).sum()  # forward works

    with_mlp = vt.create_model('convnext_atto', num_classes=4, adapter='LoRA', mlp=True)
    layers = get_injection(with_mlp, 'default').layers
    assert len(layers) == 16 + 2 * 12 and 'stages.3.blocks.1.mlp.fc2' in layers


def test_efficientnet_and_mobilenet_presets_adapt_every_conv():
    for name in ('efficientnet_lite0', 'mobilenetv2_100', 'mobilenetv3_small_050'):
        model = timm.create_model(name, num_classes=5)
        vt.wrap(model, 'FLoRA')
        inj = get_injection(model, 'default')
        assert inj.layers == _conv_names(model), name
        assert inj.train_modules == ['classifier']


def test_tf_same_padding_convs_are_excluded_not_fatal():
    model = timm.create_model('tf_efficientnet_lite0', num_classes=5)
    odd = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and type(m) is not nn.Conv2d]
    plain = _conv_names(model)
    vt.wrap(model, 'LoRA')  # timm's Conv2dSame (stride-2 'same' padding) is not a plain conv: left out
    assert odd and plain and get_injection(model, 'default').layers == plain


def test_vit_preset_q_v_slices_and_options():
    model = timm.create_model('vit_tiny_patch16_224', num_classes=3, **TINY_VIT)
    vt.wrap(model, visadapt.LoRAConfig(r=4))
    inj = get_injection(model, 'default')
    assert inj.layers == ['blocks.0.attn.qkv', 'blocks.1.attn.qkv'] and inj.train_modules == ['head']
    keys = list(visadapt.adapter_state_dict(model))
    assert any('.q.' in k for k in keys) and any('.v.' in k for k in keys) and not any('.k.' in k for k in keys)
    # q and v only: 2 slices x r x (in + out) per block
    assert get_injection(model, 'default') and visadapt.summary(model).trainable == 2 * 2 * 4 * (96 + 96) + 3 * 96 + 3
    full = vt.create_model('vit_tiny_patch16_224', num_classes=3, adapter='LoRA', proj=True, mlp=True, **TINY_VIT)
    assert len(get_injection(full, 'default').layers) == 2 * 4


def test_user_targets_override_the_preset_and_bad_input():
    model = timm.create_model('convnext_atto', num_classes=4)
    vt.wrap(model, visadapt.LoRAConfig(r=2, include=['stem.0']))
    assert get_injection(model, 'default').layers == ['stem.0']
    vt.wrap(model, visadapt.LoRAConfig(r=2, include=['stem.0']), name='second', train_head=False)
    assert get_injection(model, 'second').train_modules == []
    with pytest.raises(ValueError, match=r"SeRA adapts .*convnext preset targets \['Conv2d'\]"):
        vt.wrap(timm.create_model('convnext_atto'), 'SeRA')
    with pytest.raises(TypeError, match='adapter must be an AdapterConfig'):
        vt.wrap(timm.create_model('convnext_atto'), 3)
    with pytest.raises(ValueError, match="unknown adapter method 'nope'"):
        vt.wrap(timm.create_model('convnext_atto'), 'nope')
    with pytest.raises(ValueError, match="preset='x' is not valid"):
        vt.wrap(timm.create_model('convnext_atto'), 'LoRA', preset='x')


def test_timm_idioms_reset_classifier_and_save_load(tmp_path):
    torch.manual_seed(0)
    model = vt.create_model('convnext_atto', num_classes=10, adapter=visadapt.FLoRAConfig(r=2))
    assert model.get_classifier() is model.head.fc
    model.reset_classifier(6)  # timm idiom after wrapping: the new head is the one trained and saved
    assert model.head.fc.weight.requires_grad
    for p in visadapt.adapter_state_dict(model).values():
        p.data.normal_()  # non-trivial adapter
    visadapt.save_adapter(model, tmp_path / 'a')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.eval()(x)
    fresh = timm.create_model('convnext_atto', num_classes=6)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if 'visadapt' not in k.split('.')
                           and not k.startswith('head.fc')}, strict=False)
    visadapt.load_adapter(fresh, tmp_path / 'a')
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), ref)


def test_every_method_is_finite_on_the_packaged_efficientnet_lite0():
    """Real pretrained weights have dead (all-zero) channels; no method may turn them into NaN."""
    model = vt.create_model('efficientnet_lite0', pretrained='packaged', num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    for key in sorted(visadapt.METHODS):
        try:
            vt.wrap(model, key, name='m')
        except ValueError:
            continue  # not applicable to convs (e.g. SeRA)
        with torch.no_grad():
            assert torch.isfinite(model(x)).all(), key
        visadapt.remove(model, 'm')


def test_every_method_wraps_or_says_why():
    """Registry-driven: every registered method either wraps efficientnet_lite0 or a tiny ViT, with its classifier."""
    models = {'efficientnet_lite0': timm.create_model('efficientnet_lite0', num_classes=3),
              'vit': timm.create_model('vit_tiny_patch16_224', num_classes=3, **TINY_VIT)}
    for key, cls in visadapt.METHODS.items():
        wrapped = 0
        for name, model in models.items():
            try:
                vt.wrap(model, key, name=f'm_{key}')
            except ValueError as err:
                assert cls.method in str(err), (key, name, err)
                continue
            wrapped += 1
            x = torch.randn(2, 3, 32, 32)
            model.eval()(x)
            visadapt.remove(model, f'm_{key}')
        assert wrapped, key


# ---- budget matcher --------------------------------------------------------------------------------------------------
# model → (timm kwargs, target adapter parameters). Targets are ≥ 10 rank steps of every method (a linear count
# cannot get closer than half a step). SeRA's count is quantized: split = r must divide the width (192 here), so
# r ∈ {..., 32, 48, 64, 96}: 36,000 sits near r = 64 (35,840); a target between lattice points is matched as closely
# as the lattice allows, and the match reports the achieved count.
BUDGET_MODELS = {
    'convnext_atto': ({}, 120_000),
    'efficientnet_lite0': ({}, 600_000),
    'vit_tiny': (dict(img_size=32, patch_size=8, depth=4), 36_000),
}


@pytest.mark.parametrize('model_name', sorted(BUDGET_MODELS))
def test_budget_matcher_within_5_percent_for_every_rank_method(model_name):
    kwargs, target = BUDGET_MODELS[model_name]
    arch = 'vit_tiny_patch16_224' if model_name == 'vit_tiny' else model_name
    model = timm.create_model(arch, num_classes=10, **kwargs)
    counter = BudgetCounter(model)
    checked = []
    for key in sorted(visadapt.METHODS):
        try:
            config = vt.make_config(model, key)
        except ValueError:
            continue  # the method does not apply to this family (e.g. SeRA on convs)
        if budget_field(config) is None:
            continue
        match = match_budget(model, config, target, counter=counter)
        assert abs(match.rel_error) <= 0.05, str(match)
        # the dry-run count is exactly what injection reports
        report = visadapt.inject(model, match.config, name='check')
        assert report.adapter_params == match.achieved, key
        visadapt.remove(model, 'check')
        checked.append(key)
    assert 'lora' in checked and ('flora' in checked or model_name == 'vit_tiny')


def test_budget_matcher_bad_input_and_fixed_methods():
    model = timm.create_model('convnext_atto', num_classes=10)
    with pytest.raises(ValueError, match='target must be a positive integer'):
        match_budget(model, vt.make_config(model, 'LoRA'), 0)
    with pytest.raises(ValueError, match='IA3 has no rank to tune'):
        match_budget(model, vt.make_config(model, 'IA3'), 1000)
    explicit = match_budget(model, vt.make_config(model, 'LoRA'), 10_000, values=[1, 2, 3])
    assert explicit.value in (1, 2, 3) and set(explicit.counts) == {1, 2, 3}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_adapter_params(model, vt.make_config(model, 'FLoRA'))
    assert set(model.state_dict()) == set(before) and not visadapt.adapter_names(model)


# ---- ViT classification: SeRA, SVFT, LoRA on q and v -----------------------------------------------------------------
def test_vit_base_counts_match_the_papers_formulas():
    """ViT-B/16 built without weights, q and v of all 12 blocks (the papers' setting)."""
    model = timm.create_model('vit_base_patch16_224', num_classes=0)
    d, n = 768, 2 * 12  # width, adapted matrices

    def count(config):
        report = visadapt.inject(model, vt.make_config(model, config), name='count')
        visadapt.remove(model, 'count')
        return report.adapter_params
    assert count(visadapt.LoRAConfig(r=8)) == n * 8 * (d + d) == 294_912  # LoRA: r·(d_in + d_out)
    # SeRA: (d_in + d_out)·r/split + r² per matrix (split = r by default; split=4 as a second case)
    assert count(visadapt.SeRAConfig(r=16)) == n * ((d + d) * 16 // 16 + 16 ** 2) == 43_008
    assert count(visadapt.SeRAConfig(r=16, split=4)) == n * ((d + d) * 16 // 4 + 16 ** 2)
    # SVFT plain: min(d_out, d_in) per matrix (SVD of each slice); the paper's 18.4K for ViT-B q,v
    assert count(visadapt.SVFTConfig()) == n * d == 18_432


@pytest.mark.parametrize('method', ['SeRA', 'SVFT', 'LoRA'])
def test_vit_q_v_end_to_end(method, tmp_path):
    torch.manual_seed(0)
    fields = {'SeRA': {'r': 4}, 'SVFT': {}, 'LoRA': {'r': 4}}[method]
    model = vt.create_model('vit_tiny_patch16_224', num_classes=4, adapter={'method': method, **fields}, **TINY_VIT)
    inj = get_injection(model, 'default')
    assert inj.layers == ['blocks.0.attn.qkv', 'blocks.1.attn.qkv']
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    qkv = model.blocks[0].attn.qkv
    k_rows = slice(96, 192)
    model.eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items() if 'visadapt' not in k.split('.')}
    with torch.no_grad():
        ref = model(x)
        visadapt.merge(model)
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
        visadapt.unmerge(model)
    visadapt.save_adapter(model, tmp_path / 'a')
    fresh = timm.create_model('vit_tiny_patch16_224', num_classes=4, **TINY_VIT)
    fresh.load_state_dict(base_state)
    visadapt.load_adapter(fresh, tmp_path / 'a')
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), ref)
        # the k slice is never adapted
        merged = qkv.weight.clone()
        visadapt.merge(model)
        torch.testing.assert_close(qkv.weight[k_rows], merged[k_rows], rtol=0, atol=0)


# ---- the classification trainer ----------------------------------------------------------------------------------
def _cli(tmp_path, *extra):
    return ['--dataset', 'digits', '--img-size', '32', '--model', 'convnext_atto', '--adapter',
            '{"method": "FLoRA", "scale": 1.0}', '--rank', '4', '--train-size', '320', '--epochs', '2', '-b', '32',
            '--opt', 'adamw', '--lr', '3e-3', '--no-aug', '--smoothing', '0', '--seed', '0', '--threads', '1',
            '-j', '0', '--output', str(tmp_path), '--experiment', 'run', *extra]


def _evaluate(model, args, dataset):
    from timm.data import resolve_data_config
    config = resolve_data_config(vars(args), model=model)
    loader = classify.create_eval_loader(dataset, args, config, torch.device('cpu'))
    return classify.evaluate(model, loader, torch.device('cpu'))['top1'] / 100


def test_train_classifier_on_digits_rises_above_chance_and_resumes(tmp_path, monkeypatch, capsys):
    assert classify.main(_cli(tmp_path)) == 0
    out = capsys.readouterr().out
    assert 'accuracy    before' in out and 'trainable' in out and 'plain timm  timm.create_model(' in out
    run = tmp_path / 'run'
    metrics = json.loads((run / 'metrics.json').read_text())
    assert metrics['accuracy_before'] < 0.3 and metrics['accuracy_after'] > 0.5, metrics['accuracy_after']
    assert metrics['steps'] == 20 and len(metrics['eval']) == 3
    assert (run / 'curves.png').read_bytes()[:4] == b'\x89PNG'
    assert {'last.pth.tar', 'model_best.pth.tar', 'summary.csv', 'args.yaml'} <= {p.name for p in run.iterdir()}
    # the saved adapter + the base model (same seed: same random init) reproduce the trained model's accuracy
    args = classify.parse_args(_cli(tmp_path))
    _, test_set, _, _ = classify.create_datasets(args)
    torch.manual_seed(0)
    base = vt.create_model('convnext_atto', num_classes=10)
    visadapt.load_adapter(base, run / 'adapter')
    assert _evaluate(base, args, test_set) == pytest.approx(metrics['accuracy_after'], abs=1e-9)
    # and so does plain timm with the merged checkpoint (no visadapt in the model; folding may flip one image)
    plain = timm.create_model('convnext_atto', num_classes=10, checkpoint_path=str(run / classify.MERGED_NAME))
    assert _evaluate(plain, args, test_set) == pytest.approx(metrics['accuracy_after'], abs=1.01 / len(test_set))

    # interrupted in epoch 2 (update 14), resumed from the epoch-1 checkpoint: identical final metrics
    calls = {'n': 0}
    real_step = classify.train_step

    def interrupted(*a, **k):
        calls['n'] += 1
        if calls['n'] == 14:
            raise KeyboardInterrupt
        return real_step(*a, **k)
    monkeypatch.setattr(classify, 'train_step', interrupted)
    argv = _cli(tmp_path / 'b')
    assert classify.main(argv) == 130
    monkeypatch.setattr(classify, 'train_step', real_step)
    assert classify.main(argv + ['--resume', str(tmp_path / 'b' / 'run' / 'last.pth.tar')]) == 0
    assert 'resumed from' in capsys.readouterr().out
    resumed = json.loads((tmp_path / 'b' / 'run' / 'metrics.json').read_text())
    assert resumed['accuracy_after'] == metrics['accuracy_after']
    assert [e['accuracy'] for e in resumed['eval']] == [e['accuracy'] for e in metrics['eval']]


def test_train_classifier_workers_mixup_ema_amp_channels_last_then_resume(tmp_path, capsys):
    """timm's pieces together on CPU: 2 loader workers, mixup + cutmix (prefetcher collate, then batch Mixup),
    ModelEmaV3 over the adapted model, bf16 autocast, channels-last; then --resume continues to a second epoch."""
    argv = _cli(tmp_path, '--train-size', '128', '--eval-size', '64', '--epochs', '1', '-j', '2', '--mixup', '0.4',
                '--cutmix', '1.0', '--smoothing', '0.1', '--model-ema', '--model-ema-decay', '0.5', '--amp',
                '--channels-last', '--sched-on-updates', '--warmup-epochs', '0.5')
    args = classify.parse_args(argv)
    tr = classify.train(args)
    metrics = classify.finish(tr, 0.0)
    assert metrics['amp'] == 'torch.bfloat16' and metrics['steps'] == 4 and metrics['ema_accuracy_after'] is not None
    adapter = visadapt.adapter_state_dict(tr.model)
    ema = visadapt.adapter_state_dict(tr.ema.module)
    assert sorted(adapter) == sorted(ema) and all(v.dtype == torch.float32 for v in adapter.values())
    assert any(not torch.equal(adapter[k], ema[k]) for k in adapter)  # the EMA lags the model
    run = tmp_path / 'run'
    saved = read_adapter(run / 'adapter_ema')[1]  # the EMA's adapter is what adapter_ema/ holds
    assert sorted(saved) == sorted(ema) and all(torch.equal(saved[k], ema[k]) for k in ema)
    # a second epoch from the checkpoint, through the batch Mixup path (no prefetcher) this time
    resume = ['--resume', str(run / 'last.pth.tar'), '--epochs', '2', '--no-prefetcher']
    assert classify.main(argv + resume) == 0
    resumed = json.loads((run / 'metrics.json').read_text())
    assert resumed['steps'] == 8 and [e['epoch'] for e in resumed['eval']] == [0, 1, 2]
    assert 'resumed from' in capsys.readouterr().out
    # a checkpoint made with other settings is refused before anything is loaded
    assert classify.main(argv + ['--resume', str(run / 'last.pth.tar'), '--img-size', '48']) == 2
    assert "--img-size 32 (now 48)" in capsys.readouterr().err


def test_train_classifier_torchcompile_trains_the_compiled_model_like_eager(tmp_path):
    """--torchcompile (timm's flag) compiles the task's model before DDP; with the tracing-only 'eager' backend
    (inductor takes minutes here) the trained adapter equals an uncompiled run's, and the saved adapter is the
    eager module's (names unchanged)."""
    from torch._dynamo.eval_frame import OptimizedModule
    argv = ['--train-size', '64', '--eval-size', '32', '--epochs', '1']
    runs = {}
    for name, extra in (('eager', []), ('compiled', ['--torchcompile', 'eager'])):
        args = classify.parse_args(_cli(tmp_path / name, *argv, *extra))
        tr = classify.train(args)
        classify.finish(tr, 0.0)
        assert isinstance(tr.task.trainable_module, OptimizedModule) == (name == 'compiled')
        runs[name] = read_adapter(tmp_path / name / 'run' / 'adapter')[1]
    assert sorted(runs['eager']) == sorted(runs['compiled']) and not any('_orig_mod' in k for k in runs['compiled'])
    for key, value in runs['eager'].items():
        torch.testing.assert_close(runs['compiled'][key], value, rtol=1e-4, atol=1e-6)


def test_torchrun_two_processes_gloo_end_with_identical_models(tmp_path):
    """torchrun, 2 processes, gloo: DDP keeps the adapters identical, distribute_bn the statistics of a BatchNorm
    that trains (bn2 as a train module); frozen BatchNorms keep their (identical) statistics."""
    adapter = '{"method": "FLoRA", "scale": 1.0, "train_modules": ["bn2"]}'
    argv = _cli(tmp_path, '--model', 'efficientnet_lite0', '--adapter', adapter, '--rank', '2', '--train-size', '128',
                '--eval-size', '64', '--epochs', '1', '-j', '0')
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    script = os.path.join(os.path.dirname(__file__), '_timm_rank_dump.py')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(port), script,
           str(tmp_path), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from safetensors.torch import load_file
    ranks = [load_file(str(tmp_path / f'rank{r}.safetensors')) for r in (0, 1)]
    assert sorted(ranks[0]) == sorted(ranks[1]) and any('.visadapt.' in k for k in ranks[0])
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
    metrics = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert metrics['world_size'] == 2 and metrics['steps'] == 2  # 128 images / (32 x 2 processes)
    assert 'bn2' in metrics['config']['train_modules']


def test_train_classifier_errors_and_presets(tmp_path, monkeypatch, capsys):
    assert classify.main(_cli(tmp_path, '--adapter', 'nope')) == 2
    assert "unknown adapter method 'nope'" in capsys.readouterr().err
    assert classify.main(_cli(tmp_path, '--adapter', '{"method": "FLoRA",')) == 2
    assert 'is not valid JSON' in capsys.readouterr().err
    monkeypatch.setattr(classify, 'FASHION_MNIST_DIRS', (str(tmp_path / 'none'),))
    monkeypatch.delenv('FASHION_MNIST_DIR', raising=False)
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        classify.find_fashion_mnist()
    assert classify.main(_cli(tmp_path, '--resume', str(tmp_path / 'nope.pth.tar'))) == 2
    assert 'no such checkpoint' in capsys.readouterr().err
    for bad in (['--rank', '0'], ['--pretrained', 'weights.pth'], ['--dist-bn', 'x']):
        with pytest.raises(SystemExit):
            classify.parse_args(bad)
    assert classify.main(['--model', 'convnext_atto', '--pretrained', 'packaged', '--dataset', 'digits']) == 2
    assert "'packaged' is available for" in capsys.readouterr().err
    # a preset fills what the command line leaves out; --budget replaces the preset's rank
    demo = classify.parse_args(['--preset', 'demo', '--epochs', '1', '--budget', '1000'])
    assert (demo.epochs, demo.budget, demo.adapter_rank, demo.img_size, demo.pretrained) == (1, 1000, None, 64,
                                                                                              'packaged')


def test_fashion_mnist_and_image_folders_feed_timms_loader(tmp_path):
    args = classify.parse_args(['--dataset', 'fashion-mnist', '--train-size', '64', '--eval-size', '32', '-j', '0'])
    train_set, test_set, classes, name = classify.create_datasets(args)
    assert (len(train_set), len(test_set), len(classes), name) == (64, 32, 10, 'Fashion-MNIST')
    image, label = train_set[0]
    assert image.mode == 'RGB' and image.size == (28, 28) and 0 <= label <= 9
    assert float(np.array(image, dtype=np.float32).mean()) > 10  # real images, not zeros
    from timm.data import resolve_data_config
    config = resolve_data_config({'img_size': 40})
    x, y = next(iter(classify.create_eval_loader(test_set, args, config, torch.device('cpu'))))
    assert x.shape == (32, 3, 40, 40) and x.dtype == torch.float32 and y.shape == (32,)
    # an ImageFolder through timm's create_dataset: train/ + validation/, or one folder split 80/20
    from PIL import Image
    for split, n in (('train', 6), ('validation', 3)):
        for cls in ('cat', 'dog'):
            os.makedirs(tmp_path / 'split' / split / cls)
            for i in range(n):
                Image.new('RGB', (12, 12), (i * 20, 0, 0)).save(tmp_path / 'split' / split / cls / f'{i}.png')
    args = classify.parse_args(['--data-dir', str(tmp_path / 'split')])
    train_set, test_set, classes, _ = classify.create_datasets(args)
    assert (len(train_set), len(test_set), classes) == (12, 6, ['cat', 'dog'])
    args = classify.parse_args(['--data-dir', str(tmp_path / 'split' / 'train')])
    train_set, test_set, classes, _ = classify.create_datasets(args)
    assert (len(train_set), len(test_set)) == (9, 3) and not set(train_set.indices) & set(test_set.indices)
    with pytest.raises(ValueError, match='--data-dir, which is not set'):
        classify.create_datasets(classify.parse_args([]))
