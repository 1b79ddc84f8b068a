"""Helpers shared by the test files (tiny models, configs, adapter perturbation, model snapshots).

Imported as ``from visadapt_testing import ...`` (pytest puts ``tests/`` on ``sys.path`` via its conftest.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from typing import Any, Dict, Iterator

import torch
import torch.nn as nn

import visadapt
from visadapt.core import is_adapted


class TinyNet(nn.Module):
    """``layer`` (the adapted layer) followed by a small ``head`` (trained fully via ``train_modules``).

    The head pools every non-feature dim so the same wrapper works for Linear (tokens) and ConvNd (spatial) layers.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        self.head = nn.Linear(out, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        if isinstance(self.layer, nn.Linear):
            pooled = y.mean(dim=1)
        else:
            pooled = y.flatten(2).mean(dim=2)
        return self.head(pooled)


class SmallCNN(nn.Module):
    """A few layers of every kind, for targeting / io / multi-adapter tests."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.ln = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.stem(x)))
        x = self.pw(self.dw(x))
        x = x.mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(self.ln(x))))


def small_cnn(seed: int = 0) -> SmallCNN:
    torch.random.default_generator.manual_seed(seed)
    return SmallCNN().eval()


def method_config(method: str, **overrides: Any) -> visadapt.AdapterConfig:
    """A small config of ``method`` built from its defaults: ``r=4`` where the method has a rank field.

    Keys in ``overrides`` that the method's config does not have are dropped, so one override set can serve many
    methods.
    """
    cls = visadapt.get_config_class(method)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: Dict[str, Any] = {}
    if 'r' in names:
        kwargs['r'] = 4
    kwargs.update({k: v for k, v in overrides.items() if k in names})
    return cls(**kwargs)


def adapter_params(model: nn.Module) -> Dict[str, torch.nn.Parameter]:
    """Named parameters that live inside adapters (``...visadapt.<name>...``)."""
    return {n: p for n, p in model.named_parameters() if '.visadapt.' in f'.{n}'}


@torch.no_grad()
def randomize_adapters(model: nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Move every adapter parameter away from its (identity) init by a small Gaussian perturbation.

    Perturbing instead of overwriting keeps multiplicative methods (scales near 1, magnitudes near ‖W‖) well
    conditioned, while zero-initialized tensors (LoRA's B, FLoRA's core G) become non-zero so ΔW ≠ 0.
    """
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(adapter_params(model).items()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
        p.add_(noise.to(device=p.device, dtype=p.dtype))


def state_snapshot(model: nn.Module) -> Dict[str, Any]:
    """Everything an error must leave unchanged: tensors, module classes, requires_grad flags."""
    return {
        'state': {k: v.detach().clone() for k, v in model.state_dict().items()},
        'classes': {n: type(m) for n, m in model.named_modules()},
        'requires_grad': {n: p.requires_grad for n, p in model.named_parameters()},
        'injections': sorted(visadapt.adapter_names(model)),
        'bookkeeping': {n: m.bookkeeping() for n, m in model.named_modules() if is_adapted(m)},
    }


def assert_unchanged(model: nn.Module, before: Dict[str, Any]) -> None:
    after = state_snapshot(model)
    assert after['classes'] == before['classes']
    assert after['requires_grad'] == before['requires_grad']
    assert after['injections'] == before['injections']
    assert after['bookkeeping'] == before['bookkeeping']
    assert list(after['state']) == list(before['state'])
    for k, v in before['state'].items():
        assert torch.equal(after['state'][k], v), k


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name: str):
    """Import ``tools/<name>.py`` as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, 'tools', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def flop_only_cost_model() -> Iterator[None]:
    """The path choice on CPU counting multiply-accumulates only (no per-call or memory-traffic charges), for tests
    whose expectation is the path with measurably fewer FLOPs."""
    from visadapt.core import path_cost
    before = path_cost.cost_model('cpu')
    path_cost.set_cost_model('cpu', path_cost.PathCost(bypass_elem_macs=0, weight_elem_macs=0, conv_op_macs=0,
                                                        matmul_op_macs=0))
    try:
        yield
    finally:
        path_cost.set_cost_model('cpu', before)
