#!/usr/bin/env python
"""Benchmark every registered visadapt method against the frozen base, the weight-gradient limit, PEFT and LyCORIS.

For each model and each configuration, at matched trainable budgets (issue 8):

* **training step** time: forward + backward + optimizer step (AdamW), median of ``--steps`` timed steps after
  ``--warmup`` steps. All configurations of a model live in memory at once and are stepped round-robin (the starting
  configuration rotates every repeat), so slow drifts of a shared machine hit every configuration alike;
* **peak memory** of one training step: the bytes held before the step (parameters, buffers, optimizer state, the
  input) plus the high-water mark of what the step allocates on top. On CPU the step's allocations and frees are
  read from ``torch.profiler`` (``profile_memory=True``: every allocation of PyTorch's CPU allocator, inside ops and
  autograd included) and replayed in time order; a process RSS high-water mark cannot be used because it is
  per-process and monotonic, and every configuration lives in the same process. On CUDA the same quantity comes from
  ``torch.cuda.max_memory_allocated`` (reset before the step) minus what was allocated when the step started;
* **trainable parameters** and the ratio to the budget;
* **merged inference** latency (eval mode, no grad; median over ``--steps`` interleaved forwards), after folding the
  update into the weights, and the check that the merged outputs equal the unmerged adapted model's outputs. The
  adapters have taken ``--warmup + --steps`` optimizer steps by then, so ΔW ≠ 0 and the check is not vacuous
  (``delta_vs_base`` reports how far the adapted output is from the base output).

Reference configurations on the same layers:

* ``base``: the frozen model; no weight gradients, the input requires grad so the backward runs through every layer
  (every configuration gets that same input, so the only difference is the adapter);
* ``weight-grad limit``: only the adapted layers' own weights get gradients (no optimizer step): the least any adapter
  that materializes ΔW pays, since dL/dΔW = dL/dW';
* ``PEFT LoRA``: ``peft.LoraConfig(r, lora_alpha=r)``; PEFT refuses depthwise convs (rank not divisible by groups),
  which are then left out and recorded;
* ``LyCORIS LoCon`` / ``LyCORIS Tucker`` (``use_tucker=True``), each in rebuild (ΔW built every step) and bypass
  mode (``bypass_mode=True``: x → down → up added to the frozen output). LyCORIS forces rebuild mode on grouped convs;
  the count is recorded.

Visadapt methods come from the registry ``visadapt.METHODS``; ``visadapt.core.budget.match_budget`` sets each one's rank
(its ``budget_field``, at most ``--max-rank``) so that its trainable count is closest to the budget: visadapt LoRA at
rank ``--rank`` on the target layers, unless ``--budget`` gives a parameter count. SVFT runs its banded pattern with
the band width as the knob (``MATCH_PRESETS``); methods without a rank keep their fixed count, full fine-tuning trains
everything, and layers a method refuses are left out (and listed).

Per layer, the FLoRA/SVFT (every method with both a weight path and a bypass) forward-path choice is checked: one
training step of the lone layer with ``forward_path='weight'`` and ``'bypass'`` is timed, and the path ``'auto'``
takes on the same input must be within 10% of the faster one.

Outputs in ``--out``: ``bench.json``, ``bench.md`` (tables) and ``bench.png`` (plot).

Usage::

    visadapt-bench --quick --out out/bench_quick
    visadapt-bench --models convnext_atto,convnext_tiny,efficientnet_lite0,vit_small,unet_down \\
        --batch-size 8 --image-size 128 --rank 8 --steps 10 --out out/bench
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import visadapt
from visadapt.core import atomic_write_bytes, iter_adapted, site_from_module
from visadapt.core.budget import BudgetCounter, budget_field, count_adapter_params, match_budget
from visadapt.core.selection import layer_config

__all__ = ['main', 'parse_args', 'bench_model']

BASELINES = ('base', 'limit', 'peft', 'lycoris-locon', 'lycoris-locon-bypass', 'lycoris-tucker',
             'lycoris-tucker-bypass')
BASELINE_NAMES = {'base': 'base (frozen)', 'limit': 'weight-grad limit', 'peft': 'PEFT LoRA',
                  'lycoris-locon': 'LyCORIS LoCon', 'lycoris-locon-bypass': 'LyCORIS LoCon bypass',
                  'lycoris-tucker': 'LyCORIS Tucker', 'lycoris-tucker-bypass': 'LyCORIS Tucker bypass'}
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
PATH_TOLERANCE = 1.10  # auto must be within 10% of the faster forced path
CLEAR_GAP = 1.5  # per-layer path timing stops after 3 rounds when one path is this much slower


# ---- workloads --------------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """A model, its inputs and the layers every configuration adapts.

    Attributes:
        name: model key (``--models``).
        model: the base model (random init, on the bench device/dtype, train mode, frozen).
        inputs: positional forward arguments; ``inputs[0]`` requires grad.
        targets: names of the adapted layers (every Conv/Linear except the classifier), in model order.
        output: picks the tensor the loss is taken on from the model's output.
    """
    name: str
    model: nn.Module
    inputs: Tuple[torch.Tensor, ...]
    targets: List[str]
    output: Callable[[Any], torch.Tensor] = lambda out: out

    def forward(self, model: nn.Module, inputs: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        return self.output(model(*(self.inputs if inputs is None else inputs)))


def _adaptable(module: nn.Module) -> bool:
    try:
        site_from_module(module)
    except TypeError:
        return False
    return True


def _conv_linear_targets(model: nn.Module, skip: Sequence[str] = ()) -> List[str]:
    return [n for n, m in model.named_modules()
            if n and isinstance(m, (nn.Conv2d, nn.Linear)) and _adaptable(m)
            and not any(n == s or n.startswith(s + '.') for s in skip)]


def _timm_workload(key: str, arch: str, args: argparse.Namespace, **kwargs: Any) -> Workload:
    import timm
    model = timm.create_model(arch, pretrained=False, **kwargs)
    classifier = model.pretrained_cfg.get('classifier', 'head')
    skip = [classifier] if isinstance(classifier, str) else list(classifier)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    return Workload(key, model, (x,), _conv_linear_targets(model, skip))


def _unet_down_workload(key: str, args: argparse.Namespace) -> Workload:
    """SDXL's second down block (``down_blocks.1``: 320 → 640 channels, 2 transformer layers per resnet, 10 heads,
    cross-attention to 77 tokens of width 2048) on the latent of an ``--image-size`` image (size / 8)."""
    from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D
    block = CrossAttnDownBlock2D(in_channels=320, out_channels=640, temb_channels=1280, num_layers=2,
                                 transformer_layers_per_block=2, num_attention_heads=10, cross_attention_dim=2048,
                                 add_downsample=True, resnet_groups=32, use_linear_projection=True)
    side = args.image_size // 8
    inputs = (torch.randn(args.batch_size, 320, side, side), torch.randn(args.batch_size, 1280),
              torch.randn(args.batch_size, 77, 2048))
    return Workload(key, block, inputs, _conv_linear_targets(block), output=lambda out: out[0])


MODELS: Dict[str, Callable[[argparse.Namespace], Workload]] = {
    'convnext_atto': lambda a: _timm_workload('convnext_atto', 'convnext_atto', a),
    'convnext_tiny': lambda a: _timm_workload('convnext_tiny', 'convnext_tiny', a),
    'efficientnet_lite0': lambda a: _timm_workload('efficientnet_lite0', 'efficientnet_lite0', a),
    'vit_small': lambda a: _timm_workload('vit_small', 'vit_small_patch16_224', a, img_size=a.image_size),
    'unet_down': lambda a: _unet_down_workload('unet_down', a),
}


def build_workload(key: str, args: argparse.Namespace) -> Workload:
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        work = MODELS[key](args)
    dtype = DTYPES[args.dtype]
    work.model = work.model.to(device=args.device, dtype=dtype).train().requires_grad_(False)
    work.inputs = tuple(t.to(device=args.device, dtype=dtype) for t in work.inputs)
    work.inputs[0].requires_grad_(True)
    return work


# ---- configurations ----------------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One configuration of one model in the benchmark.

    Attributes:
        name: table label; kind: ``'base' | 'limit' | 'peft' | 'lycoris' | 'visadapt'``.
        model: its own deep copy of the base model, adapted; params: what gets gradients.
        optimizer: AdamW (foreach) over ``params`` (None for base and limit: no optimizer step).
        merge: folds the update into the weights and returns the module for merged inference (None: no inference row).
        extra: objects that hold trainable state outside ``model`` (the LyCORIS network).
        info: JSON facts (hyper-parameters, trainable count, notes).
    """
    name: str
    kind: str
    model: nn.Module
    params: List[nn.Parameter]
    optimizer: Optional[torch.optim.Optimizer]
    merge: Optional[Callable[[], nn.Module]] = None
    extra: List[nn.Module] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)
    step_s: List[float] = field(default_factory=list)
    infer_s: List[float] = field(default_factory=list)
    infer_model: Optional[nn.Module] = None
    layers: Optional[List[str]] = None


