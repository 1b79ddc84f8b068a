"""The configurations of one model: the frozen base, the weight-gradient limit, PEFT LoRA, LyCORIS LoCon/Tucker and
every registered visadapt method at a matched trainable budget (``visadapt.core.budget``), each a deep copy of the
base model with its own optimizer.
"""
from __future__ import annotations

import argparse
import copy
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import visadapt
from visadapt.core import iter_adapted
from visadapt.core.budget import BudgetCounter, budget_field, count_adapter_params, match_budget

from .workloads import Workload

__all__ = ['BASELINES', 'BASELINE_NAMES', 'OPTIMIZERS', 'Candidate', 'make_optimizer', 'trainable', 'check_optimizer',
           'selected', 'match_method', 'hyper', 'build_candidates', 'model_budget']

BASELINES = ('base', 'limit', 'peft', 'lycoris-locon', 'lycoris-locon-bypass', 'lycoris-tucker',
             'lycoris-tucker-bypass')
BASELINE_NAMES = {'base': 'base (frozen)', 'limit': 'weight-grad limit', 'peft': 'PEFT LoRA',
                  'lycoris-locon': 'LyCORIS LoCon', 'lycoris-locon-bypass': 'LyCORIS LoCon bypass',
                  'lycoris-tucker': 'LyCORIS Tucker', 'lycoris-tucker-bypass': 'LyCORIS Tucker bypass'}
#: ``--optimizer`` → torch.optim.AdamW keyword: one fused kernel for all tensors, the multi-tensor (foreach) loop, or
#: the per-tensor for-loop. Fused is the fastest wherever PyTorch has it (CPU and CUDA): on a few hundred small
#: adapter tensors the per-tensor loop charges a method for Python overhead, not compute.
OPTIMIZERS = {'fused': {'fused': True}, 'foreach': {'foreach': True}, 'loop': {'foreach': False, 'fused': False}}


@dataclass
class Candidate:
    """One configuration of one model in the benchmark.

    Attributes:
        name: table label; kind: ``'base' | 'limit' | 'peft' | 'lycoris' | 'visadapt'``.
        model: its own deep copy of the base model, adapted; params: what gets gradients.
        optimizer: AdamW (``--optimizer``) over ``params`` (None for base and limit: no optimizer step).
        merge: folds the update into the weights and returns the module for merged inference (None: no inference row).
        extra: objects that hold trainable state outside ``model`` (the LyCORIS network).
        info: JSON facts (hyper-parameters, trainable count, notes, measurements).
        key: the ``--methods`` / ``--profile`` name of the configuration (``base``, ``limit``, ``peft``, a method).
        layers: the layers it adapts (PEFT: the ones it accepted).
    """
    name: str
    kind: str
    model: nn.Module
    params: List[nn.Parameter]
    optimizer: Optional[torch.optim.Optimizer]
    merge: Optional[Callable[[], nn.Module]] = None
    extra: List[nn.Module] = field(default_factory=list)
    info: Dict[str, Any] = field(default_factory=dict)
    key: str = ''
    layers: Optional[List[str]] = None
    step_s: List[float] = field(default_factory=list)
    compiled_step_s: List[float] = field(default_factory=list)
    infer_s: List[float] = field(default_factory=list)
    infer_model: Optional[nn.Module] = None
    compiled: Optional[nn.Module] = None


def check_optimizer(kind: str, device: str) -> None:
    """Raise ValueError when ``--optimizer kind`` cannot run on ``device`` (fused AdamW exists only on some)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f'--optimizer {kind!r} is not valid; use one of {sorted(OPTIMIZERS)}')
    if kind == 'fused':
        from .._optim import fused_device_types
        supported = fused_device_types()
        if torch.device(device).type not in supported:
            raise ValueError(f"--optimizer fused: PyTorch {torch.__version__} has no fused AdamW on "
                             f"{torch.device(device).type} (it has {supported}); use --optimizer foreach")


def make_optimizer(params: List[nn.Parameter], kind: str) -> Optional[torch.optim.Optimizer]:
    """AdamW (lr 1e-3, no weight decay) in the ``--optimizer`` implementation; None when nothing trains."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, **OPTIMIZERS[kind]) if params else None


