"""Full fine-tuning and head-only: configs that adapt no layer and only set what trains (and what is saved)."""
from __future__ import annotations

import pytest
import torch
from visadapt_testing import small_cnn

import visadapt


def test_full_finetune_trains_and_saves_everything(tmp_path):
    model = small_cnn()
    report = visadapt.inject(model, visadapt.FullFinetuneConfig())
    assert report.layers == [] and report.trainable == report.total == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    visadapt.save_adapter(model, tmp_path / 'full')
    state = visadapt.adapter_state_dict(model)
    assert sorted(state) == sorted('trained.' + k for k in model.state_dict())
    fresh = small_cnn()
    assert visadapt.load_adapter(fresh, tmp_path / 'full') == visadapt.FullFinetuneConfig()
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    visadapt.remove(fresh)
    assert all(p.requires_grad for p in fresh.parameters())  # the flags from before inject come back


def test_head_only_trains_only_the_head(tmp_path):
    model = small_cnn()
    report = visadapt.inject(model, visadapt.HeadOnlyConfig(train_modules=['head']))
    assert report.trainable == sum(p.numel() for p in model.head.parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {'head.weight', 'head.bias'}
    visadapt.save_adapter(model, tmp_path / 'probe')
    assert sorted(visadapt.adapter_state_dict(model)) == ['trained.head.bias', 'trained.head.weight']


@pytest.mark.parametrize('make,match', [
    (lambda: visadapt.HeadOnlyConfig(), 'needs train_modules'),
    (lambda: visadapt.FullFinetuneConfig(train_modules=['head']), 'train_modules must be empty'),
    (lambda: visadapt.FullFinetuneConfig(include=['fc']), 'adapts no layer'),
    (lambda: visadapt.HeadOnlyConfig(train_modules=['head'], target_types=['Linear']), 'not supported'),
])
def test_bad_config(make, match):
    with pytest.raises(ValueError, match=match):
        make()
