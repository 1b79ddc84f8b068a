"""diffusers integration: SDXL style tuning on a tiny random-init SDXL pipeline and the real openclipart set.

The pipeline is SDXL's architecture with small channels (tools/make_tiny_sdxl.py), saved to a temporary directory
and read back through ``--pretrained_model_name_or_path``. Exports are checked the way their loaders read them:
LyCORIS' own module builder (``lycoris.modules.get_module``/``make_module`` + ``merge_to``, what its kohya loader
does per key), diffusers' ``load_lora_weights``, and ``UNet2DConditionModel.from_pretrained`` for merged weights.
"""
from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
import torch.nn as nn
from visadapt_testing import load_tool as _tool  # noqa: E402

import visadapt
from visadapt.apps import train_sdxl  # noqa: E402
from visadapt.integrations import diffusers_pipelines as vd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='module')
def tiny_sdxl(tmp_path_factory) -> str:
    torch.manual_seed(0)
    return _tool('make_tiny_sdxl').make_tiny_sdxl(str(tmp_path_factory.mktemp('tiny-sdxl')))


@pytest.fixture(scope='module')
def clipart(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp('clipart'))
    rows = _tool('make_clipart_styleset').make_styleset('food/fruit', out, resolution=64, max_images=4)
    assert len(rows) == 4 and all(r['text'].endswith(', clipart style') for r in rows)
    return out


def _train_args(model: str, data: str, out: str, steps: int, *extra: str):
    return ['--pretrained_model_name_or_path', model, '--train_data_dir', data, '--output_dir', out,
            '--resolution', '32', '--center_crop', '--train_batch_size', '2', '--max_train_samples', '2',
            '--max_train_steps', str(steps), '--learning_rate', '1e-2', '--checkpointing_steps', '10', '--seed', '0',
            '--conv_rank', '4', '--attn_rank', '4', '--train_text_encoder', '--eval_fixed_batch', *extra]


@pytest.fixture(scope='module')
def trained(tiny_sdxl, clipart, tmp_path_factory):
    """20 steps on a fixed batch of 4 real clip-art images, with validation and every export."""
    out = str(tmp_path_factory.mktemp('run'))
    metrics = train_sdxl.main(_train_args(
        tiny_sdxl, clipart, out, 20, '--validation_prompt', 'an apple, clipart style', '--num_validation_images', '1',
        '--num_inference_steps', '2', '--export', 'kohya', 'diffusers', 'merged'))
    return out, metrics


def _unet_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(0)
    return dict(sample=torch.randn(batch, 4, 32, 32, generator=g), timestep=torch.tensor([10, 700][:batch]),
                encoder_hidden_states=torch.randn(batch, 77, 64, generator=g),
                added_cond_kwargs=dict(text_embeds=torch.randn(batch, 32, generator=g),
                                       time_ids=torch.tensor([[64., 64., 0., 0., 64., 64.]] * batch)))


@torch.no_grad()
def _unet_out(unet) -> torch.Tensor:
    return unet(**_unet_inputs()).sample


@torch.no_grad()
def _text_out(encoder) -> torch.Tensor:
    ids = torch.tensor([[49406, 320, 3055, 267, 9289, 268, 794, 49407]])
    return encoder(ids, output_hidden_states=True).hidden_states[-2]


def _load_pipe(path: str):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- training ------------------------------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_writes_outputs(trained):
    out, metrics = trained
    assert metrics['steps'] == 20
    assert metrics['fixed_batch_loss_after'] < 0.9 * metrics['fixed_batch_loss_before'], metrics
    with open(os.path.join(out, 'loss_history.json')) as f:
        history = json.load(f)
    assert [s for s, _ in history] == list(range(1, 21))
    for name in ('loss_curve.png', 'validation/step-000000-0.png', 'validation/step-000020-0.png',
                 'checkpoint-10/adapter/unet/conv/adapter_model.safetensors', 'checkpoint-20/optimizer.bin',
                 'adapter/visadapt_pipeline.json', 'export/kohya.safetensors',
                 'export/diffusers_lora/pytorch_lora_weights.safetensors', 'export/merged_unet/config.json'):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, 'adapter', 'visadapt_pipeline.json')) as f:
        assert sorted(map(tuple, json.load(f)['adapters'])) == [
            ('text_encoder', 'attn'), ('text_encoder_2', 'attn'), ('unet', 'attn'), ('unet', 'conv')]
    import numpy as np
    from PIL import Image
    before = np.asarray(Image.open(os.path.join(out, 'validation/step-000000-0.png')))
    after = np.asarray(Image.open(os.path.join(out, 'validation/step-000020-0.png')))
    assert before.shape == after.shape == (32, 32, 3) and (before != after).any()  # same seed, so only the adapters changed the image


