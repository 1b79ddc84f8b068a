"""The model-level API: inject, remove, enable/disable, summary (merge and unmerge: :mod:`visadapt.core.merging`).

Written once for every method; methods only provide per-layer adapters (see :mod:`visadapt.core.adapter`). Every
function validates first and modifies the model only when nothing can fail any more, so an error leaves the model
exactly as it was.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import torch.nn as nn

from .adapter import Adapter
from .attention import check_attention_adapter, sync_attention
from .config import AdapterConfig, check_adapter_name
from .layer import attach, detach, is_adapted, iter_adapted
from .merging import all_or_nothing, check_unmergeable, merge_layer, merge_layers, unmerge_layer, unmerge_layers
from .selection import layer_config, select_targets, select_train_modules, slices_for, train_entry_parameters
from .site import base_weight, site_from_module
from .slices import build_sliced_adapter

__all__ = ['inject', 'merge', 'unmerge', 'remove', 'enable_adapter', 'disable_adapter', 'adapters_disabled',
           'summary', 'Summary', 'InjectReport', 'Injection', 'get_injection', 'adapter_names', 'count_parameters',
           'build_adapter']

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
    """The model's injections (read-only view; an empty dict when it has none)."""
    return model.__dict__.get(STATE_ATTR, {})


def get_injection(model: nn.Module, name: str) -> Injection:
    injections = _injections(model)
    if name not in injections:
        raise ValueError(f'no adapter named {name!r} in this model; adapters present: {sorted(injections) or "none"}')
    return injections[name]


def adapter_names(model: nn.Module) -> List[str]:
    return list(_injections(model))


def build_adapter(config: AdapterConfig, name: str, module: nn.Module) -> Adapter:
    """The adapter ``config`` builds for layer ``name`` (its per-layer rank and slices applied), on the layer's
    device in the config's adapter dtype. Raises ValueError/TypeError naming the layer's problem."""
    config = layer_config(config, name)
    site = module.site if is_adapted(module) else site_from_module(module)  # a second adapter: the recorded site
    weight = base_weight(module).detach()
    chosen = slices_for(config.slices, name)
    if chosen is not None:
        adapter = build_sliced_adapter(config, site, weight, chosen)
    else:
        adapter = config.adapter_cls(config, site, weight)
    adapter.check_forward_path()
    if isinstance(module, nn.MultiheadAttention):
        check_attention_adapter(adapter)
    return adapter.to(device=weight.device, dtype=config.torch_dtype(weight.dtype))


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
    for injection in _injections(model).values():
        for entry in injection.train_modules:
            for p in train_entry_parameters(model, entry):
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
    train_modules = [''] if config.trains_all else select_train_modules(model, config.train_modules)
    # build everything before touching the model, so a failing layer leaves it unchanged
    built = []
    for layer_name, module in targets:
        try:
            adapter = build_adapter(config, layer_name, module)
        except (ValueError, TypeError) as err:
            raise type(err)(f'cannot adapt layer {layer_name!r}: {err} (leave it out with '
                            f'exclude=[{layer_name!r}])') from None
        built.append((layer_name, module, adapter))

    _attach_all(model, name, Injection(config, [n for n, _, _ in built], train_modules), built)
    trainable, total = count_parameters(model)
    adapter_params = sum(a.num_trainable() for _, _, a in built)
    return InjectReport(name, config.method, [n for n, _, _ in built], trainable, total, adapter_params)


def _attach_all(model: nn.Module, name: str, injection: Injection, built: List[Tuple[str, nn.Module, Adapter]]
                ) -> None:
    """Attach validated adapters and set trainability; undone entirely if anything still fails."""
    injection.requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        _freeze_base(model)
        for _, module, adapter in built:
            attach(module, name, adapter)
            for p in adapter.parameters():
                p.requires_grad_(True)
        sync_attention(model)  # an adapted out_proj of nn.MultiheadAttention needs its attention module converted
        model.__dict__.setdefault(STATE_ATTR, {})[name] = injection
        _unfreeze_train_modules(model)
    except BaseException:  # not expected after validation; still, never leave a half-injected model behind
        model.__dict__.get(STATE_ATTR, {}).pop(name, None)
        for _, module, _ in built:
            if is_adapted(module) and name in module.visadapt:
                detach(module, name)
        sync_attention(model)
        if not _injections(model):
            model.__dict__.pop(STATE_ATTR, None)
        for n, p in model.named_parameters():
            p.requires_grad_(injection.requires_grad_before.get(n, p.requires_grad))
        raise


