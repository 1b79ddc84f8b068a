"""visadapt.integrations.peft_format: PEFT adapter directories in and out, checked against PEFT itself.

Every round trip compares outputs with ``PeftModel.from_pretrained`` on the same random-init base (a timm ConvNeXt
with 3×3 stride-2 stem convs, 2×2 stride-2 downsamples, 1×1 convs and a Linear head; a small timm ViT), with the
adapter weights moved away from their identity init, in fp32: equal within 1e-5 relative.
"""
from __future__ import annotations

import json
import os

import pytest
import timm
import torch
import torch.nn as nn
from peft import (
                  BOFTConfig,
                  IA3Config,
                  LoHaConfig,
                  LoKrConfig,
                  LoraConfig,
                  PeftModel,
                  PromptTuningConfig,
                  VeraConfig,
                  get_peft_model,
)
from safetensors.torch import load_file, save_file
from visadapt_testing import assert_unchanged, randomize_adapters, state_snapshot

import visadapt
from visadapt.core import is_adapter_key, iter_adapted
from visadapt.integrations.peft_format import load_peft_adapter, save_peft_adapter

TOL = 1e-5
CONVNEXT_CONVS = ['stem.0', 'stem.1', 'stages.1.downsample.1', 'stages.2.downsample.1', 'fc1', 'fc2']


def convnext() -> nn.Module:
    """convnext_atto with the tiered 3×3 stride-2 stem (random init): 3×3, 2×2 stride 2, 7×7 depthwise, 1×1 convs.

    Layer scale starts at 1 (timm's 1e-6 would hide every update inside the blocks from the output).
    """
    torch.manual_seed(0)
    return timm.create_model('convnext_atto', num_classes=5, stem_type='overlap_tiered', ls_init_value=1.0).eval()


def vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', num_classes=5, img_size=32, patch_size=8, depth=2,
                             **kwargs).eval()


INPUTS = {convnext: (2, 3, 64, 64), vit: (2, 3, 32, 32)}


def _input(make) -> torch.Tensor:
    return torch.randn(*INPUTS[make], generator=torch.Generator().manual_seed(3))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def base_keys(model: nn.Module) -> list:
    return [k for k in model.state_dict() if not is_adapter_key(k)]


@torch.no_grad()
def peft_adapter_dir(tmp_path, make, config, **model_kwargs) -> str:
    """Train nothing, but move every trainable PEFT tensor (adapter and modules_to_save) off its init, and save."""
    model = get_peft_model(make(**model_kwargs), config)
    gen = torch.Generator().manual_seed(1)
    for _, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    path = str(tmp_path / 'peft')
    model.save_pretrained(path)
    return path


@torch.no_grad()
def peft_output(make, path, x, **model_kwargs) -> torch.Tensor:
    return PeftModel.from_pretrained(make(**model_kwargs), path).eval()(x)


# ---- PEFT -> visadapt ------------------------------------------------------------------------------------------------
READ_CASES = {
    'convnext-lora-patterns': (convnext, dict(
        r=4, lora_alpha=8, target_modules=CONVNEXT_CONVS + ['head.fc'], modules_to_save=['stem.2'],
        rank_pattern={'stem.1': 6, 'head.fc': 2}, alpha_pattern={'fc2': 3}), {}, 'LoRA'),
    'convnext-dora-rslora': (convnext, dict(
        r=4, lora_alpha=6, target_modules=CONVNEXT_CONVS, use_dora=True, use_rslora=True, lora_dropout=0.1,
        modules_to_save=['head.fc']), {}, 'DoRA'),
    'vit-lora': (vit, dict(r=4, lora_alpha=4, target_modules=['qkv', 'proj', 'fc1', 'fc2'], modules_to_save=['head']),
                 {}, 'LoRA'),
    'vit-dora': (vit, dict(r=3, lora_alpha=5, target_modules=['qkv', 'fc2', 'patch_embed.proj'], use_dora=True),
                 {}, 'DoRA'),
}


@pytest.mark.parametrize('case', sorted(READ_CASES))
def test_peft_lora_loads_exactly(tmp_path, case):
    make, options, model_kwargs, method = READ_CASES[case]
    path = peft_adapter_dir(tmp_path, make, LoraConfig(**options), **model_kwargs)
    x = _input(make)
    ref = peft_output(make, path, x)
    model = make()
    keys = base_keys(model)
    with torch.no_grad():
        assert relative_error(model(x), ref) > 1e-3     # the update is visible in the output
    report = load_peft_adapter(model, path)
    assert report.adapters == {'default': method}
    assert report.train_modules == options.get('modules_to_save', [])
    assert base_keys(model) == keys          # base parameter names unchanged
    with torch.no_grad():
        assert relative_error(model(x), ref) < TOL
    if options.get('lora_dropout'):
        assert any('dropout p=0.1 dropped' in n for n in report.notes)


