"""q/k/v slice targeting on fused qkv Linears (timm ViT) and on nn.MultiheadAttention (open_clip towers).

Each chosen slice gets its own update (SVFT: the SVD of that slice), merge/unmerge and save/load work per slice, the
untouched slices stay bit-exact, and ViT-B/16's q, v counts match the SVFT and SeRA papers' formulas.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from visadapt_testing import adapter_params, assert_unchanged, method_config, randomize_adapters, state_snapshot

import visadapt
from visadapt.core.layer import iter_adapted
from visadapt.core.site import base_weight
from visadapt.core.slices import SlicedAdapter
from visadapt.methods.svft import svft_bases, svft_num_params

CONFIGS = {
    'SVFT': lambda **kw: visadapt.SVFTConfig(pattern='banded', off_diag=1, **kw),
    'SeRA': lambda **kw: visadapt.SeRAConfig(r=8, split=4, alpha=2.0, **kw),
    'LoRA': lambda **kw: visadapt.LoRAConfig(r=4, **kw),
    'DoRA': lambda **kw: visadapt.DoRAConfig(r=4, **kw),
}


def tiny_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5).eval()


class TinyTower(nn.Module):
    """open_clip's text/vision tower layout: ResidualAttentionBlocks with nn.MultiheadAttention."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        from open_clip.transformer import Transformer
        self.transformer = Transformer(width=32, layers=2, heads=4, batch_first=batch_first)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.transformer(x).mean(dim=1))


def tiny_tower() -> TinyTower:
    torch.manual_seed(0)
    return TinyTower().eval()


def _close(a, b, rtol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(b.abs().max().item(), 1e-6))


# ---- fused qkv Linear (timm ViT) ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('method', sorted(CONFIGS))
def test_vit_qkv_slices_identity_merge_roundtrip(method, tmp_path):
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    keys = list(model.state_dict())
    with torch.no_grad():
        base = model(x)
    cfg = CONFIGS[method](include=['attn.qkv'], slices=['q', 'v'], train_modules=['head'])
    report = visadapt.inject(model, cfg)
    assert report.layers == ['blocks.0.attn.qkv', 'blocks.1.attn.qkv']
    adapter = model.blocks[0].attn.qkv.visadapt['default']
    assert isinstance(adapter, SlicedAdapter) and adapter.parts == ['q', 'v']
    with torch.no_grad():
        assert torch.equal(model(x), base)
    assert all('.visadapt.default.q.' in k or '.visadapt.default.v.' in k for k in adapter_params(model))
    randomize_adapters(model)
    visadapt.save_adapter(model, tmp_path / 'ad')
    fresh = tiny_vit()
    visadapt.load_adapter(fresh, tmp_path / 'ad')
    w0 = model.blocks[0].attn.qkv.weight.detach().clone()
    with torch.no_grad():
        adapted = model(x)
        assert torch.equal(fresh(x), adapted)
        assert (adapted - base).abs().max() > 1e-4
        # k rows untouched; q and v rows changed
        w_adapted = adapter.adapted_weight(w0)
        assert torch.equal(w_adapted[64:128], w0[64:128])
        assert (w_adapted[:64] - w0[:64]).abs().max() > 0 and (w_adapted[128:] - w0[128:]).abs().max() > 0
        visadapt.merge(model)
        _close(model(x), adapted)
        assert torch.equal(model.blocks[0].attn.qkv.weight[64:128], w0[64:128])
        visadapt.unmerge(model)
        _close(model.blocks[0].attn.qkv.weight, w0)
    visadapt.remove(model)
    assert list(model.state_dict()) == keys and type(model.blocks[0].attn.qkv) is nn.Linear


@pytest.mark.parametrize('method', ['SVFT', 'SeRA', 'LoRA'])
def test_vit_slices_weight_and_bypass_paths_agree(method):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    results, state = {}, None
    for path in ('weight', 'bypass'):
        model = tiny_vit()
        visadapt.inject(model, CONFIGS[method](include=['qkv'], slices=['q', 'k', 'v'], forward_path=path))
        if state is None:
            randomize_adapters(model)
            state = visadapt.adapter_state_dict(model)
        else:
            visadapt.load_adapter_state_dict(model, state)
        out = model(x)
        out.square().sum().backward()
        results[path] = out.detach(), {n: p.grad for n, p in adapter_params(model).items()}
    _close(results['bypass'][0], results['weight'][0])
    for n, g in results['weight'][1].items():
        _close(results['bypass'][1][n], g, rtol=1e-4)


