"""Per-layer forward-path choice: for every distinct adapted layer (geometry + input shape) of a method with both a
weight path and a bypass (FLoRA, SVFT), one training step of the lone layer with ``forward_path='weight'`` and
``'bypass'`` is timed (interleaved), and the path ``'auto'`` takes on the same input must be within
``PATH_TOLERANCE`` of the faster one.

Each row also keeps the layer's **cost terms**: the parts of :class:`visadapt.core.path_cost.PathCost`'s two costs
that each linear field of the cost model multiplies (read off the cost model itself by switching one field on at a
time, so no formula is written twice). ``--refit`` fits those fields to the measured times (:mod:`.refit`).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import visadapt
from visadapt.core import site_from_module
from visadapt.core.path_cost import PathCost, cost_model
from visadapt.core.selection import layer_config

from .configurations import make_optimizer, trainable
from .measure import CLOCKS, time_round_robin
from .workloads import DTYPES, Workload

__all__ = ['PATH_TOLERANCE', 'CLEAR_GAP', 'LINEAR_FIELDS', 'cost_terms', 'path_choice']

PATH_TOLERANCE = 1.10  # auto must be within 10% of the faster forced path
CLEAR_GAP = 1.5  # per-layer path timing stops after 3 rounds when one path is this much slower
#: the PathCost fields each cost is linear in (the MAC count itself has weight 1); the others (``cached_elems``,
#: ``narrow_input_grad``, ``narrow_channels``) shape the terms and are held at the device's current values
LINEAR_FIELDS = ('matmul_op_macs', 'weight_elem_macs', 'bypass_elem_macs', 'conv_op_macs')


def cost_terms(adapter: Any, x_shape: Tuple[int, ...], input_grad: bool, model: PathCost) -> Dict[str, List[float]]:
    """Training-step cost of each path as a vector over ``('macs',) + LINEAR_FIELDS``: cost = Σ term · field (the
    ``macs`` term has weight 1), for ``model``'s non-linear fields."""
    zero = dataclasses.replace(model, **{f: 0.0 for f in LINEAR_FIELDS})
    units = [zero] + [dataclasses.replace(zero, **{f: 1.0}) for f in LINEAR_FIELDS]
    weight = [m.weight_cost(adapter, x_shape, True) for m in units]
    bypass = [m.bypass_cost(adapter, x_shape, True, input_grad) for m in units]
    return {'weight': [weight[0]] + [w - weight[0] for w in weight[1:]],
            'bypass': [bypass[0]] + [b - bypass[0] for b in bypass[1:]]}


def _layer_inputs(work: Workload) -> Dict[str, Tuple[int, ...]]:
    shapes: Dict[str, Tuple[int, ...]] = {}
    modules = dict(work.model.named_modules())

    def hook(name: str):
        def record(module: nn.Module, args: Tuple[torch.Tensor, ...]) -> None:
            shapes.setdefault(name, tuple(args[0].shape))
        return record

    hooks = [modules[n].register_forward_pre_hook(hook(n)) for n in work.targets]
    try:
        with torch.no_grad():
            work.forward(work.model)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _distinct_layers(work: Workload, config: visadapt.AdapterConfig) -> 'OrderedDict[Tuple, List[str]]':
    """Adapted layers grouped by (type, weight shape, stride, padding, dilation, groups, input shape)."""
    shapes = _layer_inputs(work)
    modules = dict(work.model.named_modules())
    adapted = set(config.include or work.targets)
    groups: 'OrderedDict[Tuple, List[str]]' = OrderedDict()
    for name in work.targets:
        if name in adapted and name in shapes:
            site = site_from_module(modules[name])
            sig = (type(modules[name]).__name__, site.weight_shape, site.stride, site.padding, site.dilation,
                   site.groups, shapes[name])
            groups.setdefault(sig, []).append(name)
    return groups


