"""Adapted layers: the base module keeps its identity, its parameters and their names.

Injection swaps the layer's class for a subclass whose ``forward`` also applies the adapters, and stores the
adapters under ``layer.visadapt[<adapter name>]`` (:data:`ADAPTER_ATTR`, the one place that name is spelled).
Nothing is wrapped, so ``state_dict()`` keeps every base key (``stem.conv.weight`` stays ``stem.conv.weight``):
pretrained checkpoints, EMA copies and layer-wise LR-decay constructors keep working. ``isinstance(layer,
nn.Conv2d)`` stays true. Removing the last adapter restores the original class.

"The layer's weight and bias with adapters folded in" is :func:`fold_adapters`, used by the forward, merge,
``nn.MultiheadAttention``, merged exports and ΔW (:meth:`AdaptedLayer.delta_weight`); its inverse, used by unmerge,
is :func:`unfold_adapters`.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

from .adapter import Adapter
from .site import Site, run_op, site_from_module

__all__ = ['ADAPTER_ATTR', 'AdaptedLayer', 'fold_adapters', 'unfold_adapters', 'is_adapter_key', 'attach', 'detach',
           'convert', 'restore', 'is_adapted', 'iter_adapted', 'register_adapted_mixin']

#: the attribute (and state-dict key component) under which a layer holds its adapters
ADAPTER_ATTR = 'visadapt'

Params = Tuple[torch.Tensor, Optional[torch.Tensor]]


def is_adapter_key(key: str) -> bool:
    """True for a ``state_dict`` key (or module name) inside an adapter, e.g. ``conv.visadapt.default.G``."""
    return ADAPTER_ATTR in key.split('.')


def fold_adapters(adapters: Sequence[Adapter], weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Params:
    """(W', b') with ``adapters`` applied to (``weight``, ``bias``) in order (each one's weight form)."""
    for adapter in adapters:
        weight, bias = adapter.adapted_weight(weight), adapter.adapted_bias(bias)
    return weight, bias


def unfold_adapters(adapters: Sequence[Adapter], weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Params:
    """Inverse of :func:`fold_adapters` (the adapters taken out in reverse order)."""
    for adapter in reversed(adapters):
        weight = adapter.restored_weight(weight)
        bias = None if bias is None else adapter.restored_bias(bias)
    return weight, bias


class AdaptedLayer:
    """Mixin placed before the layer's own class. Its state (read through the methods below):

    * ``visadapt``: ``nn.ModuleDict`` name → :class:`Adapter` (the only new keys in ``state_dict``);
    * ``_va_site``: the layer geometry; ``_va_class``: the class to restore;
    * ``_va_merged``: names folded into ``weight`` (in merge order); ``_va_disabled``: names switched off.
    """
    visadapt: nn.ModuleDict
    _va_site: Site
    _va_class: type
    _va_merged: List[str]
    _va_disabled: set

    # ---- state ---------------------------------------------------------------------------------------------------
    @property
    def site(self) -> Site:
        """The adapted weight's geometry."""
        return self._va_site

    def merged_names(self) -> List[str]:
        """Adapters folded into the weight, in merge order."""
        return list(self._va_merged)

    def is_merged(self, name: str) -> bool:
        return name in self._va_merged

    def is_disabled(self, name: str) -> bool:
        return name in self._va_disabled

    def disabled_names(self) -> Set[str]:
        return set(self._va_disabled)

    def mark_merged(self, name: str) -> None:
        """Record that adapter ``name`` was folded into the weight (after the others in :meth:`merged_names`)."""
        self._va_merged.append(name)

    def mark_unmerged(self, names: Sequence[str]) -> None:
        """Record that the last merged adapters ``names`` (in merge order) were taken out of the weight."""
        if self._va_merged[-len(names):] != list(names):
            raise ValueError(f'{list(names)} are not the last merged adapters {self._va_merged}')
        del self._va_merged[-len(names):]

    def set_disabled(self, name: str, disabled: bool) -> None:
        (self._va_disabled.add if disabled else self._va_disabled.discard)(name)

    def bookkeeping(self) -> Tuple[List[str], Set[str]]:
        """(merged names, disabled names): what :meth:`restore_bookkeeping` puts back."""
        return list(self._va_merged), set(self._va_disabled)

    def restore_bookkeeping(self, state: Tuple[List[str], Set[str]]) -> None:
        self._va_merged[:] = state[0]
        self._va_disabled = set(state[1])

    def is_active(self, name: str) -> bool:
        """Enabled and not merged: applied by the forward."""
        return name not in self._va_merged and name not in self._va_disabled

    def active_adapters(self) -> List[Adapter]:
        """Adapters that are enabled and not merged, in injection order."""
        return [a for n, a in self.visadapt.items() if self.is_active(n)]

    def base_params(self) -> Params:
        """The weight and bias the adapters update (``in_proj_*`` for nn.MultiheadAttention)."""
        return self.weight, self.bias

    # ---- the update ----------------------------------------------------------------------------------------------
    def adapted_params(self, dtype: Optional[torch.dtype] = None) -> Params:
        """(W', b'): the layer's current weight and bias with every active adapter folded in, computed in ``dtype``
        (default: the weight's) on the adapters' device; the layer is not modified."""
        weight, bias = self.base_params()
        adapters = self.active_adapters()
        device = next((p.device for a in adapters for p in a.parameters()), weight.device)
        dtype = dtype or weight.dtype
        bias = None if bias is None else bias.detach().to(device, dtype)
        return fold_adapters(adapters, weight.detach().to(device, dtype), bias)

    def delta_weight(self, names: Union[str, Sequence[str]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW = adapted(W) − W of adapter(s) ``names`` (applied in that order), in ``dtype``, from the layer's current
        (base) weight, on the adapters' device.

        Covers additive and multiplicative methods alike. Raises ValueError if an adapter is merged (the base
        weight is not at hand) or has no weight form (e.g. MPC_n).
        """
        adapters = []
        for name in [names] if isinstance(names, str) else names:
            if name not in self.visadapt:
                raise ValueError(f'layer has no adapter {name!r}; it has {list(self.visadapt)}')
            if self.is_merged(name):
                raise ValueError(f'adapter {name!r} is merged into this layer; call visadapt.unmerge(model) first')
            adapter = self.visadapt[name]
            if not adapter.has_weight_path:
                raise ValueError(f'adapter {name!r} ({type(adapter).__name__}) has no weight form '
                                 f'({adapter.why_not_mergeable()})')
            adapters.append(adapter)
        device = next((p.device for a in adapters for p in a.parameters()), self.base_params()[0].device)
        weight = self.base_params()[0].detach().to(device, dtype)
        return fold_adapters(adapters, weight, None)[0].to(dtype) - weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapters = self.active_adapters()
        if not adapters:  # merged or disabled: exactly the base layer's own forward
            return super().forward(x)
        folded: List[Adapter] = []
        bypassed: List[Adapter] = []
        for adapter in adapters:
            (bypassed if adapter.use_bypass(x) else folded).append(adapter)
        weight, bias = fold_adapters(folded, self.weight, self.bias)
        out = run_op(self._va_site, x, weight, bias)
        for adapter in bypassed:
            out = adapter.bypass(x, out, bias)
        return out


_ADAPTED_CLASSES: Dict[type, type] = {}
#: base class → the AdaptedLayer subclass used for it (and its subclasses); nn.MultiheadAttention registers one in
#: :mod:`visadapt.core.attention` because its forward is not a single F.linear
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
    if name in module._va_merged:
        module._va_merged.remove(name)
    if len(module.visadapt) == 0:
        restore(module)
    return adapter


def iter_adapted(model: nn.Module, name: Optional[str] = None) -> Iterator[Tuple[str, nn.Module]]:
    """(layer name, layer) for every adapted layer, optionally only those holding adapter ``name``."""
    for layer_name, module in model.named_modules():
        if is_adapted(module) and (name is None or name in module.visadapt):
            yield layer_name, module