def test_svft_slices_use_the_svd_of_each_slice():
    model = tiny_vit()
    visadapt.inject(model, visadapt.SVFTConfig(include=['qkv'], slices=['q', 'v']))
    qkv = model.blocks[1].attn.qkv
    adapter = qkv.visadapt['default']
    for name, rows in (('q', slice(0, 64)), ('v', slice(128, 192))):
        U, V = svft_bases(qkv.weight[rows].detach())
        assert torch.equal(getattr(adapter, name).U, U) and torch.equal(getattr(adapter, name).V, V)
    assert not hasattr(adapter, 'k') or 'k' not in adapter._modules
    meta = adapter.metadata()
    assert sorted(meta) == ['q', 'v'] and meta['q']['base_weight']['shape'] == [64, 64]


def test_slices_pattern_dict_slices_matching_layers_and_adapts_others_whole():
    model = tiny_vit()
    report = visadapt.inject(model, visadapt.SeRAConfig(r=4, include=['qkv', 'fc1'], slices={'qkv': ['v']}))
    assert report.layers == ['blocks.0.attn.qkv', 'blocks.0.mlp.fc1', 'blocks.1.attn.qkv', 'blocks.1.mlp.fc1']
    assert isinstance(model.blocks[0].attn.qkv.visadapt['default'], SlicedAdapter)
    assert not isinstance(model.blocks[0].mlp.fc1.visadapt['default'], SlicedAdapter)
    # per layer: (64 + 64)·4/4 + 16 for the v slice; fc1 64 → 256: (64 + 256) + 16
    assert report.adapter_params == 2 * ((64 + 64) + 16) + 2 * ((64 + 256) + 16)


def test_mpc_regularizer_sees_every_slice():
    model = tiny_vit()
    visadapt.inject(model, visadapt.LoRAConfig(r=4, include=['qkv'], slices=['q', 'v'], mpc='o', mpc_weight=1.0))
    adapter = model.blocks[0].attn.qkv.visadapt['default']
    assert len(adapter.mpc_factors()) == 2
    loss = visadapt.regularization_loss(model)
    loss.backward()
    assert adapter.q.A.grad is not None and adapter.v.A.grad is not None


# ---- nn.MultiheadAttention (open_clip) ----------------------------------------------------------------------------------
@pytest.mark.parametrize('method', sorted(CONFIGS))
def test_mha_slices_identity_merge_roundtrip(method, tmp_path):
    model = tiny_tower()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    keys = list(model.state_dict())
    w0 = model.transformer.resblocks[0].attn.in_proj_weight.detach().clone()
    with torch.no_grad():
        base = model(x)
    report = visadapt.inject(model, CONFIGS[method](include=['attn'], slices=['q', 'v']))
    assert report.layers == ['transformer.resblocks.0.attn', 'transformer.resblocks.1.attn']
    attn = model.transformer.resblocks[0].attn
    assert isinstance(attn, nn.MultiheadAttention) and type(attn).__name__ == 'AdaptedMultiheadAttention'
    assert [k for k in model.state_dict() if '.visadapt.' not in k] == keys
    with torch.no_grad():
        assert torch.equal(model(x), base)
    randomize_adapters(model)
    visadapt.save_adapter(model, tmp_path / 'ad')
    fresh = tiny_tower()
    visadapt.load_adapter(fresh, tmp_path / 'ad')
    with torch.no_grad():
        adapted = model(x)
        assert torch.equal(fresh(x), adapted)
        assert (adapted - base).abs().max() > 1e-4
        visadapt.merge(model)
        assert not torch.equal(attn.in_proj_weight, w0) and torch.equal(attn.in_proj_weight[32:64], w0[32:64])
        _close(model(x), adapted)
        visadapt.unmerge(model)
        _close(attn.in_proj_weight, w0)
        _close(model(x), adapted)
    # training reaches the adapters through F.multi_head_attention_forward
    model.train()
    model(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in adapter_params(model).items()
               if not n.endswith('.B') or method != 'LoRA')
    visadapt.remove(model)
    assert type(model.transformer.resblocks[0].attn) is nn.MultiheadAttention
    assert list(model.state_dict()) == keys
    _close(model.transformer.resblocks[0].attn.in_proj_weight, w0)


