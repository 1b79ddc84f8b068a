"""Folding adapters into the base weights and back: merge, unmerge, and the all-or-nothing journal they share.

Every operation here validates everything it can (an unmergeable adapter, tied weights, a scale of exactly zero
that unmerge cannot divide out, ...) before it changes a weight; and the weights, biases and merge bookkeeping of
each layer it touches are journaled (copied to the CPU, so a GPU model needs no extra device memory) and restored
if anything still fails half way. A failed call leaves the model exactly as it was.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn

from .layer import fold_adapters, unfold_adapters
from .selection import base_named_modules

__all__ = ['Journal', 'all_or_nothing', 'check_mergeable', 'check_unmergeable', 'merge_layer', 'unmerge_layer',
           'merge_layers', 'unmerge_layers']

Layers = Sequence[Tuple[str, nn.Module, List[str]]]


class Journal:
    """Snapshots of the layers an operation changes, taken just before the first change to each."""

    def __init__(self) -> None:
        self._saved: Dict[int, tuple] = {}

    def touch(self, module: nn.Module) -> None:
        if id(module) in self._saved:
            return
        weight, bias = module.base_params()
        copies = tuple(None if t is None else t.detach().to('cpu', copy=True) for t in (weight, bias))
        self._saved[id(module)] = (module, copies, module.bookkeeping())

    @torch.no_grad()
    def rollback(self) -> None:
        for module, (weight, bias), bookkeeping in self._saved.values():
            current_weight, current_bias = module.base_params()
            current_weight.copy_(weight)
            if bias is not None:
                current_bias.copy_(bias)
            module.restore_bookkeeping(bookkeeping)


@contextlib.contextmanager
def all_or_nothing() -> Iterator[Journal]:
    """A :class:`Journal` whose layers are restored if the body raises."""
    journal = Journal()
    try:
        yield journal
    except BaseException:
        journal.rollback()
        raise


def _weight_owners(model: nn.Module) -> Dict[int, List[str]]:
    """id(parameter) → the modules holding it (tied weights have several)."""
    owners: Dict[int, List[str]] = {}
    for mod_name, mod in base_named_modules(model):
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), []).append(mod_name)
    return owners


def check_mergeable(model: nn.Module, layers: Layers) -> None:
    """Raise ValueError if some adapter of ``layers`` to be merged cannot be, or sits on a tied weight."""
    owners = _weight_owners(model)
    for layer_name, module, names in layers:
        pending = [n for n in names if module.is_active(n)]
        for n in pending:
            adapter = module.visadapt[n]
            if not adapter.mergeable:
                raise ValueError(f'adapter {n!r} on layer {layer_name!r} cannot be merged '
                                 f'({type(adapter).__name__}: {adapter.why_not_mergeable()})')
        weight = module._parameters.get('weight')
        tied = [o for o in owners.get(id(weight), []) if o != layer_name] if weight is not None else []
        if tied and pending:
            raise ValueError(f'layer {layer_name!r} shares its weight with {tied} (tied weights): merging adapter(s) '
                             f'{pending} into it would change those modules too; keep the adapter unmerged')


def _unmerge_order(module: nn.Module, name: str) -> List[str]:
    """Adapters taken out of the weight to unmerge ``name``: it and those merged after it (re-merged afterwards)."""
    merged = module.merged_names()
    return merged[merged.index(name):] if name in merged else []


def check_unmergeable(layers: Layers) -> None:
    """Raise ValueError if unmerging the adapters of ``layers`` would need an inverse that does not exist."""
    for layer_name, module, names in layers:
        involved = {m for n in names for m in _unmerge_order(module, n)}
        for n in sorted(involved):
            try:
                module.visadapt[n].check_restorable()
            except ValueError as err:
                raise ValueError(f'cannot unmerge adapter {n!r} on layer {layer_name!r}: {err}') from None


@torch.no_grad()
def merge_layer(module: nn.Module, name: str) -> None:
    """Fold adapter ``name`` into ``module``'s weight and bias (no checks: call after :func:`check_mergeable`)."""
    weight, bias = module.base_params()
    new_weight, new_bias = fold_adapters([module.visadapt[name]], weight, bias)
    weight.copy_(new_weight)
    if bias is not None:
        bias.copy_(new_bias)
    module.mark_merged(name)


@torch.no_grad()
def unmerge_layer(module: nn.Module, name: str) -> None:
    """Take adapter ``name`` out of ``module``'s weight; adapters merged after it are taken out first (each inverse
    sees the weight it produced) and merged again afterwards."""
    order = _unmerge_order(module, name)
    weight, bias = module.base_params()
    new_weight, new_bias = unfold_adapters([module.visadapt[n] for n in order], weight, bias)
    weight.copy_(new_weight)
    if bias is not None:
        bias.copy_(new_bias)
    module.mark_unmerged(order)
    for n in order[1:]:
        merge_layer(module, n)


def merge_layers(model: nn.Module, layers: Layers) -> None:
    """Merge every active adapter named in ``layers``; all or nothing."""
    check_mergeable(model, layers)
    with all_or_nothing() as journal:
        for _, module, names in layers:
            for n in names:
                if module.is_active(n):
                    journal.touch(module)
                    merge_layer(module, n)


def unmerge_layers(layers: Layers) -> None:
    """Unmerge every merged adapter named in ``layers`` (latest first); all or nothing."""
    check_unmergeable(layers)
    with all_or_nothing() as journal:
        for _, module, names in layers:
            for n in reversed(module.merged_names()):
                if n in names:
                    journal.touch(module)
                    unmerge_layer(module, n)