def test_resume_from_checkpoint_matches_the_uninterrupted_run(trained, tiny_sdxl, clipart, tmp_path):
    out, _ = trained
    resumed = str(tmp_path / 'resumed')
    os.makedirs(resumed)
    shutil.copytree(os.path.join(out, 'checkpoint-10'), os.path.join(resumed, 'checkpoint-10'))
    metrics = train_sdxl.main(_train_args(tiny_sdxl, clipart, resumed, 20, '--resume_from_checkpoint',
                                                         'latest'))
    assert metrics['steps'] == 20 and 'fixed_batch_loss_before' not in metrics
    with open(os.path.join(out, 'loss_history.json')) as f:
        full = json.load(f)
    with open(os.path.join(resumed, 'loss_history.json')) as f:
        again = json.load(f)
    assert again[:10] == full[:10] and [s for s, _ in again] == list(range(1, 21))
    from visadapt.core.io import read_adapter
    for component, name in (('unet', 'conv'), ('unet', 'attn'), ('text_encoder', 'attn')):
        _, a = read_adapter(os.path.join(out, 'adapter', component, name))
        _, b = read_adapter(os.path.join(resumed, 'adapter', component, name))
        for key in a:
            assert torch.equal(b[key], a[key]), f'{component}/{name} {key}'  # RNG, optimizer and data order restored


# ---- our format and the pipeline -----------------------------------------------------------------------------------
def test_pipeline_load_generate_unload(trained, tiny_sdxl):
    out, _ = trained
    pipe = _load_pipe(tiny_sdxl)
    base_unet = _unet_out(pipe.unet)

    def image():
        return pipe('an apple, clipart style', num_inference_steps=2, height=64, width=64, output_type='np',
                    generator=torch.Generator().manual_seed(0)).images[0]

    base = image()
    pairs = vd.load_into_pipeline(pipe, os.path.join(out, 'adapter'))
    assert len(pairs) == 4
    adapted = image()
    assert float(abs(adapted - base).max()) > 1e-3
    vd.unload_from_pipeline(pipe)
    assert not any(visadapt.adapter_names(getattr(pipe, c)) for c in vd.PIPELINE_COMPONENTS)
    assert torch.equal(_unet_out(pipe.unet), base_unet)
    assert (image() == base).all()
    with pytest.raises(FileNotFoundError, match='visadapt_pipeline.json'):
        vd.load_into_pipeline(pipe, tiny_sdxl)


@pytest.fixture(scope='module')
def adapted(trained, tiny_sdxl):
    """The tiny pipeline with the trained adapters, plus reference outputs of each component."""
    out, _ = trained
    pipe = _load_pipe(tiny_sdxl)
    vd.load_into_pipeline(pipe, os.path.join(out, 'adapter'))
    refs = {'unet': _unet_out(pipe.unet), 'text_encoder': _text_out(pipe.text_encoder),
            'text_encoder_2': _text_out(pipe.text_encoder_2)}
    return out, pipe, refs


def test_merged_unet_export_loads_with_diffusers_alone(adapted, tiny_sdxl):
    from diffusers import UNet2DConditionModel
    out, pipe, refs = adapted
    merged = UNet2DConditionModel.from_pretrained(os.path.join(out, 'export', 'merged_unet'))
    assert not any('visadapt' in k for k in merged.state_dict())
    torch.testing.assert_close(_unet_out(merged), refs['unet'], rtol=1e-4, atol=1e-4)
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder='unet')
    assert not torch.allclose(_unet_out(base), refs['unet'], atol=1e-3)  # the merge did change the weights
    with visadapt.adapters_disabled(pipe.unet):  # saving did not touch the adapted model's own weights
        torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(base), rtol=0, atol=0)


# ---- kohya / LyCORIS -----------------------------------------------------------------------------------------------
def _lycoris_merge(model: nn.Module, state: dict, prefix: str) -> dict:
    """What LyCORIS' kohya loader does per key: build the module from the tensors and merge it into the layer."""
    from lycoris.modules import get_module, make_module
    names = {k.split('.')[0] for k in state if k.startswith(prefix + '_')}
    kinds = {}
    for layer_name, module in model.named_modules():
        key = f'{prefix}_{layer_name}'.replace('.', '_')
        if key in names:
            algo, params = get_module(state, key)
            lyco = make_module(algo, params, key, module)
            lyco.merge_to(1.0)
            kind = f'{type(lyco).__name__}{"-tucker" if getattr(lyco, "tucker", False) else ""}'
            kinds[kind] = kinds.get(kind, 0) + 1
            names.discard(key)
    assert not names, f'keys that match no module: {sorted(names)[:4]}'
    return kinds