def test_peft_lora_reloaded_after_visadapt_save(tmp_path):
    """PEFT -> visadapt -> visadapt's own checkpoint -> a fresh model: still PEFT's outputs."""
    path = peft_adapter_dir(tmp_path, vit, LoraConfig(r=4, target_modules=['qkv', 'fc1'], modules_to_save=['head']))
    x = _input(vit)
    model = vit()
    load_peft_adapter(model, path)
    visadapt.save_adapter(model, tmp_path / 'visadapt')
    fresh = vit()
    visadapt.load_adapter(fresh, tmp_path / 'visadapt')
    with torch.no_grad():
        assert relative_error(fresh(x), peft_output(vit, path, x)) < TOL


def test_peft_ia3_feedforward_and_bias_free_layers_load_exactly(tmp_path):
    """Feed-forward modules (input scaled) become SSL, bias-free output-scaled layers (IA)³: no reparametrization."""
    config = IA3Config(target_modules=['qkv', 'fc2', 'patch_embed.proj'], feedforward_modules=['fc2', 'patch_embed.proj'])
    path = peft_adapter_dir(tmp_path, vit, config, qkv_bias=False)
    x = _input(vit)
    model = vit(qkv_bias=False)
    report = load_peft_adapter(model, path)
    assert report.adapters == {'default': 'IA3', 'default_ff': 'SSL'}
    with torch.no_grad():
        assert relative_error(model(x), peft_output(vit, path, x, qkv_bias=False)) < TOL


# (IA)³ on biased layers: ViT Linears; ConvNeXt convs with a regex feedforward_modules (PEFT full-matches it) that
# makes one depthwise conv feed-forward (input scaled) and leaves the others output-scaled
REPARAMETRIZED = {
    'ia3-vit': (vit, lambda: IA3Config(target_modules=['proj', 'fc1', 'fc2'], feedforward_modules=['fc2']),
                r'bias.*reparametrize=True', {'default': 'IA3', 'default_ff': 'SSL', 'default_bias': 'BitFit'}),
    'ia3-convnext': (convnext, lambda: IA3Config(
        target_modules=['stem.1', 'stages.1.downsample.1', 'conv_dw', 'fc1', 'fc2'],
        feedforward_modules=r'.*(mlp\.fc2|stages\.0\.blocks\.0\.conv_dw)'),
        r'bias.*reparametrize=True', {'default': 'IA3', 'default_ff': 'SSL', 'default_bias': 'BitFit'}),
    'vera-vit': (vit, lambda: VeraConfig(r=8, target_modules=['qkv', 'fc1', 'fc2'], projection_prng_key=5),
                 r'projection_prng_key=5.*reparametrize=True', {'default': 'LoRA'}),
}


@pytest.mark.parametrize('case', sorted(REPARAMETRIZED))
def test_reparametrized_loads_need_the_flag_then_match_peft(tmp_path, case):
    """Same outputs, other trainable tensors: refused (model unchanged) unless reparametrize=True."""
    make, config, message, adapters = REPARAMETRIZED[case]
    path = peft_adapter_dir(tmp_path, make, config())
    x = _input(make)
    model = make()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_peft_adapter(model, path)
    assert_unchanged(model, before)
    report = load_peft_adapter(model, path, reparametrize=True)
    assert report.adapters == adapters
    assert any(n.startswith('reparametrized') for n in report.notes)
    with torch.no_grad():
        assert relative_error(model(x), peft_output(make, path, x)) < TOL


# ---- visadapt -> PEFT ------------------------------------------------------------------------------------------------
CONVNEXT_LAYERS = ['stem.0', 'stem.1', '*.downsample.1', '*.mlp.fc1', '*.mlp.fc2']
WRITE_CASES = {
    'convnext-LoRA': (convnext, dict(method='LoRA', r=4, alpha=8, include=CONVNEXT_LAYERS + ['head.fc'],
                                     rank_pattern={'stem.1': 6})),
    'convnext-DoRA': (convnext, dict(method='DoRA', r=4, include=CONVNEXT_LAYERS, train_modules=['head.fc'])),
    'convnext-FLoRA': (convnext, dict(method='FLoRA', r=4, r3=2, scale=2.0, include=CONVNEXT_LAYERS + ['head.fc'])),
    'convnext-MoSLoRA': (convnext, dict(method='MoSLoRA', r=4, include=CONVNEXT_LAYERS)),
    'convnext-MELoRA': (convnext, dict(method='MELoRA', r=2, n=2, include=['*.mlp.fc1', '*.mlp.fc2', 'head.fc'])),
    'convnext-VeRA': (convnext, dict(method='VeRA', r=16, include=CONVNEXT_LAYERS)),
    'convnext-SVFT': (convnext, dict(method='SVFT', include=['stem.1', '*.downsample.1', 'head.fc'])),
    'vit-LoRA-qv-slices': (vit, dict(method='LoRA', r=4, include=['qkv', 'proj', 'fc1'], slices={'qkv': ['q', 'v']},
                                     train_modules=['head'])),
    'vit-SeRA': (vit, dict(method='SeRA', r=4, include=['qkv', 'fc1', 'fc2'], slices={'qkv': ['q', 'v']})),
    'vit-FLoRA': (vit, dict(method='FLoRA', r=4, include=['qkv', 'fc2', 'patch_embed.proj'])),
    'vit-DoRA': (vit, dict(method='DoRA', r=4, include=['qkv', 'proj', 'fc1', 'fc2'])),
    'vit-SVFT': (vit, dict(method='SVFT', include=['fc1', 'proj'])),
}