@pytest.mark.parametrize('path', ['weight', 'bypass'])
def test_mha_out_proj_adapter_takes_effect(path):
    """nn.MultiheadAttention never calls out_proj.forward(); its adapters still apply, on either path."""
    model = tiny_tower()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    visadapt.inject(model, visadapt.LoRAConfig(r=4, include=['attn.out_proj'], forward_path=path))
    attn = model.transformer.resblocks[0].attn
    assert type(attn).__name__ == 'AdaptedMultiheadAttention' and len(attn.visadapt) == 0
    randomize_adapters(model)
    adapter = attn.out_proj.visadapt['default']
    with torch.no_grad():
        out = attn(x, x, x, need_weights=False)[0]
        plain = F.multi_head_attention_forward(
            x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), 32, 4, attn.in_proj_weight, attn.in_proj_bias,
            None, None, False, 0.0, attn.out_proj.weight + adapter.delta_weight(), attn.out_proj.bias,
            training=False, need_weights=False)[0].transpose(0, 1)
        _close(out, plain)
        adapted = model(x)
        visadapt.merge(model)
        _close(model(x), adapted)
        visadapt.unmerge(model)
    visadapt.remove(model)
    assert type(attn) is nn.MultiheadAttention and not hasattr(attn, 'visadapt')


def test_mha_second_adapter_and_out_proj_with_in_proj():
    model = tiny_tower()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        base = model(x)
    visadapt.inject(model, visadapt.SVFTConfig(include=['attn'], slices=['q', 'v']), name='qv')
    visadapt.inject(model, visadapt.LoRAConfig(r=2, include=['out_proj']), name='o')
    randomize_adapters(model)
    attn = model.transformer.resblocks[1].attn
    assert list(attn.visadapt) == ['qv'] and list(attn.out_proj.visadapt) == ['o']
    with torch.no_grad():
        both = model(x)
        with visadapt.adapters_disabled(model, 'o'):
            only_qv = model(x)
        assert (both - only_qv).abs().max() > 1e-5
    visadapt.remove(model, 'qv')
    assert type(attn).__name__ == 'AdaptedMultiheadAttention'      # kept for the out_proj adapter
    visadapt.remove(model, 'o')
    assert type(attn) is nn.MultiheadAttention
    with torch.no_grad():
        torch.testing.assert_close(model(x), base)


def test_mha_refuses_bypass_only_adapters():
    model = tiny_tower()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match='weight path'):
        visadapt.inject(model, visadapt.LoRAConfig(r=4, include=['attn'], slices=['q', 'v'], mpc='n'))
    with pytest.raises(ValueError, match="forward_path='bypass' is not available on nn.MultiheadAttention"):
        visadapt.inject(model, visadapt.LoRAConfig(r=4, include=['attn'], forward_path='bypass'))
    assert_unchanged(model, before)


def test_mha_with_separate_kv_dims_is_refused():
    model = nn.Sequential(nn.MultiheadAttention(32, 4, kdim=16, vdim=16))
    before = state_snapshot(model)
    with pytest.raises(TypeError, match='separate q/k/v projection weights'):
        visadapt.inject(model, visadapt.SVFTConfig(target_types=['MultiheadAttention']))
    assert_unchanged(model, before)


# ---- every registered method, sliced ----------------------------------------------------------------------------------
LAYER_METHODS = sorted(m for m, cls in visadapt.METHODS.items() if cls.adapts_layers)


@pytest.mark.parametrize('build,include,shape', [(tiny_vit, 'qkv', (2, 3, 32, 32)), (tiny_tower, 'attn', (2, 5, 32))],
                         ids=['timm_qkv', 'open_clip_mha'])
