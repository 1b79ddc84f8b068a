"""Adapter configs: one small dataclass per method on top of :class:`AdapterConfig` (registered in
:mod:`visadapt.core.registry`).

Target selection (shared by every method):

* ``target_types``: layer class names to adapt (default: every type the method supports);
* ``include`` / ``exclude``: module-name patterns. A pattern matches a module name if it is equal to it, is a
  dotted suffix of it (``'qkv'`` matches ``blocks.0.attn.qkv``), or matches it as a shell glob (``'stages.*.conv*'``);
* ``rank_pattern``: ``{pattern: rank}`` overrides of ``r`` for matching layers (first match wins);
* ``train_modules``: patterns of modules trained fully and saved with the adapter (e.g. a classifier ``head``);
* ``slices``: adapt only some of the q/k/v slices of fused attention projections (timm's ``attn.qkv`` Linear,
  ``nn.MultiheadAttention``'s ``in_proj_weight``), each with its own update: ``['q', 'v']`` for every adapted
  layer, or ``{pattern: ['q', 'v']}`` for the layers matching a pattern (others are adapted whole).
  See :mod:`visadapt.core.slices`.

The selection itself (patterns → layers) is :mod:`visadapt.core.selection`.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .slices import normalize_slices

__all__ = ['AdapterConfig', 'check_positive_int', 'check_adapter_name']

_DTYPES = {'float32': torch.float32, 'float64': torch.float64, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
_NAME_RE = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*$')


def check_positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f'{what} must be a positive integer, got {value!r}')


@dataclass
class AdapterConfig:
    """Fields shared by every method (see the module docstring for target selection).

    Attributes:
        target_types: layer class names to adapt, e.g. ``['Conv2d']``; None means all types the method supports.
        include: module-name patterns to adapt; None means every layer of a target type.
        exclude: module-name patterns never to adapt.
        rank_pattern: ``{pattern: r}`` per-layer rank overrides.
        train_modules: module-name patterns trained fully and saved with the adapter.
        forward_path: ``'auto'`` (cheaper path per input shape), ``'weight'`` (one op with W + ΔW) or ``'bypass'``.
        adapter_dtype: dtype of the adapter tensors: a float dtype name, or ``'base'`` to follow the base weight.
        slices: None, a list of q/k/v slice names adapted in every layer (each layer's output must be 3 equal
            slices), or ``{pattern: [slice names]}`` applying to the layers matching a pattern (first match wins).
    """
    method: ClassVar[str] = ''
    #: layer classes the method can adapt
    supported_types: ClassVar[Tuple[type, ...]] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
    #: the adapter class (set by :func:`register`)
    adapter_cls: ClassVar[type] = None
    #: False for configs that adapt no layer (full fine-tuning, head-only): inject then only sets trainability
    adapts_layers: ClassVar[bool] = True
    #: True for full fine-tuning: every parameter of the model is trained and saved (as the root train module)
    trains_all: ClassVar[bool] = False

    target_types: Optional[List[str]] = None
    include: Optional[List[str]] = None
    exclude: List[str] = field(default_factory=list)
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    train_modules: List[str] = field(default_factory=list)
    forward_path: str = 'auto'
    adapter_dtype: str = 'float32'
    slices: Optional[Union[List[str], Dict[str, List[str]]]] = None

    def __post_init__(self) -> None:
        for attr in ('include', 'exclude', 'train_modules', 'target_types'):
            value = getattr(self, attr)
            if isinstance(value, str):  # a lone pattern is a common slip; accept it as a one-element list
                setattr(self, attr, [value])
            elif value is not None:
                setattr(self, attr, list(value))
        if self.forward_path not in ('auto', 'weight', 'bypass'):
            raise ValueError(f"forward_path={self.forward_path!r} is not valid; use 'auto', 'weight' or 'bypass'")
        if self.adapter_dtype != 'base' and self.adapter_dtype not in _DTYPES:
            raise ValueError(f'adapter_dtype={self.adapter_dtype!r} is not valid; use one of '
                             f'{sorted(_DTYPES) + ["base"]}')
        if self.target_types is not None:
            known = {t.__name__: t for t in self.supported_types}
            for t in self.target_types:
                if t not in known:
                    raise ValueError(f'target type {t!r} is not supported by {self.method}; supported: {sorted(known)}')
        if self.rank_pattern and not any(f.name == 'r' for f in dataclasses.fields(self)):
            raise ValueError(f'rank_pattern is set but {self.method} has no rank r')
        for pattern, r in self.rank_pattern.items():
            check_positive_int(r, f'rank_pattern[{pattern!r}]')
        if self.slices is not None:
            self.slices = normalize_slices(self.slices)
        self.validate()

    def validate(self) -> None:
        """Method-specific checks; raise ValueError naming the bad value and what is valid."""

    # ---- targeting ---------------------------------------------------------------------------------------------
    def accepts(self, module: nn.Module) -> bool:
        """Per-module filter after type and name matching (e.g. BitFit skipping layers without a bias)."""
        return True

    #: why :meth:`accepts` refuses layers (shown when nothing is left to adapt)
    refusal_note: ClassVar[str] = ''

    def target_classes(self) -> Tuple[type, ...]:
        if self.target_types is None:
            return self.supported_types
        return tuple(t for t in self.supported_types if t.__name__ in self.target_types)

    def torch_dtype(self, base: torch.dtype) -> torch.dtype:
        """The adapter tensors' dtype for a base weight of dtype ``base``."""
        return base if self.adapter_dtype == 'base' else _DTYPES[self.adapter_dtype]

    # ---- serialization ------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {'method': self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> 'AdapterConfig':
        data = {k: v for k, v in data.items() if k != 'method'}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f'unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(names)}')
        return cls(**data)


def check_adapter_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f'adapter name {name!r} is not valid; use a Python identifier such as "default"')
    if hasattr(nn.ModuleDict(), name):  # adapters live in an nn.ModuleDict: its own attributes cannot be keys
        raise ValueError(f'adapter name {name!r} is reserved (an attribute of nn.ModuleDict); use another '
                         f'identifier such as "default" or "task_{name}"')
    return name