@pytest.mark.parametrize('case', sorted(WRITE_CASES))
def test_visadapt_adapter_exports_to_peft_exactly(tmp_path, case):
    make, spec = WRITE_CASES[case]
    config = visadapt.parse_adapter_spec(spec)
    model = make()
    visadapt.inject(model, config)
    randomize_adapters(model, std=0.05)
    if config.train_modules:
        with torch.no_grad():
            model.get_submodule(config.train_modules[0]).weight.add_(0.1)
    x = _input(make)
    with torch.no_grad(), visadapt.adapters_disabled(model):
        base_out = model(x)
    with torch.no_grad():
        out = model(x)
    assert relative_error(base_out, out) > 1e-3          # the update is visible in the output
    path = str(tmp_path / 'peft')
    written = save_peft_adapter(model, path)
    assert written['use_dora'] == (config.method == 'DoRA')
    assert written['modules_to_save'] == (config.train_modules or None)
    with torch.no_grad():
        assert relative_error(peft_output(make, path, x), out) < TOL
    back = make()                       # and PEFT's directory read back by visadapt
    load_peft_adapter(back, path)
    with torch.no_grad():
        assert relative_error(back(x), out) < TOL


def test_conv_flora_spatial_core_exports_as_conv_lora_chain(tmp_path):
    """A 3×3 conv's FLoRA Tucker core is folded into PEFT's k×k lora_A (R_out, in, 3, 3); lora_B stays 1×1."""
    model = convnext()
    visadapt.inject(model, visadapt.FLoRAConfig(r=4, r3=2, include=['stem.1']))
    randomize_adapters(model)
    save_peft_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / 'adapter_model.safetensors'))
    assert tuple(tensors['base_model.model.stem.1.lora_A.weight'].shape) == (4, 24, 3, 3)
    assert tuple(tensors['base_model.model.stem.1.lora_B.weight'].shape) == (40, 4, 1, 1)


