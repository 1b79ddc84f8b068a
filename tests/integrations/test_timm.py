"""visadapt.integrations.timm_models (wrapping, presets, offline weights), visadapt.core.budget and the classification tool."""
from __future__ import annotations

import json
import os

import pytest
import timm
import torch
import torch.nn as nn

import visadapt
import visadapt.integrations.timm_models as vt
from visadapt.apps import train_classifier as classify
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


# ---- the classification tool -----------------------------------------------------------------------------------------
def _cli(tmp_path, *extra):
    return ['--data', 'digits', '--image-size', '32', '--model', 'convnext_atto', '--pretrained', 'none',
            '--method', 'FLoRA', '--rank', '4', '--method-args', '{"scale": 1.0}', '--train-size', '320',
            '--epochs', '2', '--batch-size', '32', '--lr', '3e-3', '--no-progress', '--threads', '1',
            '--output-dir', str(tmp_path / 'run'), *extra]


def test_train_classifier_on_digits_rises_above_chance_and_resumes(tmp_path, monkeypatch, capsys):
    assert classify.main(_cli(tmp_path)) == 0
    out = capsys.readouterr().out
    assert 'accuracy    before' in out and 'trainable' in out
    metrics = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert metrics['accuracy_before'] < 0.3 and metrics['accuracy_after'] > 0.5, metrics['accuracy_after']
    assert metrics['steps'] == 20 and len(metrics['eval']) == 3
    assert (tmp_path / 'run' / 'curves.png').read_bytes()[:4] == b'\x89PNG'
    # the saved adapter + the base model (same seed: same random init) reproduce the trained model's accuracy
    torch.manual_seed(0)
    base = vt.create_model('convnext_atto', num_classes=10)
    visadapt.load_adapter(base, tmp_path / 'run' / 'adapter')
    data = classify.load_digits(32)
    cfg = base.pretrained_cfg
    acc, _ = classify.evaluate(base, classify.Normalize(cfg['mean'], cfg['std']), data.test, 128,
                               torch.device('cpu'), None)
    assert acc == pytest.approx(metrics['accuracy_after'], abs=1e-9)

    # interrupted after step 13 (checkpoint at step 10), resumed: identical final metrics
    calls = {'n': 0}
    real_fetch = classify._fetch

    def crash(split, idx):
        if isinstance(split, tuple) and len(idx) == 32 and len(split[1]) == 320:
            calls['n'] += 1
            if calls['n'] == 14:
                raise KeyboardInterrupt
        return real_fetch(split, idx)
    monkeypatch.setattr(classify, '_fetch', crash)
    args2 = _cli(tmp_path / 'b', '--ckpt-every', '5')
    with pytest.raises(KeyboardInterrupt):
        classify.main(args2)
    monkeypatch.setattr(classify, '_fetch', real_fetch)
    assert classify.main(args2 + ['--resume']) == 0
    resumed = json.loads((tmp_path / 'b' / 'run' / 'metrics.json').read_text())
    assert resumed['accuracy_after'] == metrics['accuracy_after']
    assert [e['accuracy'] for e in resumed['eval']] == [e['accuracy'] for e in metrics['eval']]


def test_train_classifier_errors(tmp_path, monkeypatch, capsys):
    assert classify.main(_cli(tmp_path, '--method', 'nope')) == 2
    assert "unknown adapter method 'nope'" in capsys.readouterr().err
    monkeypatch.setattr(classify, 'FASHION_MNIST_DIRS', (str(tmp_path / 'none'),))
    monkeypatch.delenv('FASHION_MNIST_DIR', raising=False)
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        classify.load_fashion_mnist(32)
    assert classify.main(_cli(tmp_path, '--resume')) == 2
    assert 'no checkpoint' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        classify.parse_args(['--rank', '0'])


def test_fashion_mnist_loader_reads_the_debian_package():
    data = classify.load_fashion_mnist(40, train_size=64, eval_size=32)
    assert data.train[0].shape == (64, 1, 40, 40) and data.train[0].dtype == torch.uint8
    assert data.test[1].shape == (32,) and len(data.classes) == 10
    assert 0 <= int(data.train[1].min()) and int(data.train[1].max()) <= 9
    assert float(data.train[0].float().mean()) > 10  # real images, not zeros