def _optimizer(params: List[nn.Parameter]) -> Optional[torch.optim.Optimizer]:
    # the multi-tensor (foreach) AdamW, PyTorch's default on CUDA, here on every device: the per-tensor loop would
    # charge methods with many small tensors (FLoRA: core + one factor per mode) for Python overhead, not compute
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, foreach=True) if params else None


def _trainable(*modules: nn.Module) -> List[nn.Parameter]:
    seen, out = set(), []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def build_base(work: Workload) -> Candidate:
    model = copy.deepcopy(work.model)
    return Candidate(BASELINE_NAMES['base'], 'base', model, [], None, merge=lambda: model,
                     info={'trainable': 0})


def build_limit(work: Workload) -> Candidate:
    model = copy.deepcopy(work.model)
    modules = dict(model.named_modules())
    for name in work.targets:
        modules[name].weight.requires_grad_(True)
    params = _trainable(model)
    return Candidate(BASELINE_NAMES['limit'], 'limit', model, params, None,
                     info={'trainable': sum(p.numel() for p in params),
                           'notes': ['dL/dW of every adapted layer, no optimizer step']})


def build_peft(work: Workload, rank: int) -> Candidate:
    import peft
    notes, targets = [], list(work.targets)
    for _ in range(2):
        model = copy.deepcopy(work.model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                wrapped = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
            break
        except ValueError as err:
            modules = dict(work.model.named_modules())
            grouped = [n for n in targets if getattr(modules[n], 'groups', 1) > 1]
            if not grouped or len(targets) != len(work.targets):
                raise
            notes.append(f'PEFT refuses {len(grouped)} grouped/depthwise conv(s) (left out): {str(err).strip()}')
            targets = [n for n in targets if n not in grouped]
    params = _trainable(model)
    return Candidate(BASELINE_NAMES['peft'], 'peft', model, params, _optimizer(params), layers=targets,
                     merge=lambda: wrapped.merge_and_unload(),
                     info={'trainable': sum(p.numel() for p in params), 'hyper': {'r': rank, 'lora_alpha': rank},
                           'layers': len(targets), 'notes': notes})


def build_lycoris(work: Workload, rank: int, tucker: bool, bypass: bool) -> Candidate:
    from lycoris import LycorisNetwork
    from lycoris.logging import logger as lycoris_logger
    model = copy.deepcopy(work.model)
    # the preset is class-level state in LyCORIS: target exactly our layers by name
    LycorisNetwork.apply_preset({'enable_conv': True, 'target_module': [], 'target_name': list(work.targets),
                                 'module_algo_map': {}, 'name_algo_map': {}, 'use_fnmatch': True, 'exclude_name': []})
    level = lycoris_logger.level
    lycoris_logger.setLevel('ERROR')
    try:
        network = LycorisNetwork(model, multiplier=1.0, lora_dim=rank, conv_lora_dim=rank, alpha=rank,
                                 conv_alpha=rank, use_tucker=tucker, network_module='locon', bypass_mode=bypass)
    finally:
        lycoris_logger.setLevel(level)
    network.apply_to()
    network.requires_grad_(True)
    params = _trainable(network)
    notes = []
    if len(network.loras) != len(work.targets):
        notes.append(f'LyCORIS adapted {len(network.loras)} of {len(work.targets)} layers')
    if bypass:
        forced = sum(1 for lora in network.loras if not lora.bypass_mode)
        if forced:
            notes.append(f'LyCORIS forces rebuild mode on {forced} grouped/depthwise conv(s)')

    def merge() -> nn.Module:
        network.restore()
        network.merge_to(1.0)
        return model

    key = f'lycoris-{"tucker" if tucker else "locon"}' + ('-bypass' if bypass else '')
    return Candidate(BASELINE_NAMES[key], 'lycoris', model, params, _optimizer(params), merge=merge, extra=[network],
                     info={'trainable': sum(p.numel() for p in params), 'layers': len(network.loras),
                           'hyper': {'algo': 'locon', 'dim': rank, 'alpha': rank, 'use_tucker': tucker,
                                     'bypass_mode': bypass}, 'notes': notes})


# ---- budget matching -------------------------------------------------------------------------------------------------
_SKIP_RE = re.compile(r"cannot adapt layer '([^']+)'")


def _config_for(method: str, targets: List[str], model: nn.Module, counter: BudgetCounter, **fields: Any
                ) -> Tuple[visadapt.AdapterConfig, List[str]]:
    """``method``'s config on the ``targets`` it can adapt; the layers it refuses are dropped and returned."""
    cls = visadapt.get_config_class(method)
    modules = dict(model.named_modules())
    kept = [n for n in targets if isinstance(modules[n], tuple(cls.supported_types))]
    skipped = [n for n in targets if n not in kept]
    while kept:
        config = cls(include=list(kept), **fields)
        try:
            counter(config)
            return config, skipped
        except (ValueError, TypeError) as err:
            hit = _SKIP_RE.search(str(err))
            if not hit or hit.group(1) not in kept:
                raise
            kept.remove(hit.group(1))
            skipped.append(hit.group(1))
    raise ValueError(f'{cls.method} cannot adapt any of the {len(targets)} target layers of this model')


#: methods whose budget knob needs a non-default setting: (config fields, knob). SVFT's default plain pattern has a
#: fixed count (one entry per singular value); its banded pattern SVFT_B^d grows with the band width d.
MATCH_PRESETS: Dict[str, Tuple[Dict[str, Any], str]] = {'svft': ({'pattern': 'banded'}, 'off_diag')}


def match_method(method: str, model: nn.Module, targets: List[str], budget: int, max_rank: int,
                 counter: BudgetCounter) -> Tuple[visadapt.AdapterConfig, int, List[str], str]:
    """``method``'s config on ``targets`` with its trainable count closest to ``budget`` (``visadapt.core.budget``).

    Methods without a rank keep their fixed count; full fine-tuning trains every parameter. Returns (config,
    trainable count, layers the method refused, how the count was set).
    """
    cls = visadapt.get_config_class(method)
    if not getattr(cls, 'adapts_layers', True):
        if getattr(cls, 'trains_all', False):
            config = cls()
            return config, count_adapter_params(model, config, 'trainable'), [], 'trains every parameter'
        raise ValueError(f'{cls.method} adapts no layer (it only trains train_modules)')
    fields, knob = MATCH_PRESETS.get(method.lower(), ({}, None))
    config, skipped = _config_for(method, targets, model, counter, **fields)
    if knob is None and budget_field(config) is None:
        return config, counter(config), skipped, 'fixed count (no rank to tune)'
    match = match_budget(model, config, budget, field=knob, max_value=max_rank, counter=counter)
    return match.config, match.achieved, skipped, f'{match.field}={match.value} ({100 * match.rel_error:+.1f}%)'


def _hyper(config: visadapt.AdapterConfig) -> Dict[str, Any]:
    skip = {'method', 'include', 'exclude', 'target_types', 'train_modules', 'rank_pattern', 'adapter_dtype'}
    return {k: v for k, v in config.to_dict().items() if k not in skip}


def build_visadapt(work: Workload, config: visadapt.AdapterConfig, skipped: List[str], how: str,
                   label: Optional[str] = None, targets: Optional[List[str]] = None) -> Candidate:
    model = copy.deepcopy(work.model)
    visadapt.inject(model, config, name='bench')
    params = _trainable(model)
    cls = type(config)
    adapts = getattr(cls, 'adapts_layers', True)
    # mergeability is per layer (BitFit cannot fold Δb into a layer without a bias)
    refused = [n for n, m in iter_adapted(model, 'bench') if not m.visadapt['bench'].mergeable]
    mergeable = adapts and not refused

    def merge() -> nn.Module:
        if mergeable:
            visadapt.merge(model, 'bench')
        return model

    notes = [f'not adapted ({len(skipped)}): ' + ', '.join(skipped[:4]) + (' ...' if len(skipped) > 4 else '')
             ] if skipped else []
    if adapts and not mergeable:
        notes.append(f'not mergeable on {len(refused)} layer(s) (e.g. {refused[0]}): the inference row is the '
                     f'unmerged model')
    targets = work.targets if targets is None else targets
    return Candidate(label or cls.method, 'visadapt', model, params, _optimizer(params), merge=merge,
                     info={'method': cls.method, 'trainable': sum(p.numel() for p in params), 'matched_by': how,
                           'hyper': _hyper(config), 'layers': len(targets) - len(skipped) if adapts else 0,
                           'notes': notes, 'merge_check': mergeable})


# ---- measurements ----------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def train_step(work: Workload, cand: Candidate) -> None:
    """Forward + backward (+ optimizer step): the unit every ratio is about."""
    if cand.optimizer is not None:
        cand.optimizer.zero_grad(set_to_none=True)
    else:
        for p in cand.params:
            p.grad = None
    work.inputs[0].grad = None
    loss = work.forward(cand.model).float().mean()
    loss.backward()
    if cand.optimizer is not None:
        cand.optimizer.step()


@contextlib.contextmanager
def _no_gc():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


CLOCKS = {'wall': time.perf_counter, 'cpu': time.process_time}
_clock = time.perf_counter


def time_round_robin(cands: List[Any], run: Callable[[Any], None], sink: Callable[[Any], List[float]],
                     warmup: int, steps: int, device: str) -> None:
    """Run every candidate once per repeat, rotating the starting one; keep the timings after ``warmup`` repeats."""
    with _no_gc():
        for rep in range(warmup + steps):
            k = rep % len(cands)
            for cand in cands[k:] + cands[:k]:
                _sync(device)
                t0 = _clock()
                run(cand)
                _sync(device)
                if rep >= warmup:
                    sink(cand).append(_clock() - t0)


def _storage_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def static_bytes(work: Workload, cand: Candidate) -> int:
    """Parameters, buffers, optimizer state and inputs held before a step."""
    tensors = [t for m in [cand.model, *cand.extra] for t in (*m.parameters(), *m.buffers())]
    if cand.optimizer is not None:
        tensors += [v for state in cand.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return _storage_bytes(tensors + list(work.inputs))


def _walk_profile(prof: torch.profiler.profile) -> Tuple[int, Dict[str, List[float]]]:
    """From the profiler's event tree: the high-water mark of bytes allocated minus freed during the profiled region
    (allocation events replayed in time order), and each op's self time (ns) and call count.

    Reads the raw event tree instead of ``prof.key_averages()``, which is an order of magnitude slower.
    """
    from torch._C._profiler import _EventType
    allocations, ops = [], {}
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
        elif node.tag == _EventType.TorchOp:
            child_ns = sum(c.duration_time_ns for c in node.children if c.tag == _EventType.TorchOp)
            entry = ops.setdefault(node.name, [0.0, 0])
            entry[0] += max(node.duration_time_ns - child_ns, 0)
            entry[1] += 1
        stack.extend(node.children)
    allocations.sort(key=lambda e: e[0])
    live = peak = 0
    for _, size in allocations:
        live += size
        peak = max(peak, live)
    return peak, ops


def memory_and_profile(work: Workload, cand: Candidate, device: str, top: int = 5) -> None:
    """One profiled training step: peak memory (see the module docstring) and the ops that dominate its time
    (self CPU time; on CUDA the host-side view, which is what the launch overheads show up in)."""
    gc.collect()
    if cand.optimizer is not None:
        cand.optimizer.zero_grad(set_to_none=True)
    static = static_bytes(work, cand)
    cuda = device.startswith('cuda')
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=not cuda) as prof:
        train_step(work, cand)
        _sync(device)
    step_peak, ops = _walk_profile(prof)
    if cuda:
        step_peak = torch.cuda.max_memory_allocated() - start
    total = sum(ns for ns, _ in ops.values()) or 1.0
    ranked = sorted(ops.items(), key=lambda kv: kv[1][0], reverse=True)[:top]
    cand.info['static_mb'] = static / 2 ** 20
    cand.info['peak_mb'] = (static + step_peak) / 2 ** 20
    cand.info['top_ops'] = [{'op': name, 'self_ms': ns / 1e6, 'share': ns / total, 'calls': calls}
                            for name, (ns, calls) in ranked]


def check_merge(work: Workload, cand: Candidate, rtol: float) -> None:
    """Merged output == unmerged output (relative to the output's scale); record the distance to the base output."""
    cand.model.eval()
    inputs = tuple(t.detach() for t in work.inputs)
    with torch.no_grad():
        adapted = work.forward(cand.model, inputs).float()
        if cand.info.get('merge_check'):
            with visadapt.adapters_disabled(cand.model, 'bench'):
                base = work.forward(cand.model, inputs).float()
            cand.info['delta_vs_base'] = (adapted - base).abs().max().item()
        cand.infer_model = cand.merge()
        cand.infer_model.eval()
        merged = work.forward(cand.infer_model, inputs).float()
    if cand.kind == 'base' or cand.info.get('merge_check') is False:
        return
    err = (merged - adapted).abs().max().item()
    scale = adapted.abs().max().item()
    cand.info['merge_max_abs_diff'] = err
    cand.info['merged_equals_unmerged'] = bool(err <= rtol * max(scale, 1.0))


# ---- per-layer path choice ---------------------------------------------------------------------------------------
def _layer_inputs(work: Workload) -> Dict[str, Tuple[int, ...]]:
    shapes: Dict[str, Tuple[int, ...]] = {}
    modules = dict(work.model.named_modules())

    def hook(name: str) -> Callable:
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


def _signature(module: nn.Module, shape: Tuple[int, ...]) -> Tuple:
    site = site_from_module(module)
    return (type(module).__name__, site.weight_shape, site.stride, site.padding, site.dilation, site.groups, shape)


def path_choice(work: Workload, method: str, config: visadapt.AdapterConfig, args: argparse.Namespace
                ) -> List[Dict[str, Any]]:
    """Time one training step of each distinct adapted layer with the weight path and the bypass, and ask ``auto``
    (same input, gradients on) which one it takes.

    Each path is timed ``--layer-steps`` to 4× that many times (``--layer-time`` per path), interleaved; a layer whose
    paths differ by more than ``CLEAR_GAP`` after the first 3 timings stops there (the verdict cannot change)."""
    shapes = _layer_inputs(work)
    modules = dict(work.model.named_modules())
    adapted = set(config.include or work.targets)
    groups: 'OrderedDict[Tuple, List[str]]' = OrderedDict()
    for name in work.targets:
        if name in adapted and name in shapes:
            groups.setdefault(_signature(modules[name], shapes[name]), []).append(name)
    rows = []
    for sig, names in list(groups.items())[:args.path_layers]:
        layer_cfg = layer_config(config, names[0])
        runs = {}
        for path in ('weight', 'bypass', 'auto'):  # auto is built to read its choice, not timed
            holder = nn.Sequential(OrderedDict(layer=copy.deepcopy(modules[names[0]])))
            cfg = dataclasses.replace(layer_cfg, include=['layer'], exclude=[], rank_pattern={}, train_modules=[],
                                      target_types=None, forward_path=path)
            try:
                visadapt.inject(holder, cfg, name='bench')
            except ValueError:  # e.g. a LoRA form without bypass on this layer
                runs = {}
                break
            adapter = holder.layer.visadapt['bench']
            if not (adapter.has_bypass and adapter.has_weight_path):
                runs = {}
                break
            params = _trainable(holder)
            runs[path] = {'layer': holder.layer, 'adapter': adapter, 'opt': _optimizer(params), 's': []}
        if not runs:
            continue
        dtype = DTYPES[args.dtype]
        x = torch.randn(sig[-1], device=args.device, dtype=dtype, requires_grad=True)
        with torch.no_grad():
            grad_out = torch.randn_like(runs['weight']['layer'](x))

        def run(path: str) -> None:
            r = runs[path]
            r['opt'].zero_grad(set_to_none=True)
            x.grad = None
            r['layer'](x).backward(grad_out)
            r['opt'].step()

        order = ['weight', 'bypass']
        first: Dict[str, List[float]] = {p: [] for p in order}
        time_round_robin(order, run, lambda p: first[p], args.warmup, 1, args.device)
        fastest = min(t[0] for t in first.values())
        reps = max(args.layer_steps, min(4 * args.layer_steps, int(args.layer_time / max(fastest, 1e-6))))
        time_round_robin(order, run, lambda p: runs[p]['s'], 0, min(reps, 3), args.device)
        ms = {p: statistics.median(runs[p]['s']) for p in order}
        if reps > 3 and max(ms.values()) <= CLEAR_GAP * min(ms.values()):
            time_round_robin(order, run, lambda p: runs[p]['s'], 0, reps - 3, args.device)
        with torch.enable_grad():
            chosen = 'bypass' if runs['auto']['adapter'].use_bypass(x) else 'weight'
        ms = {p: 1e3 * statistics.median(runs[p]['s']) for p in order}
        best = min(order, key=lambda p: ms[p])
        rows.append({'method': visadapt.get_config_class(method).method, 'layer': names[0], 'n_layers': len(names),
                     'type': sig[0], 'weight_shape': list(sig[1]), 'groups': sig[5], 'input_shape': list(sig[-1]),
                     'weight_ms': ms['weight'], 'bypass_ms': ms['bypass'], 'auto_path': chosen, 'best_path': best,
                     'chosen_vs_best': ms[chosen] / ms[best], 'steps': {p: len(runs[p]['s']) for p in order},
                     'ok': ms[chosen] <= PATH_TOLERANCE * ms[best]})
    return rows


# ---- one model ---------------------------------------------------------------------------------------------------------
def _methods(args: argparse.Namespace) -> Tuple[List[str], List[str]]:
    registered = sorted(visadapt.METHODS)
    wanted = [m.strip() for m in args.methods.split(',') if m.strip()]
    if wanted == ['all']:
        return list(BASELINES), registered
    bad = [m for m in wanted if m.lower() not in registered and m not in BASELINES and m != 'all']
    if bad:
        raise ValueError(f'--methods {bad} unknown; valid: all, baselines {list(BASELINES)}, '
                         f'methods {[visadapt.METHODS[k].method for k in registered]}')
    baselines = list(BASELINES) if 'all' in wanted else [b for b in BASELINES if b in wanted]
    methods = registered if 'all' in wanted else [m.lower() for m in wanted if m.lower() in registered]
    if 'base' not in baselines:  # every ratio is to the frozen base
        baselines.insert(0, 'base')
    return baselines, methods


def bench_model(key: str, args: argparse.Namespace, log: Callable[[str], None]) -> Dict[str, Any]:
    work = build_workload(key, args)
    baselines, methods = _methods(args)
    counter = BudgetCounter(work.model)
    if args.budget is not None:
        budget, budget_from = args.budget, f'--budget {args.budget}'
    else:
        config, _ = _config_for('lora', work.targets, work.model, counter, r=args.rank)
        budget, budget_from = counter(config), f'visadapt LoRA r={args.rank} on every target layer'
    log(f'[{key}] {len(work.targets)} target layers, budget {budget:,} trainable ({budget_from})')

    cands: List[Candidate] = []
    matched: Dict[str, visadapt.AdapterConfig] = {}
    for b in baselines:
        t0 = time.perf_counter()
        if b == 'base':
            cands.append(build_base(work))
        elif b == 'limit':
            cands.append(build_limit(work))
        elif b == 'peft':
            cands.append(build_peft(work, args.rank))
        else:
            cands.append(build_lycoris(work, args.rank, tucker='tucker' in b, bypass=b.endswith('bypass')))
        log(f'[{key}] built {cands[-1].name} ({time.perf_counter() - t0:.1f}s)')
    for m in methods:
        t0 = time.perf_counter()
        try:
            config, count, skipped, how = match_method(m, work.model, work.targets, budget, args.max_rank, counter)
        except (ValueError, TypeError) as err:
            log(f'[{key}] {m}: skipped ({err})')
            continue
        matched[m] = config
        cands.append(build_visadapt(work, config, skipped, how))
        log(f'[{key}] built {cands[-1].name}: {count:,} trainable, {_hyper(config)} ({time.perf_counter() - t0:.1f}s)')
    peft = next((c for c in cands if c.kind == 'peft'), None)
    if peft is not None and len(peft.layers) < len(work.targets):  # PEFT left layers out: compare on its layers too
        for m in [m.strip().lower() for m in args.on_peft_layers.split(',') if m.strip()]:
            config, count, skipped, how = match_method(m, work.model, peft.layers, peft.info['trainable'],
                                                       args.max_rank, counter)
            cands.append(build_visadapt(work, config, skipped, how + ' of PEFT LoRA',
                                        label=f'{type(config).method} (PEFT layers)', targets=peft.layers))
            log(f'[{key}] built {cands[-1].name}: {count:,} trainable, {_hyper(config)}')

    log(f'[{key}] timing {len(cands)} configurations: {args.warmup} warm-up + {args.steps} steps, round-robin')
    t0 = time.perf_counter()
    time_round_robin(cands, lambda c: train_step(work, c), lambda c: c.step_s, args.warmup, args.steps, args.device)
    log(f'[{key}] training steps done ({time.perf_counter() - t0:.1f}s)')
    for cand in cands:
        memory_and_profile(work, cand, args.device)
    rtol = 1e-4 if args.dtype == 'float32' else 2e-2
    infer = [c for c in cands if c.merge is not None]
    for cand in infer:
        check_merge(work, cand, rtol)
    inputs = tuple(t.detach() for t in work.inputs)

    def infer_step(cand: Candidate) -> None:
        with torch.no_grad():
            work.forward(cand.infer_model, inputs)

    time_round_robin(infer, infer_step, lambda c: c.infer_s, 1, args.steps, args.device)
    log(f'[{key}] memory, merge check and inference done')

    rows = _rows(cands)
    path_rows: List[Dict[str, Any]] = []
    if not args.no_path_choice:
        wanted = {m.strip().lower() for m in args.path_methods.split(',')}
        for m, config in matched.items():
            cls = visadapt.get_config_class(m)
            if ('all' in wanted or m in wanted) and cls.adapter_cls.has_bypass and cls.adapter_cls.has_weight_path:
                t0 = time.perf_counter()
                path_rows += path_choice(work, m, config, args)
                log(f'[{key}] path choice for {cls.method} ({time.perf_counter() - t0:.1f}s)')
    shapes = {n: list(t.shape) for n, t in zip(('x', 'temb', 'context'), work.inputs)}
    return {'model': key, 'batch_size': args.batch_size, 'image_size': args.image_size, 'inputs': shapes, 'targets': len(work.targets), 'budget': budget,
            'budget_from': budget_from, 'configs': rows, 'path_choice': path_rows}


def _rows(cands: List[Candidate]) -> List[Dict[str, Any]]:
    def med(xs: List[float]) -> Optional[float]:
        return 1e3 * statistics.median(xs) if xs else None

    ref = {c.kind: c for c in cands if c.kind in ('base', 'peft')}
    base_step, base_infer = med(ref['base'].step_s), med(ref['base'].infer_s)
    peft = ref.get('peft')
    rows = []
    for c in cands:
        step, infer = med(c.step_s), med(c.infer_s)
        row = {'name': c.name, 'kind': c.kind, **c.info, 'step_ms': step,
               'step_ms_all': [1e3 * s for s in c.step_s], 'step_vs_base': step / base_step,
               'step_vs_peft': step / med(peft.step_s) if peft else None,
               'peak_vs_base': c.info['peak_mb'] / ref['base'].info['peak_mb'],
               'peak_vs_peft': c.info['peak_mb'] / peft.info['peak_mb'] if peft else None,
               'infer_ms': infer, 'infer_vs_base': infer / base_infer if infer else None}
        row.setdefault('notes', [])
        rows.append(row)
    return rows


# ---- report --------------------------------------------------------------------------------------------------------------
def _fmt(value: Optional[float], spec: str, suffix: str = '') -> str:
    return '–' if value is None else format(value, spec) + suffix


TARGET_METHODS = ('FLoRA', 'SeRA', 'SVFT')


def _target_lines(model: Dict[str, Any]) -> List[str]:
    """Issue 8's targets for FLoRA, SeRA and SVFT on this model, each marked met (yes) or missed (no)."""
    rows = {r['name']: r for r in model['configs']}
    limit = rows.get(BASELINE_NAMES['limit'])
    picked = [r for r in model['configs'] if r['kind'] == 'visadapt' and r.get('method') in TARGET_METHODS]
    if not picked:
        return []

    def mark(value: Optional[float], ok: bool, spec: str = '.2f') -> str:
        return '–' if value is None else f"{value:{spec}}× {'yes' if ok else '**no**'}"

    lines = ['', f"Targets (issue 8) on {model['model']}:", '',
             '| method | step ≤ 1.00× PEFT | step ≤ 1.10× base | step < weight-grad limit | peak ≤ PEFT '
             '| merged infer 1.00× base (±5%) | merged = unmerged |', '|---|---|---|---|---|---|---|']
    for r in picked:
        vs_limit = r['step_ms'] / limit['step_ms'] if limit else None
        infer = r['infer_vs_base']
        equal = r.get('merged_equals_unmerged')
        lines.append('| ' + ' | '.join([
            r['name'], mark(r['step_vs_peft'], (r['step_vs_peft'] or 0) <= 1.0),
            mark(r['step_vs_base'], r['step_vs_base'] <= 1.10),
            mark(vs_limit, vs_limit is not None and vs_limit < 1.0),
            mark(r['peak_vs_peft'], (r['peak_vs_peft'] or 0) <= 1.0),
            mark(infer, infer is not None and abs(infer - 1.0) <= 0.05),
            '–' if equal is None else ('yes' if equal else '**no**')]) + ' |')
    return lines


def markdown(result: Dict[str, Any]) -> str:
    meta = result['meta']
    lines = ["# visadapt benchmark", '',
             f"`{meta['command']}`", '',
             f"Device: {meta['device_name']} ({meta['device']}, {meta['threads']} threads), dtype {meta['dtype']}, "
             f"torch {meta['versions']['torch']}, {meta['clock']} clock, {meta['date']}. Step = forward + backward + AdamW step, median of "
             f"{meta['steps']} steps after {meta['warmup']} warm-up, all configurations of a model interleaved. "
             f"Peak = memory held before the step + the step's allocation high-water mark ({meta['memory_method']}).",
             '']
    for model in result['models']:
        lines += [f"## {model['model']}", '',
                  f"Inputs {model['inputs']}; {model['targets']} adapted layers; budget {model['budget']:,} trainable "
                  f"({model['budget_from']}).", '',
                  '| configuration | trainable | step ms | × base | × PEFT | peak MB | mem × PEFT | merged infer ms '
                  '| × base | merged = unmerged | top op (share) |',
                  '|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---|']
        for r in model['configs']:
            equal = r.get('merged_equals_unmerged')
            top = r['top_ops'][0] if r.get('top_ops') else None
            lines.append('| ' + ' | '.join([
                r['name'], f"{r['trainable']:,}", _fmt(r['step_ms'], '.1f'), _fmt(r['step_vs_base'], '.2f', '×'),
                _fmt(r['step_vs_peft'], '.2f', '×'), _fmt(r['peak_mb'], '.0f'), _fmt(r['peak_vs_peft'], '.2f', '×'),
                _fmt(r['infer_ms'], '.1f'), _fmt(r['infer_vs_base'], '.2f', '×'),
                '–' if equal is None else ('yes' if equal else f"**NO** ({r['merge_max_abs_diff']:.2e})"),
                f"{top['op']} ({100 * top['share']:.0f}%)" if top else '–']) + ' |')
        notes = [(r['name'], n) for r in model['configs'] for n in r.get('notes', [])]
        hypers = [(r['name'], r['hyper']) for r in model['configs'] if r['kind'] == 'visadapt']
        if hypers:
            lines += ['', 'Matched hyper-parameters: ' + '; '.join(
                f"{n} " + ', '.join(f'{k}={v}' for k, v in h.items() if k not in ('method', 'adapter_dtype'))
                for n, h in hypers) + '.']
        if notes:
            lines += [''] + [f'- {n}: {text}' for n, text in notes]
        lines += _target_lines(model)
        if model['path_choice']:
            ok = sum(p['ok'] for p in model['path_choice'])
            lines += ['', f"### {model['model']}: forward-path choice per layer (one training step of the layer)", '',
                      f"`auto` picked a path within {100 * (PATH_TOLERANCE - 1):.0f}% of the faster forced path on "
                      f"{ok} of {len(model['path_choice'])} layers (ok: the chosen path's time ≤ "
                      f"{PATH_TOLERANCE:.2f}× the faster one).", '',
                      '| method | layer (×n) | weight | groups | input | weight ms | bypass ms | auto → '
                      '| chosen / best | ok |', '|---|---|---|---:|---|---:|---:|---|---:|:---:|']
            for p in model['path_choice']:
                lines.append('| ' + ' | '.join([
                    p['method'], f"{p['layer']} (×{p['n_layers']})", 'x'.join(map(str, p['weight_shape'])),
                    str(p['groups']), 'x'.join(map(str, p['input_shape'])), f"{p['weight_ms']:.2f}",
                    f"{p['bypass_ms']:.2f}", p['auto_path'], f"{p['chosen_vs_best']:.2f}",
                    'yes' if p['ok'] else '**no**']) + ' |')
        lines.append('')
    return '\n'.join(lines) + '\n'


def plot(result: Dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    models = result['models']
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 0.3 * max(len(m['configs']) for m in models) * len(models)
                                                     + 1.2 * len(models)), squeeze=False)
    colors = {'base': '#444444', 'limit': '#999999', 'peft': '#d62728', 'lycoris': '#ff7f0e', 'visadapt': '#1f77b4'}
    for row, model in zip(axes, models):
        names = [r['name'] for r in model['configs']][::-1]
        kinds = [r['kind'] for r in model['configs']][::-1]
        for ax, key, title in ((row[0], 'step_vs_base', 'training step × frozen base'),
                               (row[1], 'peak_vs_base', 'peak memory × frozen base')):
            values = [r[key] for r in model['configs']][::-1]
            ax.barh(names, values, color=[colors[k] for k in kinds])
            ax.axvline(1.0, color='black', lw=0.8)
            ax.set_title(f"{model['model']}: {title}", fontsize=9)
            ax.tick_params(labelsize=7)
            for y, v in enumerate(values):
                ax.text(v, y, f' {v:.2f}', va='center', fontsize=6)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix='.png', dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _meta(args: argparse.Namespace, argv: Sequence[str]) -> Dict[str, Any]:
    import importlib.metadata as md
    versions = {}
    for pkg in ('torch', 'timm', 'diffusers', 'peft', 'lycoris-lora'):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    if args.device.startswith('cuda'):
        name = torch.cuda.get_device_name(torch.device(args.device))
    else:
        name = platform.processor() or platform.machine()
        try:
            with open('/proc/cpuinfo') as f:
                name = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), name)
        except OSError:
            pass
        name = f'{name}, {os.cpu_count()} CPUs'
    return {'command': 'visadapt-bench ' + ' '.join(argv), 'device': args.device, 'device_name': name,
            'threads': torch.get_num_threads(), 'dtype': args.dtype, 'versions': versions,
            'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
            'steps': args.steps, 'warmup': args.warmup, 'clock': args.clock, 'batch_size': args.batch_size, 'image_size': args.image_size,
            'rank': args.rank, 'quick': args.quick,
            'memory_method': ('torch.cuda.max_memory_allocated' if args.device.startswith('cuda')
                              else 'torch.profiler allocation events')}


