"""Adapted layers: the base module keeps its identity, its parameters and their names.

Injection swaps the layer's class for a subclass whose ``forward`` also applies the adapters, and stores the
adapters under ``layer.visadapt[<adapter name>]``. Nothing is wrapped, so ``state_dict()`` keeps every base key
(``stem.conv.weight`` stays ``stem.conv.weight``): pretrained checkpoints, EMA copies and layer-wise LR-decay
constructors keep working. ``isinstance(layer, nn.Conv2d)`` stays true. Removing the last adapter restores the
original class.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple, Type

import torch
import torch.nn as nn

from .adapter import Adapter
from .site import Site, run_op, site_from_module

__all__ = ['AdaptedLayer', 'attach', 'detach', 'convert', 'restore', 'is_adapted', 'iter_adapted',
           'register_adapted_mixin']

ADAPTER_ATTR = 'visadapt'


class AdaptedLayer:
    """Mixin placed before the layer's own class. Its state:

    * ``visadapt``: ``nn.ModuleDict`` name → :class:`Adapter` (the only new keys in ``state_dict``);
    * ``_va_site``: the layer geometry; ``_va_class``: the class to restore;
    * ``_va_merged``: names folded into ``weight`` (in merge order); ``_va_disabled``: names switched off.
    """
    visadapt: nn.ModuleDict
    _va_site: Site
    _va_class: type
    _va_merged: List[str]
    _va_disabled: set

    def active_adapters(self) -> List[Adapter]:
        """Adapters that are enabled and not merged, in injection order."""
        return [a for n, a in self.visadapt.items() if n not in self._va_merged and n not in self._va_disabled]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapters = self.active_adapters()
        if not adapters:  # merged or disabled: exactly the base layer's own forward
            return super().forward(x)
        weight, bias = self.weight, self.bias
        bypassed = []
        for adapter in adapters:
            if adapter.use_bypass(x):
                bypassed.append(adapter)
            else:
                weight, bias = adapter.adapted_weight(weight), adapter.adapted_bias(bias)
        out = run_op(self._va_site, x, weight, bias)
        for adapter in bypassed:
            out = adapter.bypass(x, out, bias)
        return out


_ADAPTED_CLASSES: Dict[type, type] = {}
#: base class → the AdaptedLayer subclass used for it (and its subclasses); nn.MultiheadAttention registers one in
#: :mod:`visadapt.attention` because its forward is not a single F.linear
_MIXINS: Dict[type, type] = {}


def register_adapted_mixin(base: type, mixin: type) -> None:
    """Use ``mixin`` (an :class:`AdaptedLayer` subclass) instead of AdaptedLayer for ``base`` and its subclasses."""
    _MIXINS[base] = mixin


def _adapted_class(cls: type) -> type:
    """``Adapted<cls>``: created once per base class and kept in this module so pickling by name works."""
    if cls not in _ADAPTED_CLASSES:
        name = f'Adapted{cls.__name__}'
        if name in globals():  # another base class with the same __name__ already took it
            name = f'Adapted_{cls.__module__.replace(".", "_")}_{cls.__name__}'
        mixin = next((m for base, m in _MIXINS.items() if issubclass(cls, base)), AdaptedLayer)
        new = type(name, (mixin, cls), {'__module__': __name__, '__qualname__': name})
        globals()[name] = new
        _ADAPTED_CLASSES[cls] = new
    return _ADAPTED_CLASSES[cls]


for _cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
    _adapted_class(_cls)


def is_adapted(module: nn.Module) -> bool:
    return isinstance(module, AdaptedLayer)


def convert(module: nn.Module, site: Optional[Site] = None) -> None:
    """Swap ``module``'s class for its adapted subclass (no adapter yet); a no-op if it is adapted already.

    ``site`` defaults to ``site_from_module(module)``.
    """
    if not is_adapted(module):
        site = site_from_module(module) if site is None else site
        original = type(module)
        module.__class__ = _adapted_class(original)
        module._va_site = site
        module._va_class = original
        module._va_merged = []
        module._va_disabled = set()
        module.add_module(ADAPTER_ATTR, nn.ModuleDict())


def restore(module: nn.Module) -> None:
    """Give an adapted module without adapters its original class back."""
    del module._modules[ADAPTER_ATTR]
    for attr in ('_va_site', '_va_merged', '_va_disabled'):
        delattr(module, attr)
    module.__class__ = module.__dict__.pop('_va_class')


def attach(module: nn.Module, name: str, adapter: Adapter) -> None:
    """Add ``adapter`` to ``module`` under ``name``, converting the module in place on first use."""
    convert(module)
    module.visadapt[name] = adapter


def detach(module: nn.Module, name: str) -> Adapter:
    """Remove adapter ``name`` (must be unmerged); restore the original class when none is left."""
    adapter = module.visadapt[name]
    del module.visadapt[name]
    module._va_disabled.discard(name)
    if len(module.visadapt) == 0:
        restore(module)
    return adapter


def iter_adapted(model: nn.Module, name: str = None) -> Iterator[Tuple[str, nn.Module]]:
    """(layer name, layer) for every adapted layer, optionally only those holding adapter ``name``."""
    for layer_name, module in model.named_modules():
        if is_adapted(module) and (name is None or name in module.visadapt):
            yield layer_name, module


from . import attention as _attention  # noqa: E402,F401  (registers the nn.MultiheadAttention adapted class)
