"""``--profile``: where a training step's time goes, per category of op and per adapted layer (torch.profiler).

``--profile-steps`` consecutive training steps of each chosen configuration run under ``torch.profiler`` (CPU
activity; same process and thread count as the timed steps). From the raw event tree:

* **self time by category**: an op's self time is its duration minus its child ops'. Each op belongs to the category
  of its outermost categorized ancestor (``aten::linear`` → ``aten::t`` + ``aten::addmm`` all count as a matmul;
  ``ConvolutionBackward0`` → ``aten::convolution_backward`` as conv backward; everything inside the
  ``Optimizer.step`` range as the optimizer), else of its own name: conv forward / backward, matmul forward / backward
  (``mm``, ``bmm``, ``matmul``, ``addmm``, ``linear``, attention kernels and their ``*Backward`` nodes: e.g. FLoRA's
  Tucker mode products), optimizer, normalization, copies/views (``permute``, ``copy_``, ``_to_copy``, ``view``,
  ``reshape``, ...), elementwise (arithmetic, activations, reductions), other (gradient accumulation, autograd
  bookkeeping);
* **calls**: outermost op calls per step (the dispatches Python or the autograd engine makes), per category;
* **Python/dispatch overhead** = the step's wall time under the profiler − Σ op self time, both from the same
  profiled steps (so the profiler's own per-op cost, which lands partly inside and partly outside ops, is in both):
  the time the step spends outside every op — Python in module forwards and the optimizer, hooks, autograd engine
  scheduling between nodes. The unprofiled step time (median of the round-robin steps) is reported next to it;
* **per adapted layer**: while profiling only, a forward pre-hook and hook on every target layer open and close a
  ``record_function`` range named after it; ops inside it are the layer's forward (the range's own self time is the
  Python time of the layer's forward), and backward nodes whose sequence number belongs to one of those forward ops
  are the layer's backward.

On CUDA the categories are the host-side view (where launch overhead shows up); kernel times are not attributed.
"""
from __future__ import annotations

import argparse
import re
import statistics
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from .configurations import Candidate
from .measure import event_tree, is_op, sync, train_step
from .workloads import Workload

__all__ = ['CATEGORIES', 'classify', 'profile_step', 'layer_labels']

CATEGORIES = ('conv forward', 'conv backward', 'matmul forward', 'matmul backward', 'optimizer', 'normalization',
              'copies/views', 'elementwise', 'other')
LABEL = 'bench.layer::'
_BACKWARD_PREFIX = 'autograd::engine::evaluate_function: '
_MATMUL = {'mm', 'bmm', 'matmul', 'addmm', 'addbmm', 'baddbmm', 'linear', 'einsum', 'tensordot', 'dot', 'mv', 'addmv',
           'addmm_activation', 'mkldnn_linear'}
_COPIES = {'permute', 'copy', 'copy_', 'to_copy', 'to', 'view', 'reshape', 'reshape_alias', 'unsafe_view',
           'contiguous', 'clone', 'expand', 'expand_as', 'transpose', 't', 'unsqueeze', 'squeeze', 'as_strided',
           'as_strided_', 'flatten', 'movedim', 'narrow', 'slice', 'select', 'split', 'split_with_sizes', 'chunk',
           'cat', 'stack', 'detach', 'empty', 'empty_like', 'empty_strided', 'zeros', 'zeros_like', 'ones_like',
           'new_zeros', 'new_empty', 'new_empty_strided', 'resize_', 'alias', 'unbind', 'pad', 'constant_pad_nd',
           'lift_fresh', 'resolve_conj', 'resolve_neg', 'conj', 'fill_', 'zero_', 'index', 'index_select', 'gather',
           'view_as', 'repeat', 'type_as', 'unfold'}


def _base_name(name: str) -> Tuple[str, bool]:
    """(snake_case op name without namespace or leading underscore, is it a backward node)."""
    backward = name.startswith(_BACKWARD_PREFIX)
    name = name[len(_BACKWARD_PREFIX):] if backward else name
    hit = re.fullmatch(r'(?:\w+::)?([A-Za-z0-9]+)Backward\d*', name)
    if hit:  # autograd node, e.g. AddmmBackward0, NativeLayerNormBackward0
        return re.sub(r'(?<!^)(?=[A-Z])', '_', hit.group(1)).lower(), True
    return name.rsplit('::', 1)[-1].lstrip('_').lower(), backward or 'backward' in name.lower()


def classify(name: str) -> Optional[str]:
    """The category of an op or autograd node by its name; None for names that only group others (autograd nodes
    of elementwise ops, unknown wrappers): their children are classified on their own."""
    if name.startswith('Optimizer.'):
        return 'optimizer'
    base, backward = _base_name(name)
    core = base.removesuffix('_backward')
    if re.search(r'conv(olution|_transpose|_depthwise|\dd|$)', core):
        return 'conv backward' if backward else 'conv forward'
    if core in _MATMUL or 'scaled_dot_product' in core or 'attention' in core:
        return 'matmul backward' if backward else 'matmul forward'
    if 'norm' in core:
        return 'normalization'
    if core in _COPIES:
        return 'copies/views'
    return 'elementwise' if name.startswith('aten::') else None