def trainable(*modules: nn.Module) -> List[nn.Parameter]:
    """The parameters that require grad, each once, in module order."""
    seen, out = set(), []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _count(params: List[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def build_base(work: Workload, optimizer: str) -> Candidate:
    model = copy.deepcopy(work.model)
    return Candidate(BASELINE_NAMES['base'], 'base', model, [], None, merge=lambda: model, key='base',
                     info={'trainable': 0})


def build_limit(work: Workload, optimizer: str) -> Candidate:
    model = copy.deepcopy(work.model)
    modules = dict(model.named_modules())
    for name in work.targets:
        modules[name].weight.requires_grad_(True)
    params = trainable(model)
    return Candidate(BASELINE_NAMES['limit'], 'limit', model, params, None, key='limit', layers=list(work.targets),
                     info={'trainable': _count(params), 'notes': ['dL/dW of every adapted layer, no optimizer step']})


def build_peft(work: Workload, rank: int, optimizer: str) -> Candidate:
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
    params = trainable(model)
    return Candidate(BASELINE_NAMES['peft'], 'peft', model, params, make_optimizer(params, optimizer), layers=targets,
                     merge=lambda: wrapped.merge_and_unload(), key='peft',
                     info={'trainable': _count(params), 'hyper': {'r': rank, 'lora_alpha': rank},
                           'layers': len(targets), 'notes': notes})


def build_lycoris(work: Workload, key: str, rank: int, optimizer: str) -> Candidate:
    from lycoris import LycorisNetwork
    from lycoris.logging import logger as lycoris_logger
    tucker, bypass = 'tucker' in key, key.endswith('bypass')
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
    network.to(device=work.inputs[0].device)
    network.requires_grad_(True)
    params = trainable(network)
    notes = []
    if len(network.loras) != len(work.targets):
        notes.append(f'LyCORIS adapted {len(network.loras)} of {len(work.targets)} layers')
    forced = sum(1 for lora in network.loras if not lora.bypass_mode) if bypass else 0
    if forced:
        notes.append(f'LyCORIS forces rebuild mode on {forced} grouped/depthwise conv(s)')

    def merge() -> nn.Module:
        network.restore()
        network.merge_to(1.0)
        return model

    return Candidate(BASELINE_NAMES[key], 'lycoris', model, params, make_optimizer(params, optimizer), merge=merge,
                     extra=[network], key=key, layers=list(work.targets),
                     info={'trainable': _count(params), 'layers': len(network.loras),
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


def model_budget(work: Workload, args: argparse.Namespace, counter: BudgetCounter) -> Tuple[int, str]:
    """The trainable budget every method is matched to: ``--budget``, else visadapt LoRA r=``--rank`` on all
    targets."""
    if args.budget is not None:
        return args.budget, f'--budget {args.budget}'
    config, _ = _config_for('lora', work.targets, work.model, counter, r=args.rank)
    return counter(config), f'visadapt LoRA r={args.rank} on every target layer'


def hyper(config: visadapt.AdapterConfig) -> Dict[str, Any]:
    skip = {'method', 'include', 'exclude', 'target_types', 'train_modules', 'rank_pattern', 'adapter_dtype'}
    return {k: v for k, v in config.to_dict().items() if k not in skip}


def build_visadapt(work: Workload, config: visadapt.AdapterConfig, skipped: List[str], how: str, optimizer: str,
                   label: Optional[str] = None, targets: Optional[List[str]] = None) -> Candidate:
    model = copy.deepcopy(work.model)
    visadapt.inject(model, config, name='bench')
    params = trainable(model)
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
    layers = [n for n in targets if n not in skipped] if adapts else []
    return Candidate(label or cls.method, 'visadapt', model, params, make_optimizer(params, optimizer), merge=merge,
                     key=label or cls.method, layers=layers,
                     info={'method': cls.method, 'trainable': _count(params), 'matched_by': how,
                           'hyper': hyper(config), 'layers': len(layers), 'notes': notes, 'merge_check': mergeable})


# ---- all configurations of a model -----------------------------------------------------------------------------------
def selected(args: argparse.Namespace) -> Tuple[List[str], List[str]]:
    """(baselines, visadapt method keys) that ``--methods`` asks for; ``base`` is always in (every ratio is to it).

    Raises ValueError naming unknown entries."""
    registered = sorted(visadapt.METHODS)
    wanted = [m.strip() for m in args.methods.split(',') if m.strip()]
    bad = [m for m in wanted if m.lower() not in registered and m not in BASELINES and m != 'all']
    if bad:
        raise ValueError(f'--methods {bad} unknown; valid: all, baselines {list(BASELINES)}, '
                         f'methods {[visadapt.METHODS[k].method for k in registered]}')
    baselines = list(BASELINES) if 'all' in wanted else [b for b in BASELINES if b in wanted]
    methods = registered if 'all' in wanted else [m.lower() for m in wanted if m.lower() in registered]
    if 'base' not in baselines:
        baselines.insert(0, 'base')
    return baselines, methods


def _build_baseline(key: str, work: Workload, args: argparse.Namespace) -> Candidate:
    if key == 'base':
        return build_base(work, args.optimizer)
    if key == 'limit':
        return build_limit(work, args.optimizer)
    if key == 'peft':
        return build_peft(work, args.rank, args.optimizer)
    return build_lycoris(work, key, args.rank, args.optimizer)


def build_candidates(work: Workload, args: argparse.Namespace, budget: int, counter: BudgetCounter,
                     log: Callable[[str], None]) -> Tuple[List[Candidate], Dict[str, visadapt.AdapterConfig]]:
    """Every configuration ``--methods`` asks for (baselines first, then methods in registry order, then the
    ``--on-peft-layers`` methods on PEFT's own layers when PEFT left some out); and each method's matched config."""
    baselines, methods = selected(args)
    cands: List[Candidate] = []
    matched: Dict[str, visadapt.AdapterConfig] = {}
    for key in baselines:
        t0 = time.perf_counter()
        cands.append(_build_baseline(key, work, args))
        log(f'[{work.name}] built {cands[-1].name} ({time.perf_counter() - t0:.1f}s)')
    for m in methods:
        t0 = time.perf_counter()
        try:
            config, count, skipped, how = match_method(m, work.model, work.targets, budget, args.max_rank, counter)
        except (ValueError, TypeError) as err:
            log(f'[{work.name}] {m}: skipped ({err})')
            continue
        matched[m] = config
        cands.append(build_visadapt(work, config, skipped, how, args.optimizer))
        log(f'[{work.name}] built {cands[-1].name}: {count:,} trainable, {hyper(config)} '
            f'({time.perf_counter() - t0:.1f}s)')
    peft = next((c for c in cands if c.kind == 'peft'), None)
    if peft is not None and len(peft.layers) < len(work.targets):  # PEFT left layers out: compare on its layers too
        for m in [m.strip().lower() for m in args.on_peft_layers.split(',') if m.strip()]:
            config, count, skipped, how = match_method(m, work.model, peft.layers, peft.info['trainable'],
                                                       args.max_rank, counter)
            cands.append(build_visadapt(work, config, skipped, how + ' of PEFT LoRA', args.optimizer,
                                        label=f'{type(config).method} (PEFT layers)', targets=peft.layers))
            log(f'[{work.name}] built {cands[-1].name}: {count:,} trainable, {hyper(config)}')
    return cands, matched
