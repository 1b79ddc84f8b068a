"""VeRA: ΔW = diag(b) B diag(d) A, frozen shared A and B regenerated from a seed and never saved."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from visadapt_testing import TinyNet, assert_unchanged, randomize_adapters, state_snapshot

import visadapt


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(16, 32), nn.Conv2d(16, 32, 3, padding=1)


def test_parameter_count_init_and_formula():
    torch.manual_seed(0)
    model = TinyNet(nn.Conv2d(16, 32, 3, padding=1, groups=2))
    report = visadapt.inject(model, visadapt.VeRAConfig(r=6, include=['layer']))
    a = model.layer.visadapt['default']
    assert report.adapter_params == 6 + 32
    assert torch.all(a.d == 0.1) and torch.all(a.b == 0)
    assert a.A.shape == (6, 8, 3, 3) and a.B.shape == (32, 6) and not a.A.requires_grad
    randomize_adapters(model)
    ref = torch.diag(a.b) @ a.B @ torch.diag(a.d) @ a.A.flatten(1)
    torch.testing.assert_close(a.delta_weight(), ref.reshape(a.site.weight_shape))


def test_projections_shared_regenerated_and_not_saved(tmp_path):
    model = TwoLayers()
    visadapt.inject(model, visadapt.VeRAConfig(r=4, seed=7))
    va, vb, vc = (m.visadapt['default'] for m in (model.a, model.b, model.c))
    assert va.A.data_ptr() == vb.A.data_ptr() and va.B.data_ptr() == vb.B.data_ptr()  # one tensor per shape
    assert not any(k.endswith(('.A', '.B')) for k in model.state_dict())
    visadapt.save_adapter(model, tmp_path / 'v')
    other = TwoLayers()
    visadapt.load_adapter(other, tmp_path / 'v')
    assert torch.equal(other.c.visadapt['default'].A, vc.A)
    seed8 = TwoLayers()
    visadapt.inject(seed8, visadapt.VeRAConfig(r=4, seed=8))
    assert not torch.equal(seed8.a.visadapt['default'].A, va.A)


def test_seed_and_shape_mismatch_on_load(tmp_path):
    model = TinyNet(nn.Linear(16, 32))
    cfg = visadapt.VeRAConfig(r=4, seed=3, include=['layer'])
    visadapt.inject(model, cfg)
    visadapt.save_adapter(model, tmp_path / 'v')

    fresh = TinyNet(nn.Linear(16, 32))
    before = state_snapshot(fresh)
    with pytest.raises(ValueError, match='VeRA seed mismatch'):
        visadapt.load_adapter(fresh, tmp_path / 'v', config=visadapt.VeRAConfig(r=4, seed=4, include=['layer']))
    assert_unchanged(fresh, before)

    wider = TinyNet(nn.Linear(16, 48))
    wider_before = state_snapshot(wider)
    with pytest.raises(ValueError, match='VeRA B shape mismatch'):
        visadapt.load_adapter(wider, tmp_path / 'v')
    assert_unchanged(wider, wider_before)

    meta_path = tmp_path / 'v' / 'adapter_config.json'
    meta = json.loads(meta_path.read_text())
    meta['layer_metadata']['layer']['A']['sha256'] = '0' * 64  # as if another generator had drawn A
    meta['layer_metadata']['layer']['A']['probe'][0] += 1.0
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='draws other random numbers'):
        visadapt.load_adapter(fresh, tmp_path / 'v')
    assert_unchanged(fresh, before)


@pytest.mark.parametrize('bad', [dict(r=0), dict(seed=-1), dict(seed=1.5), dict(d_init=float('inf'))])
def test_bad_config(bad):
    with pytest.raises(ValueError, match='VeRA'):
        visadapt.VeRAConfig(**bad)