def layer_labels(model: nn.Module, names: List[str]) -> List[Any]:
    """Forward pre-hooks/hooks that wrap each named layer's forward in a ``record_function`` range; returns the
    handles (remove them after profiling)."""
    modules = dict(model.named_modules())
    handles, open_ranges = [], {}

    def enter(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            rf = torch.autograd.profiler.record_function(LABEL + name)
            rf.__enter__()
            open_ranges[name] = rf
        return hook

    def leave(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            rf = open_ranges.pop(name, None)
            if rf is not None:
                rf.__exit__(None, None, None)
        return hook

    for name in names:
        handles.append(modules[name].register_forward_pre_hook(enter(name)))
        handles.append(modules[name].register_forward_hook(leave(name)))
    return handles


def _self_ns(node: Any) -> int:
    from torch._C._profiler import _EventType
    return max(node.duration_time_ns - sum(c.duration_time_ns for c in node.children if c.tag == _EventType.TorchOp),
               0)


def _forward_sequences(roots: List[Any]) -> Dict[int, str]:
    """Sequence number of every op run inside a layer's forward range → the layer."""
    out: Dict[int, str] = {}
    stack = [(r, None) for r in roots]
    while stack:
        node, layer = stack.pop()
        if node.name.startswith(LABEL):
            layer = node.name[len(LABEL):]
        elif layer is not None and is_op(node) and node.extra_fields.sequence_number >= 0:
            out.setdefault(node.extra_fields.sequence_number, layer)
        stack.extend((c, layer) for c in node.children)
    return out


def _walk(roots: List[Any], seq_layer: Dict[int, str]) -> Iterator[Tuple[Any, Optional[str], Optional[str], bool, str]]:
    """Every profiler range/op as (node, category, layer, outermost op?, phase 'forward'|'backward'|'')."""
    from torch._C._profiler import _EventType
    stack = [(r, None, None, False, '') for r in roots]
    while stack:
        node, cat, layer, in_op, phase = stack.pop()
        if node.tag != _EventType.TorchOp:
            continue
        op = is_op(node)
        if node.name.startswith(LABEL):
            layer, phase = node.name[len(LABEL):], 'forward'
        elif op and not in_op and node.name.startswith(_BACKWARD_PREFIX):
            seq = node.extra_fields.sequence_number
            layer, phase = (seq_layer.get(seq), 'backward') if seq >= 0 and seq in seq_layer else (None, '')
        cat = (cat or classify(node.name)) if op else ('optimizer' if node.name.startswith('Optimizer.') else cat)
        yield node, cat, layer, op and not in_op, phase
        stack.extend((c, cat, layer, in_op or op, phase) for c in node.children)


def _summarize(roots: List[Any], steps: int
               ) -> Tuple[Dict[str, Dict[str, float]], Dict[str, Dict[str, float]], Dict[str, float]]:
    """Per category and per layer: self ms and outermost calls per step (layer: forward/backward/Python split); and
    the wall ms per step of the ``Optimizer.step`` / ``Optimizer.zero_grad`` ranges (their ops and their Python)."""
    per_cat = {c: {'ms': 0.0, 'calls': 0.0} for c in CATEGORIES}
    per_layer: Dict[str, Dict[str, float]] = {}
    ranges: Dict[str, float] = {}
    for node, cat, layer, outermost, phase in _walk(roots, _forward_sequences(roots)):
        ms = _self_ns(node) / 1e6 / steps
        if node.name.startswith('Optimizer.'):
            name = node.name.split('#')[0]
            ranges[name] = ranges.get(name, 0.0) + node.duration_time_ns / 1e6 / steps
        entry = per_layer.setdefault(layer, {'forward_ms': 0.0, 'forward_python_ms': 0.0, 'backward_ms': 0.0,
                                            'calls': 0.0}) if layer else None
        if not is_op(node):
            if entry is not None and node.name == LABEL + layer:
                entry['forward_python_ms'] += ms
            continue
        per_cat[cat or 'other']['ms'] += ms
        per_cat[cat or 'other']['calls'] += outermost / steps
        if entry is not None:
            entry[f'{phase}_ms'] += ms
            entry['calls'] += outermost / steps
    return per_cat, per_layer, ranges


def profile_step(work: Workload, cand: Candidate, args: argparse.Namespace) -> Dict[str, Any]:
    """``--profile-steps`` profiled training steps of ``cand``: the breakdown described in the module docstring."""
    steps = args.profile_steps
    handles = layer_labels(cand.model, work.targets)
    walls: List[float] = []
    try:
        train_step(work, cand)  # one unprofiled step first: lazy allocations and caches out of the way
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                sync(args.device)
                t0 = time.perf_counter()
                train_step(work, cand)
                sync(args.device)
                walls.append(time.perf_counter() - t0)
    finally:
        for h in handles:
            h.remove()
    per_cat, per_layer, ranges = _summarize(event_tree(prof), steps)
    wall_ms = 1e3 * sum(walls) / steps
    op_ms = sum(v['ms'] for v in per_cat.values())
    layers = [{'layer': n, **per_layer[n]} for n in work.targets if n in per_layer]
    return {'config': cand.name, 'steps': steps, 'threads': torch.get_num_threads(),
            'step_ms_unprofiled': 1e3 * statistics.median(cand.step_s) if cand.step_s else None,
            'step_ms_profiled': wall_ms, 'op_ms': op_ms, 'overhead_ms': wall_ms - op_ms,
            'categories': per_cat, 'calls': sum(v['calls'] for v in per_cat.values()),
            'optimizer_ranges_ms': ranges, 'layers': layers}