def _layers_for(model: nn.Module, name: Optional[str]) -> List[Tuple[str, nn.Module, List[str]]]:
    """(layer name, layer, adapter names) for adapter ``name`` (default: all). Raises ValueError for an unknown name."""
    names = [name] if name is not None else adapter_names(model)
    for n in names:
        get_injection(model, n)
    out = []
    for layer_name, module in iter_adapted(model):
        sel = [n for n in module.visadapt.keys() if n in names]
        if sel:
            out.append((layer_name, module, sel))
    return out


def merge(model: nn.Module, name: Optional[str] = None) -> None:
    """Fold adapter ``name`` (default: all enabled ones) into the base weights; forward then costs exactly the base."""
    merge_layers(model, _layers_for(model, name))


def unmerge(model: nn.Module, name: Optional[str] = None) -> None:
    """Undo :func:`merge` for adapter ``name`` (default: all), restoring the base weights."""
    unmerge_layers(_layers_for(model, name))


def remove(model: nn.Module, name: Optional[str] = None, merge_weights: bool = False) -> None:
    """Take adapter ``name`` (default: all) out of the model.

    With ``merge_weights=False`` the base weights are restored (merged adapters are unmerged first) and every
    adapted layer gets its original class back, so the model is the original model. With ``merge_weights=True`` the
    update is baked into the weights ("merge and unload").
    """
    names = [name] if name is not None else adapter_names(model)
    layers = _layers_for(model, name)
    if merge_weights:
        merge_layers(model, layers)   # validates first; all or nothing
    else:
        unmerge_layers(layers)
    injections = model.__dict__[STATE_ATTR]
    # the first injection holds the user's requires_grad flags from before any adapter
    original_flags = next(iter(injections.values())).requires_grad_before
    for n in names:
        injections.pop(n)
        for _, module, sel in layers:
            if n in sel:
                detach(module, n)
    sync_attention(model)
    if injections:  # others remain: base frozen except their train_modules; they keep the original flags
        next(iter(injections.values())).requires_grad_before = original_flags
        _freeze_base(model)
        _unfreeze_train_modules(model)
    else:  # last adapter gone: restore the user's requires_grad flags
        params = dict(model.named_parameters())
        for pname, flag in original_flags.items():
            if pname in params:
                params[pname].requires_grad_(flag)
        model.__dict__.pop(STATE_ATTR, None)


def _set_enabled(model: nn.Module, name: Optional[str], enabled: bool) -> None:
    layers = _layers_for(model, name)
    if not enabled:  # a disabled adapter must not stay folded into the weight
        check_unmergeable(layers)
    with all_or_nothing() as journal:
        for _, module, names in layers:
            journal.touch(module)
            for n in names:
                if not enabled and module.is_merged(n):
                    unmerge_layer(module, n)
                module.set_disabled(n, not enabled)


def enable_adapter(model: nn.Module, name: Optional[str] = None) -> None:
    """Switch adapter ``name`` (default: all) back on."""
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
    before = {id(m): m.bookkeeping() for _, m, _ in layers}
    disable_adapter(model, name)
    try:
        yield
    finally:
        for _, module, _ in layers:
            merged, disabled = before[id(module)]
            module.restore_bookkeeping((module.merged_names(), disabled))
            for n in merged:
                if not module.is_merged(n):
                    merge_layer(module, n)


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
            state = ('merged' if module.is_merged(n) else 'disabled' if module.is_disabled(n)
                     else adapter.forward_path)
            rows.append(dict(layer=layer_name, adapter=n, method=adapter.config.method,
                             weight_shape=tuple(adapter.site.weight_shape), path=state,
                             trainable=adapter.num_trainable()))
    trainable, total = count_parameters(model)
    return Summary(rows, trainable, total)
