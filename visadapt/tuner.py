"""The model-level API: inject, merge, unmerge, remove, enable/disable, summary.

Written once for every method; methods only provide per-layer adapters (see :mod:`visadapt.adapter`). Every
function validates first and modifies the model only when nothing can fail any more, so an error leaves the model
exactly as it was.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .config import AdapterConfig, check_adapter_name, matches
from .attention import sync_attention
from .layer import ADAPTER_ATTR, attach, detach, is_adapted, iter_adapted
from .site import SUPPORTED_LAYER_TYPES, site_from_module

__all__ = ['inject', 'merge', 'unmerge', 'remove', 'enable_adapter', 'disable_adapter', 'adapters_disabled',
           'summary', 'InjectReport', 'get_injection', 'adapter_names', 'count_parameters']

STATE_ATTR = '_visadapt_injections'


@dataclass
class Injection:
    """What ``inject`` did, kept on the model so save/remove can undo or reproduce it."""
    config: AdapterConfig
    layers: List[str]
    train_modules: List[str]
    requires_grad_before: Dict[str, bool] = field(repr=False, default_factory=dict)


@dataclass
class InjectReport:
    name: str
    method: str
    layers: List[str]
    trainable: int
    total: int
    adapter_params: int

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        return (f'visadapt: {self.method} adapter {self.name!r} on {len(self.layers)} layers; trainable '
                f'{self.trainable:,} / {self.total:,} parameters ({pct:.3f}%), of which adapter {self.adapter_params:,}')


def _injections(model: nn.Module) -> Dict[str, Injection]:
    return model.__dict__.setdefault(STATE_ATTR, {})


def get_injection(model: nn.Module, name: str) -> Injection:
    injections = _injections(model)
    if name not in injections:
        raise ValueError(f'no adapter named {name!r} in this model; adapters present: {sorted(injections) or "none"}')
    return injections[name]


def adapter_names(model: nn.Module) -> List[str]:
    return list(_injections(model))


def _base_named_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Named modules of the base model (adapter internals excluded)."""
    return [(n, m) for n, m in model.named_modules() if ADAPTER_ATTR not in n.split('.')]


def _examples(names: Sequence[str], k: int = 6) -> str:
    names = [n for n in names if n]
    return ', '.join(repr(n) for n in names[:k]) + (', ...' if len(names) > k else '')


def select_targets(model: nn.Module, config: AdapterConfig) -> List[Tuple[str, nn.Module]]:
    """Layers ``config`` selects, in model order. Raises ValueError for patterns that select nothing."""
    modules = _base_named_modules(model)
    types = config.target_classes()
    supported = tuple(config.supported_types)
    for pattern in config.include or []:  # every include pattern must select at least one layer
        hit = [(n, m) for n, m in modules if n and matches(n, pattern)]
        if not hit:
            raise ValueError(f'include pattern {pattern!r} matches no module; modules include '
                             f'{_examples([n for n, _ in modules])}')
        if not any(isinstance(m, types) for _, m in hit):
            kinds = sorted({type(m).__name__ for _, m in hit})
            inside = [n for n, m in modules if any(n.startswith(h + '.') for h, _ in hit) and isinstance(m, types)]
            if inside:  # a container (block, stage): patterns select layers, not everything under a module
                raise ValueError(f'include pattern {pattern!r} matches container module(s) of type(s) {kinds}, not '
                                 f'layers; to adapt the layers inside use a glob such as {pattern + ".*"!r} '
                                 f'(e.g. {_examples(inside, 3)})')
            raise ValueError(f'include pattern {pattern!r} matches only modules of type(s) {kinds}, which '
                             f'{config.method} cannot adapt here; supported/selected types: '
                             f'{[t.__name__ for t in types]} (e.g. {_examples([n for n, m in modules if isinstance(m, types)])})')
    for pattern in config.exclude:
        if not any(n and matches(n, pattern) for n, _ in modules):
            raise ValueError(f'exclude pattern {pattern!r} matches no module; modules include '
                             f'{_examples([n for n, _ in modules])}')
    # a fully trained module (e.g. the classifier) is not also adapted: its weights are trained directly
    trained = [t for t in _select_train_modules(model, config.train_modules) if t]
    targets, refused = [], []
    for n, m in modules:
        if not n or not isinstance(m, types):
            continue
        if any(n == t or n.startswith(t + '.') for t in trained):
            continue
        if config.include is not None and not any(matches(n, p) for p in config.include):
            continue
        if any(matches(n, p) for p in config.exclude):
            continue
        if not isinstance(m, supported):
            continue
        if not config.accepts(m):
            refused.append(n)
            continue
        targets.append((n, m))
    if not targets:
        raise ValueError(f'{config.method} selected no layer: no module of type(s) '
                         f'{[t.__name__ for t in types]} passes include={config.include} exclude={config.exclude}'
                         f'{f" (train_modules {trained} are trained fully, not adapted)" if trained else ""}'
                         f'{f"; {len(refused)} matching layers were refused: {config.refusal_note}" if refused else ""}')
    for pattern in config.rank_pattern:
        if not any(matches(n, pattern) for n, _ in targets):
            raise ValueError(f'rank_pattern key {pattern!r} matches no adapted layer; adapted layers include '
                             f'{_examples([n for n, _ in targets])}')
    for pattern in config.slices if isinstance(config.slices, dict) else ():
        if not any(matches(n, pattern) for n, _ in targets):
            raise ValueError(f'slices key {pattern!r} matches no adapted layer; adapted layers include '
                             f'{_examples([n for n, _ in targets])}')
    return targets