def _forced_paths(module: nn.Module, layer_cfg: visadapt.AdapterConfig, optimizer: str
                  ) -> Optional[Dict[str, Dict[str, Any]]]:
    """The lone layer adapted with each forward path (auto is built to read its choice, not timed); None when the
    method has only one path on it."""
    runs = {}
    for path in ('weight', 'bypass', 'auto'):
        holder = nn.Sequential(OrderedDict(layer=copy.deepcopy(module)))
        cfg = dataclasses.replace(layer_cfg, include=['layer'], exclude=[], rank_pattern={}, train_modules=[],
                                  target_types=None, forward_path=path)
        try:
            visadapt.inject(holder, cfg, name='bench')
        except ValueError:  # e.g. a LoRA form without bypass on this layer
            return None
        adapter = holder.layer.visadapt['bench']
        if not (adapter.has_bypass and adapter.has_weight_path):
            return None
        runs[path] = {'layer': holder.layer, 'adapter': adapter, 'opt': make_optimizer(trainable(holder), optimizer),
                      's': []}
    return runs


def _time_paths(work: Workload, runs: Dict[str, Dict[str, Any]], x: torch.Tensor, args: argparse.Namespace
                ) -> Dict[str, float]:
    """Median ms of one training step per forced path: ≥ ``--layer-steps`` timings (up to 4×, ``--layer-time`` per
    path), or 3 when one path is over ``CLEAR_GAP`` times the other after 3 (the verdict cannot change)."""
    with torch.no_grad(), work.autocast():
        grad_out = torch.randn_like(runs['weight']['layer'](x))
    clock = CLOCKS[args.clock]

    def run(path: str) -> None:
        r = runs[path]
        r['opt'].zero_grad(set_to_none=True)
        x.grad = None
        with work.autocast():
            out = r['layer'](x)
        out.backward(grad_out)
        r['opt'].step()

    order = ['weight', 'bypass']
    first: Dict[str, List[float]] = {p: [] for p in order}
    time_round_robin(order, run, lambda p: first[p], args.warmup, 1, args.device, clock)
    fastest = min(t[0] for t in first.values())
    reps = max(args.layer_steps, min(4 * args.layer_steps, int(args.layer_time / max(fastest, 1e-6))))
    time_round_robin(order, run, lambda p: runs[p]['s'], 0, min(reps, 3), args.device, clock)
    ms = {p: statistics.median(runs[p]['s']) for p in order}
    if reps > 3 and max(ms.values()) <= CLEAR_GAP * min(ms.values()):
        time_round_robin(order, run, lambda p: runs[p]['s'], 0, reps - 3, args.device, clock)
    return {p: 1e3 * statistics.median(runs[p]['s']) for p in order}


def path_choice(work: Workload, method: str, config: visadapt.AdapterConfig, args: argparse.Namespace
                ) -> List[Dict[str, Any]]:
    """One row per distinct adapted layer (at most ``--path-layers``): both paths' times, ``auto``'s choice on the
    same input (gradients on) and the layer's cost terms."""
    modules = dict(work.model.named_modules())
    device_model = cost_model(torch.device(args.device).type)
    rows = []
    for sig, names in list(_distinct_layers(work, config).items())[:args.path_layers]:
        runs = _forced_paths(modules[names[0]], layer_config(config, names[0]), args.optimizer)
        if runs is None:
            continue
        x = torch.randn(sig[-1], device=args.device, dtype=DTYPES[args.dtype], requires_grad=True)
        ms = _time_paths(work, runs, x, args)
        adapter = runs['auto']['adapter']
        with torch.enable_grad():
            chosen = 'bypass' if adapter.use_bypass(x) else 'weight'
        best = min(ms, key=ms.get)
        rows.append({'method': visadapt.get_config_class(method).method, 'layer': names[0], 'n_layers': len(names),
                     'type': sig[0], 'weight_shape': list(sig[1]), 'groups': sig[5], 'input_shape': list(sig[-1]),
                     'weight_ms': ms['weight'], 'bypass_ms': ms['bypass'], 'auto_path': chosen, 'best_path': best,
                     'chosen_vs_best': ms[chosen] / ms[best], 'steps': {p: len(runs[p]['s']) for p in ms},
                     'ok': ms[chosen] <= PATH_TOLERANCE * ms[best],
                     'cost_terms': cost_terms(adapter, tuple(sig[-1]), True, device_model)})
    return rows