# ---- command line ------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', default='convnext_atto,convnext_tiny,efficientnet_lite0,vit_small,unet_down@2x64',
                   help=f'comma-separated NAME or NAME@BATCHxSIZE (overrides --batch-size/--image-size for that '
                        f'model), NAME from {sorted(MODELS)}')
    p.add_argument('--methods', default='all',
                   help=f'comma-separated visadapt methods and baselines {list(BASELINES)}, or all')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--image-size', type=int, default=128, help='input side (the UNet block gets size/8 latents)')
    p.add_argument('--rank', type=int, default=8, help='rank of PEFT LoRA, LyCORIS and the visadapt LoRA budget')
    p.add_argument('--budget', type=int, default=None, help='trainable-parameter budget (default: visadapt LoRA r)')
    p.add_argument('--max-rank', type=int, default=128, help='largest rank the budget matcher may choose')
    p.add_argument('--steps', type=int, default=10, help='timed steps per configuration (median)')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--layer-steps', type=int, default=10, help='minimum timed steps per layer in the path choice')
    p.add_argument('--layer-time', type=float, default=0.5, help='seconds aimed at per layer and path')
    p.add_argument('--on-peft-layers', default='FLoRA',
                   help='methods also run on exactly the layers PEFT LoRA accepts, at its trainable count '
                        '(when PEFT refuses some, e.g. depthwise convs); empty to skip')
    p.add_argument('--path-methods', default='FLoRA,SVFT',
                   help='methods whose per-layer forward-path choice is timed (those with both paths), or all')
    p.add_argument('--path-layers', type=int, default=None, help='time at most this many distinct layers per model')
    p.add_argument('--no-path-choice', action='store_true', help='skip the per-layer forward-path benchmark')
    p.add_argument('--device', default='cpu')
    p.add_argument('--dtype', default='float32', choices=sorted(DTYPES))
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch default)')
    p.add_argument('--clock', default='wall', choices=sorted(CLOCKS),
                   help="'wall' (default) or 'cpu': process CPU time, robust to other processes on a shared machine "
                        "when used with --threads 1 (with more threads it also counts their spin-waits)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='out/bench')
    p.add_argument('--quick', action='store_true',
                   help='smoke test: convnext_atto, batch 2, 32², 3 steps, 1 warm-up, 4 layers in the path choice '
                        '(flags given explicitly win)')
    args = p.parse_args(argv)
    if args.quick:  # smoke-test sizes, unless given explicitly
        quick = {'models': 'convnext_atto', 'batch_size': 2, 'image_size': 32, 'steps': 3, 'warmup': 1,
                 'layer_steps': 3, 'layer_time': 0.0, 'path_layers': 4}
        for name, value in quick.items():
            flag = '--' + name.replace('_', '-')
            if not any(a == flag or a.startswith(flag + '=') for a in argv):
                setattr(args, name, value)
    args.model_list = []
    for item in (m.strip() for m in args.models.split(',') if m.strip()):
        hit = re.fullmatch(r'([a-z0-9_]+)(?:@(\d+)x(\d+))?', item)
        if not hit or hit.group(1) not in MODELS:
            p.error(f'--models entry {item!r} is not valid; use NAME or NAME@BATCHxSIZE with NAME in {sorted(MODELS)}')
        batch = int(hit.group(2)) if hit.group(2) else args.batch_size
        size = int(hit.group(3)) if hit.group(3) else args.image_size
        if batch < 1 or size < 32 or size % 32:
            p.error(f'--models entry {item!r}: batch must be ≥ 1 and size a positive multiple of 32 '
                    f'(ConvNeXt/ViT/UNet strides), got batch {batch}, size {size}')
        args.model_list.append((hit.group(1), batch, size))
    if not args.model_list:
        p.error('--models is empty')
    if args.path_layers is not None and args.path_layers < 1:
        p.error(f'--path-layers must be ≥ 1, got {args.path_layers}')
    for name in ('batch_size', 'rank', 'steps', 'max_rank', 'layer_steps'):
        if getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be ≥ 1, got {getattr(args, name)}')
    if args.warmup < 0:
        p.error(f'--warmup must be ≥ 0, got {args.warmup}')
    if args.image_size < 32 or args.image_size % 32:
        p.error(f'--image-size must be a positive multiple of 32 (ConvNeXt/ViT/UNet strides), got {args.image_size}')
    if args.budget is not None and args.budget < 1:
        p.error(f'--budget must be ≥ 1, got {args.budget}')
    if args.clock == 'cpu' and args.device != 'cpu':
        p.error(f'--clock cpu measures host CPU time; use --clock wall with --device {args.device}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        p.error(f'--device {args.device} requested but CUDA is not available')
    try:
        torch.device(args.device)
    except RuntimeError:
        p.error(f'--device {args.device!r} is not a valid torch device')
    try:
        _methods(args)
    except ValueError as err:
        p.error(str(err))
    for flag, value, extra in (('--on-peft-layers', args.on_peft_layers, ()), ('--path-methods', args.path_methods,
                                                                            ('all',))):
        bad = [m for m in (v.strip() for v in value.split(',')) if m and m.lower() not in visadapt.METHODS
               and m not in extra]
        if bad:
            p.error(f'{flag} {bad} unknown; valid: {list(extra) + sorted(c.method for c in visadapt.METHODS.values())}')
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    global _clock
    _clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f'[{time.perf_counter() - start:7.1f}s] {msg}', flush=True)

    result = {'meta': _meta(args, argv), 'models': []}
    for key, batch, size in args.model_list:
        model_args = argparse.Namespace(**{**vars(args), 'batch_size': batch, 'image_size': size})
        result['models'].append(bench_model(key, model_args, log))
        gc.collect()
        # written after every model, so an interrupted run keeps what it measured
        result['meta']['wall_s'] = time.perf_counter() - start
        atomic_write_bytes(os.path.join(args.out, 'bench.json'), json.dumps(result, indent=1).encode())
        text = markdown(result)
        atomic_write_bytes(os.path.join(args.out, 'bench.md'), text.encode())
        plot(result, os.path.join(args.out, 'bench.png'))
    print(text)
    log(f'wrote {args.out}/bench.json, bench.md, bench.png')
    return result


if __name__ == '__main__':
    main()