def test_kohya_export_is_exact_in_lycoris(adapted, tiny_sdxl):
    from safetensors.torch import load_file
    out, pipe, refs = adapted
    state = load_file(os.path.join(out, 'export', 'kohya.safetensors'))
    fresh = _load_pipe(tiny_sdxl)
    kinds = _lycoris_merge(fresh.unet, state, 'lora_unet')
    n_convs = sum(isinstance(m, nn.Conv2d) for m in fresh.unet.modules())
    n_kxk = sum(isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) for m in fresh.unet.modules())
    # every k×k conv is a Tucker LoCon, 1×1 convs and attention projections plain LoCon/LoRA
    n_attn = len(visadapt.core.tuner.get_injection(pipe.unet, 'attn').layers)
    assert kinds == {'LoConModule-tucker': n_kxk, 'LoConModule': n_convs - n_kxk + n_attn}, kinds
    assert state['lora_unet_conv_in.lora_mid.weight'].shape == (4, 4, 3, 3)
    assert state['lora_unet_conv_in.lora_down.weight'].shape == (4, 4, 1, 1)  # r_in = min(4 channels, r=4)
    torch.testing.assert_close(_unet_out(fresh.unet), refs['unet'], rtol=1e-4, atol=1e-4)
    for i, component in enumerate(('text_encoder', 'text_encoder_2')):
        _lycoris_merge(getattr(fresh, component), state, f'lora_te{i + 1}')
        torch.testing.assert_close(_text_out(getattr(fresh, component)), refs[component], rtol=1e-4, atol=1e-5)


def test_kohya_tucker_padding_and_stacking_rebuild_exactly():
    """FLoRA with r_out != r_in (zero-padded square mid) and two adapters on one layer (stacked), per LyCORIS."""
    from lycoris.functional.locon import diff_weight
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, stride=2), nn.Linear(8, 12))
    visadapt.inject(model, visadapt.FLoRAConfig(r=6, r3=2, scale=3.0, target_types=['Conv2d']), name='conv')
    visadapt.inject(model, visadapt.LoRAConfig(r=2, alpha=4.0, include=['1']), name='extra')   # stacked on conv 1
    visadapt.inject(model, visadapt.FLoRAConfig(r=5, scale=0.5, target_types=['Linear']), name='lin')
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    state = vd.kohya_state_dict({'unet': model})
    for i, layer in enumerate(model):
        key = f'lora_unet_{i}'
        down, up, mid = (state.get(f'{key}.lora_{k}.weight') for k in ('down', 'up', 'mid'))
        gamma = float(state[f'{key}.alpha']) / down.shape[0]  # LyCORIS: scale = alpha / lora_dim
        rebuilt = diff_weight(down, up, mid, gamma=gamma, backend='torch')
        expected = sum(a.delta_weight() for a in layer.visadapt.values())
        torch.testing.assert_close(rebuilt.reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)
    assert state['lora_unet_0.lora_mid.weight'].shape == (6, 6, 3, 3)  # r_in = 3 padded to r_out = 6
    assert state['lora_unet_1.lora_down.weight'].shape == (6 + 2, 16, 3, 3)  # FLoRA chain (6) + LoRA (2): no mid
    assert 'lora_unet_1.lora_mid.weight' not in state


@pytest.mark.parametrize('method,fields', [('FLoRA', dict(r=4, scale=2.0)), ('LoRA', dict(r=4, alpha=8.0)),
                                           ('MoSLoRA', dict(r=4)), ('SeRA', dict(r=4, alpha=2.0)),
                                           ('SVFT', dict()), ('VeRA', dict()), ('MELoRA', dict(r=2, n=2)),
                                           ('IA3', dict())])