def _select_train_modules(model: nn.Module, patterns: Sequence[str]) -> List[str]:
    modules = _base_named_modules(model)
    chosen: List[str] = []
    for pattern in patterns:
        hit = [n for n, m in modules if n and matches(n, pattern) and any(True for _ in m.parameters())]
        if not hit:
            raise ValueError(f'train_modules pattern {pattern!r} matches no module with parameters; modules include '
                             f'{_examples([n for n, _ in modules])}')
        chosen += [n for n in hit if n not in chosen]
    # keep only the outermost of nested matches
    return [n for n in chosen if not any(n.startswith(o + '.') for o in chosen if o != n)]


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _freeze_base(model: nn.Module) -> None:
    """Freeze every parameter that is not an adapter's (adapters keep their own flags)."""
    adapter_param_ids = {id(p) for _, m in iter_adapted(model) for p in m.visadapt.parameters()}
    for p in model.parameters():
        if id(p) not in adapter_param_ids:
            p.requires_grad_(False)


def _unfreeze_train_modules(model: nn.Module) -> None:
    """Make the train_modules of every injected adapter trainable."""
    modules = dict(model.named_modules())
    for injection in _injections(model).values():
        for n in injection.train_modules:
            for p in modules[n].parameters():
                p.requires_grad_(True)


