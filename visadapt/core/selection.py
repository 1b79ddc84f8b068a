"""Which layers a config adapts and which modules it trains fully: target selection, written once.

A pattern matches a module name if it equals it, is a dotted suffix of it (``'qkv'`` matches ``blocks.0.attn.qkv``),
or matches it as a shell glob, also as a suffix (``'stages.*.conv*'``). Every selection function raises ValueError,
naming the pattern and examples of module names, when a pattern selects nothing: a typo never silently adapts
nothing (or everything).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .layer import ADAPTER_ATTR, is_adapter_key

__all__ = ['matches', 'base_named_modules', 'select_targets', 'select_train_modules', 'train_entry_state',
           'train_entry_parameters', 'layer_config', 'slices_for', 'examples']

SliceSpec = Union[None, List[str], Dict[str, List[str]]]


def matches(name: str, pattern: str) -> bool:
    """True if module ``name`` matches ``pattern`` (exact, dotted suffix, or shell glob, also as a suffix)."""
    return (name == pattern or name.endswith('.' + pattern) or fnmatch.fnmatchcase(name, pattern)
            or fnmatch.fnmatchcase(name, '*.' + pattern))


def examples(names: Sequence[str], k: int = 6) -> str:
    """The first ``k`` non-empty names, quoted, for error messages."""
    names = [n for n in names if n]
    return ', '.join(repr(n) for n in names[:k]) + (', ...' if len(names) > k else '')


def base_named_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Named modules of the base model (adapter internals excluded)."""
    return [(n, m) for n, m in model.named_modules() if ADAPTER_ATTR not in n.split('.')]


def _check_include(modules, config, types) -> None:
    """Every include pattern must select at least one layer of a target type."""
    for pattern in config.include or []:
        hit = [(n, m) for n, m in modules if n and matches(n, pattern)]
        if not hit:
            raise ValueError(f'include pattern {pattern!r} matches no module; modules include '
                             f'{examples([n for n, _ in modules])}')
        if any(isinstance(m, types) for _, m in hit):
            continue
        kinds = sorted({type(m).__name__ for _, m in hit})
        inside = [n for n, m in modules if any(n.startswith(h + '.') for h, _ in hit) and isinstance(m, types)]
        if inside:  # a container (block, stage): patterns select layers, not everything under a module
            raise ValueError(f'include pattern {pattern!r} matches container module(s) of type(s) {kinds}, not '
                             f'layers; to adapt the layers inside use a glob such as {pattern + ".*"!r} '
                             f'(e.g. {examples(inside, 3)})')
        raise ValueError(f'include pattern {pattern!r} matches only modules of type(s) {kinds}, which '
                         f'{config.method} cannot adapt here; supported/selected types: '
                         f'{[t.__name__ for t in types]} (e.g. '
                         f'{examples([n for n, m in modules if isinstance(m, types)])})')


def _check_keys_hit(what: str, patterns, targets) -> None:
    for pattern in patterns:
        if not any(matches(n, pattern) for n, _ in targets):
            raise ValueError(f'{what} key {pattern!r} matches no adapted layer; adapted layers include '
                             f'{examples([n for n, _ in targets])}')


def _selected(name: str, module: nn.Module, config, types, trained: Sequence[str]) -> bool:
    """Does ``config`` pick layer ``name`` (before its per-module ``accepts`` filter)?"""
    if not name or not isinstance(module, types) or not isinstance(module, tuple(config.supported_types)):
        return False
    if any(name == t or name.startswith(t + '.') for t in trained):  # a fully trained module is not also adapted
        return False
    if config.include is not None and not any(matches(name, p) for p in config.include):
        return False
    return not any(matches(name, p) for p in config.exclude)


def select_targets(model: nn.Module, config) -> List[Tuple[str, nn.Module]]:
    """Layers ``config`` adapts, in model order. Raises ValueError for patterns that select nothing."""
    modules = base_named_modules(model)
    types = config.target_classes()
    _check_include(modules, config, types)
    for pattern in config.exclude:
        if not any(n and matches(n, pattern) for n, _ in modules):
            raise ValueError(f'exclude pattern {pattern!r} matches no module; modules include '
                             f'{examples([n for n, _ in modules])}')
    trained = [t for t in select_train_modules(model, config.train_modules) if t]
    targets, refused = [], []
    for name, module in modules:
        if _selected(name, module, config, types, trained):
            (targets if config.accepts(module) else refused).append((name, module))
    if not targets:
        raise ValueError(f'{config.method} selected no layer: no module of type(s) '
                         f'{[t.__name__ for t in types]} passes include={config.include} exclude={config.exclude}'
                         f'{f" (train_modules {trained} are trained fully, not adapted)" if trained else ""}'
                         f'{f"; {len(refused)} matching layers were refused: {config.refusal_note}" if refused else ""}')
    _check_keys_hit('rank_pattern', config.rank_pattern, targets)
    _check_keys_hit('slices', config.slices if isinstance(config.slices, dict) else (), targets)
    return targets


def select_train_modules(model: nn.Module, patterns: Sequence[str]) -> List[str]:
    """Names of the modules with parameters that ``patterns`` select (outermost of nested matches); a pattern that
    selects no module may name parameters held directly by a module (e.g. open_clip's root ``logit_scale``)."""
    modules = base_named_modules(model)
    params = [n for n, _ in model.named_parameters() if not is_adapter_key(n)]
    chosen: List[str] = []
    for pattern in patterns:
        hit = [n for n, m in modules if n and matches(n, pattern) and any(True for _ in m.parameters())]
        hit = hit or [n for n in params if matches(n, pattern)]
        if not hit:
            raise ValueError(f'train_modules pattern {pattern!r} matches no module with parameters; modules include '
                             f'{examples([n for n, _ in modules])} (and it names no parameter)')
        chosen += [n for n in hit if n not in chosen]
    return [n for n in chosen if not any(n.startswith(o + '.') for o in chosen if o != n)]


def train_entry_state(model: nn.Module, entry: str) -> Dict[str, torch.Tensor]:
    """The state of one ``train_modules`` entry under the model's own keys: a module's state (adapter tensors left
    out; ``''`` is the whole model) or one parameter. The tensors share storage with the model."""
    try:
        module = model.get_submodule(entry)
    except AttributeError:
        return {entry: model.get_parameter(entry).detach()}
    prefix = f'{entry}.' if entry else ''
    return {prefix + k: v for k, v in module.state_dict().items() if not is_adapter_key(k)}


def train_entry_parameters(model: nn.Module, entry: str) -> List[nn.Parameter]:
    """The parameters one ``train_modules`` entry trains."""
    try:
        return list(model.get_submodule(entry).parameters())
    except AttributeError:
        return [model.get_parameter(entry)]


def layer_config(config, name: str):
    """``config`` for layer ``name``: the first matching ``rank_pattern`` entry applied."""
    for pattern, r in config.rank_pattern.items():
        if matches(name, pattern):
            return dataclasses.replace(config, r=r, rank_pattern={})
    return config


def slices_for(slices: SliceSpec, layer_name: str) -> Optional[List[str]]:
    """The q/k/v slices to adapt in layer ``layer_name`` (None: adapt the whole layer)."""
    if slices is None or isinstance(slices, list):
        return slices
    return next((value for pattern, value in slices.items() if matches(layer_name, pattern)), None)