def test_every_linear_method_exports_exactly(method, fields):
    """Methods with a factored form (``Adapter.factor_form``) as lora_down/lora_up, others ((IA)³ here) as LyCORIS'
    full ``diff``; ΔW rebuilt exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    visadapt.inject(model, visadapt.get_config_class(method)(**fields))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    state = vd.kohya_state_dict({'unet': model})
    for i in (0, 2):
        key, expected = f'lora_unet_{i}', model[i].delta_weight('default')
        if f'{key}.diff' in state:
            rebuilt = state[f'{key}.diff']
        else:
            rebuilt = state[f'{key}.lora_up.weight'] @ state[f'{key}.lora_down.weight'] * (
                float(state[f'{key}.alpha']) / state[f'{key}.lora_down.weight'].shape[0])
        torch.testing.assert_close(rebuilt, expected, rtol=1e-5, atol=1e-5)
    assert ('lora_unet_0.diff' in state) == (method == 'IA3')
    if method == 'IA3':
        with pytest.raises(ValueError, match='cannot be written as a diffusers LoRA'):
            vd.diffusers_lora_state_dict({'unet': model})


# ---- diffusers load_lora_weights -----------------------------------------------------------------------------------
def test_diffusers_lora_export_loads_with_load_lora_weights(adapted, tiny_sdxl):
    out, _, refs = adapted
    fresh = _load_pipe(tiny_sdxl)
    fresh.load_lora_weights(os.path.join(out, 'export', 'diffusers_lora'))
    torch.testing.assert_close(_unet_out(fresh.unet), refs['unet'], rtol=1e-4, atol=1e-4)
    for component in ('text_encoder', 'text_encoder_2'):
        torch.testing.assert_close(_text_out(getattr(fresh, component)), refs[component], rtol=1e-4, atol=1e-5)
    fresh.unload_lora_weights()
    assert not torch.allclose(_unet_out(fresh.unet), refs['unet'], atol=1e-3)


def test_attention_only_lora_export_loads_into_the_unet(tiny_sdxl):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder='unet')
    base = copy.deepcopy(unet)
    visadapt.inject(unet, vd.target_config(unet, 'attention', 'SeRA', r=4, alpha=2.0), name='attn')
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    state = vd.diffusers_lora_state_dict({'unet': unet})
    n_attn = sum(n.split('.')[-1] in ('to_q', 'to_k', 'to_v') or n.endswith('to_out.0') for n, _ in unet.named_modules())
    assert len(state) == 2 * n_attn  # lora_A and lora_B of every attention projection
    base.load_lora_adapter(state, prefix='unet', adapter_name='sera')
    torch.testing.assert_close(_unet_out(base), _unet_out(unet), rtol=1e-4, atol=1e-4)


# ---- targets, budgets, errors --------------------------------------------------------------------------------------
def test_presets_select_every_conv_and_the_attention(tiny_sdxl):
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder='unet')
    convs = {n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d)}
    report = visadapt.inject(unet, vd.target_config(unet, 'conv', 'FLoRA', r=4), name='conv')
    assert set(report.layers) == convs and {'conv_in', 'conv_out', 'down_blocks.0.downsamplers.0.conv'} <= convs
    report = visadapt.inject(unet, vd.target_config(unet, 'attention', 'LoRA', r=2), name='attn')
    attn = {n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and
            (n.split('.')[-1] in ('to_q', 'to_k', 'to_v') or n.endswith('to_out.0'))}
    assert set(report.layers) == attn and len(attn) == 96  # 12 transformer blocks x 2 attentions x 4
    with pytest.raises(ValueError, match="preset 'mlp' is not valid"):
        vd.target_config(unet, 'mlp')


def test_budget_at_most_meets_the_budget(tiny_sdxl):
    from diffusers import UNet2DConditionModel

    from visadapt.core.budget import count_adapter_params, match_budget
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder='unet')
    flora = vd.target_config(unet, 'conv', 'FLoRA', r=8, r3=2)
    budget = count_adapter_params(unet, flora)
    lora = match_budget(unet, vd.target_config(unet, 'conv', 'LoRA', r=1), budget, at_most=True).config
    import dataclasses
    assert count_adapter_params(unet, lora) <= budget
    assert count_adapter_params(unet, dataclasses.replace(lora, r=lora.r + 1)) > budget
    report = visadapt.inject(unet, flora)
    assert report.adapter_params == budget  # the meta-device count equals the real one
    with pytest.raises(ValueError, match='too small'):
        match_budget(unet, flora, 10, at_most=True)


def test_bf16_frozen_weights_fp32_adapters_under_autocast(tiny_sdxl):
    """The mixed-precision setting of the training tool: bf16 UNet, fp32 FLoRA/SeRA adapters, autocast forward."""
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder='unet').to(torch.bfloat16)
    visadapt.inject(unet, vd.target_config(unet, 'conv', 'FLoRA', r=4, forward_path='weight'), name='conv')
    visadapt.inject(unet, vd.target_config(unet, 'attention', 'SeRA', r=4), name='attn')
    inputs = _unet_inputs()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = unet(**inputs).sample.float().pow(2).mean()
    loss.backward()
    trainable = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for _, p in trainable)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)
    assert all(p.dtype == torch.bfloat16 for n, p in unet.named_parameters() if not p.requires_grad)