def inject(model: nn.Module, config: AdapterConfig, name: str = 'default') -> InjectReport:
    """Adapt ``model`` in place with ``config`` under adapter ``name``.

    All base parameters are frozen except the ``train_modules``; the new adapter's parameters are trainable.
    Base parameter names are unchanged. Raises ValueError/TypeError (and changes nothing) on bad input.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f'config must be an AdapterConfig (e.g. visadapt.FLoRAConfig(...)), got {type(config).__name__}')
    check_adapter_name(name)
    if name in _injections(model) or any(name in m.visadapt for _, m in iter_adapted(model)):
        raise ValueError(f'an adapter named {name!r} is already injected; pick another name or remove it first '
                         f'(present: {adapter_names(model)})')
    targets = select_targets(model, config) if config.adapts_layers else []
    train_modules = [''] if config.trains_all else _select_train_modules(model, config.train_modules)
    # build everything before touching the model, so a failing layer leaves it unchanged
    built = []
    for layer_name, module in targets:
        try:
            adapter = config.for_layer(layer_name).build_adapter(layer_name, module)
        except (ValueError, TypeError) as err:
            raise type(err)(f'cannot adapt layer {layer_name!r}: {err} (leave it out with '
                            f'exclude=[{layer_name!r}])') from None
        built.append((layer_name, module, adapter))

    requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        _freeze_base(model)
        for layer_name, module, adapter in built:
            attach(module, name, adapter)
            for p in adapter.parameters():
                p.requires_grad_(True)
        sync_attention(model)  # an adapted out_proj of nn.MultiheadAttention needs its attention module converted
        _injections(model)[name] = Injection(config, [n for n, _, _ in built], train_modules, requires_grad_before)
        _unfreeze_train_modules(model)
    except BaseException:  # not expected after validation; still, never leave a half-injected model behind
        _injections(model).pop(name, None)
        for _, module, _ in built:
            if is_adapted(module) and name in module.visadapt:
                detach(module, name)
        sync_attention(model)
        if not _injections(model):
            model.__dict__.pop(STATE_ATTR, None)
        for n, p in model.named_parameters():
            if n in requires_grad_before:
                p.requires_grad_(requires_grad_before[n])
        raise
    trainable, total = count_parameters(model)
    adapter_params = sum(a.num_trainable() for _, _, a in built)
    return InjectReport(name, config.method, [n for n, _, _ in built], trainable, total, adapter_params)


def _layers_for(model: nn.Module, name: Optional[str]) -> List[Tuple[str, nn.Module, List[str]]]:
    names = [name] if name is not None else adapter_names(model)
    for n in names:
        get_injection(model, n)
    out = []
    for layer_name, module in iter_adapted(model):
        sel = [n for n in module.visadapt.keys() if n in names]
        if sel:
            out.append((layer_name, module, sel))
    return out


@torch.no_grad()
def merge(model: nn.Module, name: Optional[str] = None) -> None:
    """Fold adapter ``name`` (default: all enabled ones) into the base weights; forward then costs exactly the base."""
    layers = _layers_for(model, name)
    owners: Dict[int, List[str]] = {}  # parameter → the modules holding it (tied weights have several)
    for mod_name, mod in _base_named_modules(model):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), []).append(mod_name)
    for layer_name, module, names in layers:  # validate everything first
        for n in names:
            if not module.visadapt[n].mergeable:
                raise ValueError(f'adapter {n!r} on layer {layer_name!r} cannot be merged '
                                 f'({type(module.visadapt[n]).__name__}: {module.visadapt[n].why_not_mergeable()})')
        weight = module._parameters.get('weight')
        tied = [o for o in owners.get(id(weight), []) if o != layer_name] if weight is not None else []
        if tied and any(n not in module._va_merged and n not in module._va_disabled for n in names):
            raise ValueError(f'layer {layer_name!r} shares its weight with {tied} (tied weights): merging adapter(s) '
                             f'{names} into it would change those modules too; keep the adapter unmerged')
    for _, module, names in layers:
        for n in names:
            if n not in module._va_merged and n not in module._va_disabled:
                _merge_one(module, n)


@torch.no_grad()
def unmerge(model: nn.Module, name: Optional[str] = None) -> None:
    """Undo :func:`merge` for adapter ``name`` (default: all), restoring the base weights."""
    for _, module, names in _layers_for(model, name):
        for n in reversed(list(module._va_merged)):
            if n in names:
                _unmerge_single(module, n)


def _unmerge_single(module: nn.Module, n: str) -> None:
    # adapters merged after n are taken out first, so each inverse sees the weight it produced
    later = module._va_merged[module._va_merged.index(n) + 1:]
    for m in reversed(later):
        _unmerge_one(module, m)
    _unmerge_one(module, n)
    for m in later:
        _merge_one(module, m)


def _unmerge_one(module: nn.Module, n: str) -> None:
    adapter = module.visadapt[n]
    module.weight.copy_(adapter.restored_weight(module.weight))
    if module.bias is not None:
        module.bias.copy_(adapter.restored_bias(module.bias))
    module._va_merged.remove(n)


def _merge_one(module: nn.Module, n: str) -> None:
    adapter = module.visadapt[n]
    module.weight.copy_(adapter.adapted_weight(module.weight))
    if module.bias is not None:
        module.bias.copy_(adapter.adapted_bias(module.bias))
    module._va_merged.append(n)


def remove(model: nn.Module, name: Optional[str] = None, merge_weights: bool = False) -> None:
    """Take adapter ``name`` (default: all) out of the model.

    With ``merge_weights=False`` the base weights are restored (merged adapters are unmerged first) and every
    adapted layer gets its original class back, so the model is the original model. With ``merge_weights=True`` the
    update is baked into the weights ("merge and unload").
    """
    names = [name] if name is not None else adapter_names(model)
    layers = _layers_for(model, name)
    if merge_weights:
        merge(model, name)
    else:
        unmerge(model, name)
    # the first injection holds the user's requires_grad flags from before any adapter
    original_flags = next(iter(_injections(model).values())).requires_grad_before
    for n in names:
        _injections(model).pop(n)
        for _, module, sel in layers:
            if n in sel:
                if n in module._va_merged:
                    module._va_merged.remove(n)
                detach(module, n)
    sync_attention(model)
    params = dict(model.named_parameters())
    if _injections(model):  # others remain: base frozen except their train_modules; they keep the original flags
        next(iter(_injections(model).values())).requires_grad_before = original_flags
        _freeze_base(model)
        _unfreeze_train_modules(model)
    else:  # last adapter gone: restore the user's requires_grad flags
        for pname, flag in original_flags.items():
            if pname in params:
                params[pname].requires_grad_(flag)
        model.__dict__.pop(STATE_ATTR, None)


def _set_enabled(model: nn.Module, name: Optional[str], enabled: bool) -> None:
    for _, module, names in _layers_for(model, name):
        for n in names:
            if enabled:
                module._va_disabled.discard(n)
            else:
                if n in module._va_merged:  # a disabled adapter must not stay folded into the weight
                    with torch.no_grad():
                        _unmerge_single(module, n)
                module._va_disabled.add(n)


def enable_adapter(model: nn.Module, name: Optional[str] = None) -> None:
    _set_enabled(model, name, True)


def disable_adapter(model: nn.Module, name: Optional[str] = None) -> None:
    """Switch adapter ``name`` (default: all) off: the layers compute the base output (merged ones are unmerged)."""
    _set_enabled(model, name, False)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module, name: Optional[str] = None) -> Iterator[None]:
    """Context manager: run the base model (e.g. a reference forward) and re-enable afterwards.

    Adapters that were merged on entry (disabling unmerges them) are merged again on exit.
    """
    layers = _layers_for(model, name)
    before = {id(m): set(m._va_disabled) for _, m, _ in layers}
    merged = {id(m): list(m._va_merged) for _, m, _ in layers}
    disable_adapter(model, name)
    try:
        yield
    finally:
        with torch.no_grad():
            for _, module, _ in layers:
                module._va_disabled = before[id(module)]
                for n in merged[id(module)]:
                    if n not in module._va_merged:
                        _merge_one(module, n)


@dataclass
class Summary:
    rows: List[Dict[str, object]]
    trainable: int
    total: int

    def __str__(self) -> str:
        head = ('layer', 'adapter', 'method', 'weight shape', 'path', 'trainable')
        body = [(r['layer'], r['adapter'], r['method'], 'x'.join(map(str, r['weight_shape'])), r['path'],
                 f"{r['trainable']:,}") for r in self.rows]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
        fmt = '  '.join('{:<%d}' % w for w in widths)
        lines = [fmt.format(*head), fmt.format(*('-' * w for w in widths))] + [fmt.format(*b) for b in body]
        pct = 100.0 * self.trainable / max(self.total, 1)
        lines.append(f'trainable {self.trainable:,} / {self.total:,} parameters ({pct:.3f}%)')
        return '\n'.join(lines)


def summary(model: nn.Module) -> Summary:
    """Per-layer table of adapters: layer, adapter name, method, weight shape, state/path and trainable count."""
    rows = []
    for layer_name, module in iter_adapted(model):
        for n, adapter in module.visadapt.items():
            state = ('merged' if n in module._va_merged else 'disabled' if n in module._va_disabled
                     else adapter.forward_path)
            rows.append(dict(layer=layer_name, adapter=n, method=adapter.config.method,
                             weight_shape=tuple(adapter.site.weight_shape), path=state,
                             trainable=adapter.num_trainable()))
    trainable, total = count_parameters(model)
    return Summary(rows, trainable, total)
