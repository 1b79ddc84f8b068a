"""BitFit: b' = b + Δb; layers without a bias get a bias delta (not mergeable) or are skipped."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from visadapt_testing import assert_unchanged, randomize_adapters, small_cnn, state_snapshot

import visadapt


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.with_bias = nn.Linear(8, 8)
        self.no_bias = nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return self.no_bias(self.with_bias(x))


def test_counts_and_delta_on_the_output():
    torch.manual_seed(0)
    model = Net()
    report = visadapt.inject(model, visadapt.BitFitConfig())
    assert report.layers == ['with_bias', 'no_bias'] and report.adapter_params == 8 + 8
    randomize_adapters(model)
    x = torch.randn(3, 8)
    db1 = model.with_bias.visadapt['default'].delta_b.detach()
    db2 = model.no_bias.visadapt['default'].delta_b.detach()
    with torch.no_grad():
        h = nn.functional.linear(x, model.with_bias.weight, model.with_bias.bias + db1)
        torch.testing.assert_close(model(x), nn.functional.linear(h, model.no_bias.weight) + db2)
    assert not model.no_bias.visadapt['default'].has_weight_path


def test_bias_free_layers_block_merge_unless_skipped():
    model = Net()
    visadapt.inject(model, visadapt.BitFitConfig())
    before = state_snapshot(model)
    with pytest.raises(ValueError, match='no bias parameter'):
        visadapt.merge(model)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="forward_path='weight'"):
        visadapt.inject(Net(), visadapt.BitFitConfig(forward_path='weight'), name='w')

    skipped = Net()
    report = visadapt.inject(skipped, visadapt.BitFitConfig(bias_free='skip'))
    assert report.layers == ['with_bias']
    randomize_adapters(skipped)
    b0 = skipped.with_bias.bias.detach().clone()
    visadapt.merge(skipped)
    torch.testing.assert_close(skipped.with_bias.bias.detach(), b0 + skipped.with_bias.visadapt['default'].delta_b)
    visadapt.unmerge(skipped)
    torch.testing.assert_close(skipped.with_bias.bias.detach(), b0)


def test_skip_on_bias_free_layers_only_is_a_clear_error():
    model = Net()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match='selected no layer'):
        visadapt.inject(model, visadapt.BitFitConfig(bias_free='skip', include=['no_bias']))
    assert_unchanged(model, before)
    report = visadapt.inject(small_cnn(), visadapt.BitFitConfig(bias_free='skip'))
    assert report.layers == ['stem', 'dw', 'pw', 'fc', 'head']
    with pytest.raises(ValueError, match="bias_free='keep' is not valid"):
        visadapt.BitFitConfig(bias_free='keep')