class Clash(nn.Module):
    """A root-level ``fc`` whose name is also the dotted suffix of ``inner.fc``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.inner = nn.Sequential()
        self.inner.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.inner(self.fc(x))


def test_name_clash_written_as_exact_regex_and_read_back(tmp_path):
    torch.manual_seed(0)
    make = Clash
    model = make()
    visadapt.inject(model, visadapt.LoRAConfig(r=2, include=['fc'], exclude=['inner.fc']))
    randomize_adapters(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        out = model(x)
    written = save_peft_adapter(model, tmp_path)
    assert written['target_modules'] == 'fc'       # a full-match regex: a list entry 'fc' would take inner.fc too
    torch.manual_seed(0)
    with torch.no_grad():
        assert relative_error(PeftModel.from_pretrained(make(), str(tmp_path))(x), out) < TOL
    torch.manual_seed(0)
    back = make()
    load_peft_adapter(back, tmp_path)
    assert [n for n, _ in iter_adapted(back)] == ['fc']
    with torch.no_grad():
        assert relative_error(back(x), out) < TOL


# ---- refused cases ---------------------------------------------------------------------------------------------------
EXPORT_REFUSALS = {
    'IA3': (dict(method='IA3', include=['qkv']), r'IA3 has no exact low-rank'),
    'grouped conv': (dict(method='LoRA', r=4, include=['stages.0.blocks.0.conv_dw']), r'grouped conv \(groups=40\)'),
    'conv reshape form': (dict(method='LoRA', r=4, conv_form='reshape', include=['stem.1']), r'reshape form'),
    'DoRA slices': (dict(method='DoRA', r=4, include=['qkv'], slices=['q', 'v']), r'DoRA .*cannot be combined'),
    'whole model': (dict(method='FullFinetune'), r'adapts no layer'),
}


@pytest.mark.parametrize('case', sorted(EXPORT_REFUSALS))
def test_export_refusals_name_the_reason_and_write_nothing(tmp_path, case):
    spec, message = EXPORT_REFUSALS[case]
    model = convnext() if 'conv' in case else vit()
    visadapt.inject(model, visadapt.parse_adapter_spec(spec))
    with pytest.raises(ValueError, match=message):
        save_peft_adapter(model, tmp_path / 'out')
    assert not os.path.exists(tmp_path / 'out')


def _edit_config(path: str, **changes) -> None:
    cfg_path = os.path.join(path, 'adapter_config.json')
    with open(cfg_path) as f:
        data = json.load(f)
    data.update(changes)
    with open(cfg_path, 'w') as f:
        json.dump(data, f)


READ_REFUSALS = {
    'LoHa': (lambda: LoHaConfig(r=4, target_modules=['fc1']), {}, r"'LOHA' cannot be loaded.*Hadamard"),
    'LoKr': (lambda: LoKrConfig(r=4, target_modules=['fc1']), {}, r"'LOKR' cannot be loaded.*Kronecker"),
    'BOFT': (lambda: BOFTConfig(boft_block_size=4, target_modules=['fc1']), {}, r"'BOFT' cannot be loaded"),
    'lora_bias': (lambda: LoraConfig(r=4, target_modules=['fc1'], lora_bias=True), {}, r'option lora_bias=True'),
    'bias=all': (lambda: LoraConfig(r=4, target_modules=['fc1'], bias='all'), {}, r"option bias='all'"),
    'pissa': (lambda: LoraConfig(r=4, target_modules=['fc1']), {'init_lora_weights': 'pissa'},
              r"init_lora_weights='pissa' is not mapped: PiSSA.*rewrite the base weights"),
    'grouped conv': (lambda: LoraConfig(r=40, target_modules=['stages.0.blocks.0.conv_dw']), {},
                     r"'stages.0.blocks.0.conv_dw'.*grouped conv"),
}


@pytest.mark.parametrize('case', sorted(READ_REFUSALS))
def test_read_refusals_name_what_does_not_map(tmp_path, case):
    make_config, edits, message = READ_REFUSALS[case]
    path = peft_adapter_dir(tmp_path, convnext, make_config())
    if edits:
        _edit_config(path, **edits)
    model = convnext()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_peft_adapter(model, path)
    assert_unchanged(model, before)


def test_prompt_learning_adapter_refused(tmp_path):
    PromptTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=4, token_dim=8, num_transformer_submodules=1,
                       num_attention_heads=2, num_layers=2).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"'PROMPT_TUNING' cannot be loaded.*prompt-learning"):
        load_peft_adapter(vit(), tmp_path)


@pytest.mark.parametrize('bad', ['nan', 'shape'])
def test_bad_tensor_leaves_model_unchanged(tmp_path, bad):
    """All or nothing: a NaN or a wrong shape in the last adapter built (the SSL part) undoes the first (IA3)."""
    path = peft_adapter_dir(tmp_path, vit, IA3Config(target_modules=['qkv', 'fc2'], feedforward_modules=['fc2']),
                            qkv_bias=False)
    weights = os.path.join(path, 'adapter_model.safetensors')
    tensors = load_file(weights)
    key = 'base_model.model.blocks.1.mlp.fc2.ia3_l'
    tensors[key] = tensors[key].clone().fill_(float('nan')) if bad == 'nan' else tensors[key][:, :-1].clone()
    save_file(tensors, weights)
    model = vit(qkv_bias=False)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match='NaN' if bad == 'nan' else 'shape'):
        load_peft_adapter(model, path)
    assert_unchanged(model, before)


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize('layer', ['attn', 'attn.out_proj'])
def test_multihead_attention_refused_both_ways(tmp_path, layer):
    """PEFT's nn.MultiheadAttention LoRA has its own layout, and a LoRA on its out_proj as a plain Linear is bypassed
    by the attention's forward (it reads out_proj.weight directly): neither is converted."""
    torch.manual_seed(0)
    model = WithAttention()
    visadapt.inject(model, visadapt.LoRAConfig(r=2, include=[layer]))
    with pytest.raises(ValueError, match=f"layer '{layer}'.*nn.MultiheadAttention"):
        save_peft_adapter(model, tmp_path / 'out')
    path = peft_adapter_dir(tmp_path, WithAttention, LoraConfig(r=2, target_modules=[layer]))
    torch.manual_seed(0)
    fresh = WithAttention()
    before = state_snapshot(fresh)
    with pytest.raises(ValueError, match=f"layer '{layer}'.*nn.MultiheadAttention"):
        load_peft_adapter(fresh, path)
    assert_unchanged(fresh, before)