@pytest.mark.parametrize('method', LAYER_METHODS)
def test_every_method_on_q_v_slices(method, build, include, shape, tmp_path):
    """Identity at init, q/v-only updates, save/load, merge == unmerged, for every registered layer method."""
    model = build()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = model(x)
    visadapt.inject(model, method_config(method, include=[include], slices=['q', 'v']))
    adapters = [m.visadapt['default'] for _, m in iter_adapted(model, 'default')]
    assert adapters and all(isinstance(a, SlicedAdapter) and a.parts == ['q', 'v'] for a in adapters)
    with torch.no_grad():
        assert torch.equal(model(x), base)
    randomize_adapters(model)
    visadapt.save_adapter(model, tmp_path / 'ad')
    fresh = build()
    visadapt.load_adapter(fresh, tmp_path / 'ad')
    with torch.no_grad():
        adapted = model(x)
        assert (adapted - base).abs().max() > 1e-5
        assert torch.equal(fresh(x), adapted)
        weight = base_weight(next(m for _, m in iter_adapted(model, 'default')))
        before = weight.detach().clone()
        visadapt.merge(model)
        d = weight.shape[0] // 3
        assert torch.equal(weight[d:2 * d], before[d:2 * d])                    # k rows untouched
        _close(model(x), adapted, rtol=1e-4)


# ---- bad input ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('slices,match', [(['q', 'x'], 'distinct slice names'), (['q', 'q'], 'distinct'), ([], 'non-empty'),
                                          ({}, 'selects nothing'), ({'qkv': ['o']}, r"slices\['qkv'\]")])
def test_bad_slice_names(slices, match):
    with pytest.raises(ValueError, match=match):
        visadapt.LoRAConfig(slices=slices)


def test_slices_pattern_that_matches_no_adapted_layer():
    model = tiny_vit()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="slices key 'attn.qkvv' matches no adapted layer"):
        visadapt.inject(model, visadapt.SVFTConfig(include=['qkv'], slices={'attn.qkvv': ['q', 'v']}))
    assert_unchanged(model, before)


def test_slices_on_a_layer_that_is_not_three_slices():
    model = tiny_vit()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="'blocks.0.attn.proj'.*64 output features"):
        visadapt.inject(model, visadapt.SVFTConfig(include=['qkv', 'attn.proj'], slices=['q', 'v']))
    assert_unchanged(model, before)


def test_slice_split_errors_name_the_slice():
    model = tiny_vit()
    with pytest.raises(ValueError, match="slice 'q': SeRA split=3"):
        visadapt.inject(model, visadapt.SeRAConfig(r=3, include=['qkv'], slices=['q', 'v']))


def test_slices_round_trip_through_the_config_json():
    cfg = visadapt.SVFTConfig(pattern='banded', slices={'attn.qkv': ['v', 'q']})
    assert cfg.slices == {'attn.qkv': ['q', 'v']}
    assert visadapt.config_from_dict(cfg.to_dict()) == cfg


# ---- ViT-B/16 counts (q and v of 12 blocks) against the papers' formulas --------------------------------------------------
def test_vit_base_q_v_parameter_counts_match_the_papers():
    """One SVFT injection (24 SVDs of 768×768: the slow part) checks both the banded and the plain counts."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model('vit_base_patch16_224', pretrained=False, num_classes=0)
    d, layers = 768, 12 * 2
    svft = visadapt.inject(model, visadapt.SVFTConfig(pattern='banded', off_diag=2, include=['qkv'],
                                                      slices=['q', 'v']), name='svft_b2')
    assert svft.adapter_params == layers * (d * 2 + (d - 2) * (2 + 1))           # Table 7: D·k + (D − k)(k + 1)
    parts = [getattr(m.visadapt['svft_b2'], s) for _, m in iter_adapted(model) for s in ('q', 'v')]
    assert len(parts) == layers and all(p.U.shape == (d, d) for p in parts)
    plain = sum(svft_num_params(*p.U.shape[:1], p.V.shape[0], 'plain') for p in parts)
    assert plain == sum(p.p for p in parts) == layers * d == 18_432               # SVFT_P: Table 9's 18.5K, ViT-B
    sera = visadapt.inject(model, visadapt.SeRAConfig(r=16, include=['qkv'], slices=['q', 'v']), name='sera')
    assert sera.adapter_params == layers * ((d + d) * 16 // 16 + 16 * 16)          # (d_in + d_out)·r/split + r²
    sera8 = visadapt.inject(model, visadapt.SeRAConfig(r=32, split=8, include=['qkv'], slices=['q', 'v']),
                            name='sera8')
    assert sera8.adapter_params == layers * ((d + d) * 32 // 8 + 32 * 32)
