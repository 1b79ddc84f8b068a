"""Validate, then act: every model-level operation that fails leaves the model exactly as it was.

Each test makes the *last* adapted layer fail, after the earlier layers would already have been changed by a naive
loop, and checks weights, biases, buffers, classes, requires_grad flags, injections and the merge/disable
bookkeeping against a snapshot. Two kinds of failure: one the validation catches (an unmergeable adapter, a scale of
exactly zero, a bad tensor in a file), and one it cannot foresee (an adapter raising half way), which the journal
of :mod:`visadapt.core.merging` rolls back.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from visadapt_testing import assert_unchanged, randomize_adapters, state_snapshot

import visadapt


class Stack(nn.Module):
    """Four Linear layers: ``l3`` is the last one every operation visits."""

    def __init__(self, last_bias: bool = True):
        super().__init__()
        self.l0, self.l1, self.l2 = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.l3 = nn.Linear(6, 6, bias=last_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(self.l2(self.l1(self.l0(x))))


def _stack(method: str = 'SSL', **fields) -> Stack:
    torch.random.default_generator.manual_seed(0)
    model = Stack(last_bias=fields.pop('last_bias', True))
    visadapt.inject(model, visadapt.get_config_class(method)(**fields))
    randomize_adapters(model)
    return model


def _zero_last_scale(model: Stack) -> None:
    with torch.no_grad():
        model.l3.visadapt['default'].s[0] = 0.0


def _fail_on_last(model: Stack, monkeypatch, attr: str) -> None:
    """Make the last layer's adapter raise in ``attr`` (an error no validation foresees)."""
    adapter = model.l3.visadapt['default']

    def boom(*args, **kwargs):
        raise RuntimeError('simulated failure in the last layer')
    monkeypatch.setattr(adapter, attr, boom)


def test_inject_refused_by_the_last_layer():
    torch.random.default_generator.manual_seed(0)
    model = Stack()
    model.l3 = nn.Linear(6, 5)  # SeRA's split=2 does not divide 5 output features
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="cannot adapt layer 'l3'"):
        visadapt.inject(model, visadapt.SeRAConfig(r=2, split=2))
    assert_unchanged(model, before)


def test_merge_refused_by_the_last_layer():
    model = _stack('BitFit', last_bias=False)  # Δb on a bias-free layer has nothing to fold into
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="'l3' cannot be merged"):
        visadapt.merge(model)
    assert_unchanged(model, before)


def test_merge_failing_half_way_is_rolled_back(monkeypatch):
    model = _stack('LoRA', r=2)
    before = state_snapshot(model)
    _fail_on_last(model, monkeypatch, 'adapted_weight')
    with pytest.raises(RuntimeError, match='simulated'):
        visadapt.merge(model)
    assert_unchanged(model, before)


def test_unmerge_refused_by_the_last_layer():
    model = _stack('SSL')
    visadapt.merge(model)
    _zero_last_scale(model)  # merge erased a column of W there: it cannot be divided back out
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="cannot unmerge adapter 'default' on layer 'l3'"):
        visadapt.unmerge(model)
    assert_unchanged(model, before)


def test_unmerge_failing_half_way_is_rolled_back(monkeypatch):
    model = _stack('LoRA', r=2)
    visadapt.merge(model)
    before = state_snapshot(model)
    _fail_on_last(model, monkeypatch, 'restored_weight')
    with pytest.raises(RuntimeError, match='simulated'):
        visadapt.unmerge(model)
    assert_unchanged(model, before)


def test_unmerge_of_dora_refused_by_the_last_layer():
    model = _stack('DoRA', r=2)
    visadapt.merge(model)
    with torch.no_grad():
        model.l3.visadapt['default'].m[0] = 0.0
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="layer 'l3'.*magnitude m is exactly 0"):
        visadapt.unmerge(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize('merge_weights', [False, True])
def test_remove_refused_by_the_last_layer(merge_weights):
    if merge_weights:
        model = _stack('BitFit', last_bias=False)
        error = "'l3' cannot be merged"
    else:
        model = _stack('SSL')
        visadapt.merge(model)
        _zero_last_scale(model)
        error = "cannot unmerge adapter 'default' on layer 'l3'"
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=error):
        visadapt.remove(model, merge_weights=merge_weights)
    assert_unchanged(model, before)


def test_remove_failing_half_way_is_rolled_back(monkeypatch):
    model = _stack('LoRA', r=2)
    before = state_snapshot(model)
    _fail_on_last(model, monkeypatch, 'adapted_weight')
    with pytest.raises(RuntimeError, match='simulated'):
        visadapt.remove(model, merge_weights=True)
    assert_unchanged(model, before)


def test_disable_refused_by_the_last_layer():
    model = _stack('SSL')
    visadapt.merge(model)  # disabling unmerges
    _zero_last_scale(model)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="layer 'l3'"):
        visadapt.disable_adapter(model)
    assert_unchanged(model, before)


def test_disable_failing_half_way_is_rolled_back(monkeypatch):
    model = _stack('LoRA', r=2)
    visadapt.merge(model)
    before = state_snapshot(model)
    _fail_on_last(model, monkeypatch, 'restored_weight')
    with pytest.raises(RuntimeError, match='simulated'):
        visadapt.disable_adapter(model)
    assert_unchanged(model, before)


def test_enable_of_an_unknown_adapter_changes_nothing():
    model = _stack('LoRA', r=2)
    visadapt.disable_adapter(model)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        visadapt.enable_adapter(model, 'other')
    assert_unchanged(model, before)


def test_load_refused_by_the_last_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    model = _stack('LoRA', r=2)
    visadapt.save_adapter(model, tmp_path / 'a')
    path = tmp_path / 'a' / 'adapter_model.safetensors'
    tensors = load_file(path)
    last = sorted(k for k in tensors if k.startswith('adapter.l3.'))[-1]
    tensors[last] = torch.full_like(tensors[last], float('nan'))
    save_file(tensors, path)
    torch.random.default_generator.manual_seed(0)
    fresh = Stack()
    before = state_snapshot(fresh)
    with pytest.raises(ValueError, match=f"{last!r} contains NaN"):
        visadapt.load_adapter(fresh, tmp_path / 'a')
    assert_unchanged(fresh, before)
