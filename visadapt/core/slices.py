"""Per-slice adapters for fused attention projections: adapt q and v of a fused qkv weight separately.

timm's ViT computes q, k and v with one Linear ``attn.qkv`` of weight (3d, d_in) (rows: q, then k, then v), and
``nn.MultiheadAttention`` stores the same stack as ``in_proj_weight``. The papers (LoRA, SeRA, SVFT, ...) adapt the
separate W_q and W_v, so ``config.slices`` (``['q', 'v']``, or ``{pattern: ['q', 'v']}`` per layer) builds a
:class:`SlicedAdapter`: one adapter of the method per chosen slice, each seeing only its (d, d_in) slice of the
weight (SVFT: the SVD of that slice; SeRA: split must divide d). Unchosen slices are left untouched.

* weight path: W' = [W'_q; W_k; W'_v] with each chosen slice updated by its adapter's own ``adapted_weight``
  (additive and multiplicative methods alike), and the same for the bias;
* bypass: the frozen output is cut into its three slices and each chosen slice goes through its adapter's bypass;
* merge/unmerge, save/load, metadata (e.g. SVFT's base-weight fingerprint) and MPC factors are per slice. Tensor keys
  are ``<layer>.visadapt.<name>.<slice>.<tensor>``, e.g. ``blocks.0.attn.qkv.visadapt.default.q.values``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from .adapter import Adapter
from .factors import Factors, stack_factors
from .site import Site

__all__ = ['SLICE_NAMES', 'SlicedAdapter', 'normalize_slices', 'build_sliced_adapter']

SLICE_NAMES = ('q', 'k', 'v')


def _slice_list(value: Any, where: str) -> List[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or any(s not in SLICE_NAMES for s in value) \
            or len(set(value)) != len(value):
        raise ValueError(f'{where} must be a non-empty list of distinct slice names from {list(SLICE_NAMES)}, '
                         f'got {value!r}')
    return [s for s in SLICE_NAMES if s in value]  # canonical q, k, v order


def normalize_slices(slices: Union[Sequence[str], Dict[str, Sequence[str]]]
                     ) -> Union[List[str], Dict[str, List[str]]]:
    """Validate ``slices`` and return it in canonical form (lists in q, k, v order). Raises ValueError."""
    if isinstance(slices, dict):
        if not slices:
            raise ValueError('slices={} selects nothing; use None, a list such as ["q", "v"], or '
                             '{"attn.qkv": ["q", "v"]}')
        for pattern in slices:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f'slices keys must be module-name patterns (non-empty strings), got {pattern!r}')
        return {pattern: _slice_list(value, f'slices[{pattern!r}]') for pattern, value in slices.items()}
    return _slice_list(slices, 'slices')


def build_sliced_adapter(config: Any, site: Site, weight: torch.Tensor, chosen: Sequence[str]) -> 'SlicedAdapter':
    """One ``config.adapter_cls`` per chosen slice of the fused weight ``weight`` (3d, in). Raises ValueError."""
    if site.kind != 'linear':
        raise ValueError(f'slices={list(chosen)} apply to fused qkv projections (Linear or nn.MultiheadAttention), '
                         f'not to a conv layer of weight shape {tuple(site.weight_shape)}')
    out_f, in_f = site.weight_shape
    if out_f % len(SLICE_NAMES):
        raise ValueError(f'slices={list(chosen)}: this layer has {out_f} output features, which cannot be 3 equal '
                         f'q/k/v slices; restrict the sliced layers to fused qkv projections, e.g. '
                         f'slices={{"attn.qkv": {list(chosen)}}}')
    d = out_f // len(SLICE_NAMES)
    per_slice = dataclasses.replace(config, slices=None)
    parts = {}
    for name in chosen:
        i = SLICE_NAMES.index(name)
        try:
            parts[name] = config.adapter_cls(per_slice, site.with_shape((d, in_f)), weight[i * d:(i + 1) * d])
            parts[name].check_forward_path()
        except (ValueError, TypeError) as err:
            raise type(err)(f'slice {name!r}: {err}') from None
    return SlicedAdapter(config, site, weight, parts)


class SlicedAdapter(Adapter):
    """Adapters for some of the q/k/v slices of a fused (3d, in) weight; submodules named ``q``, ``k``, ``v``.

    Args:
        config: the method's config (with ``slices`` set).
        site: the fused layer's geometry (weight (3d, in)).
        weight: the fused frozen weight.
        parts: slice name → the adapter built on that slice.
    """
    def __init__(self, config: Any, site: Site, weight: torch.Tensor, parts: Dict[str, Adapter]):
        super().__init__(config, site, weight)
        self.d = site.out_features // len(SLICE_NAMES)
        for name, part in parts.items():
            self.add_module(name, part)
        self.parts: List[str] = list(parts)

    # what every part offers
    @property
    def has_bypass(self) -> bool:
        return all(self._part(n).has_bypass for n in getattr(self, 'parts', ()))

    @property
    def has_weight_path(self) -> bool:
        return all(self._part(n).has_weight_path for n in getattr(self, 'parts', ()))

    @property
    def mergeable(self) -> bool:
        return all(self._part(n).mergeable for n in getattr(self, 'parts', ()))

    def _part(self, name: str) -> Adapter:
        return self._modules[name]

    def part_adapters(self) -> List[Adapter]:
        """The per-slice adapters, in q, k, v order."""
        return [self._part(n) for n in self.parts]

    def _pieces(self, tensor: torch.Tensor, dim: int = 0) -> List[torch.Tensor]:
        return list(tensor.split(self.d, dim=dim))

    # ---- weight form ----------------------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        deltas = {n: self._part(n).delta_weight() for n in self.parts}
        ref = next(iter(deltas.values()))
        return torch.cat([deltas[n] if n in deltas else ref.new_zeros(ref.shape) for n in SLICE_NAMES])

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        pieces = self._pieces(weight)
        return torch.cat([self._part(n).adapted_weight(p) if n in self.parts else p
                          for n, p in zip(SLICE_NAMES, pieces)])

    def restored_weight(self, merged: torch.Tensor) -> torch.Tensor:
        pieces = self._pieces(merged)
        return torch.cat([self._part(n).restored_weight(p) if n in self.parts else p
                          for n, p in zip(SLICE_NAMES, pieces)])

    def adapted_bias(self, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if bias is None:
            return None
        return torch.cat([self._part(n).adapted_bias(p) if n in self.parts else p
                          for n, p in zip(SLICE_NAMES, self._pieces(bias))])

    def restored_bias(self, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if bias is None:
            return None
        return torch.cat([self._part(n).restored_bias(p) if n in self.parts else p
                          for n, p in zip(SLICE_NAMES, self._pieces(bias))])

    def check_restorable(self) -> None:
        for n in self.parts:
            self._part(n).check_restorable()

    def delta_macs(self) -> int:
        return sum(self._part(n).delta_macs() for n in self.parts)

    def factor_form(self) -> Factors:
        """The parts' forms stacked: ``down`` concatenated, ``up`` placed in its slice's rows (zeros elsewhere)."""
        forms = [self._part(n).factor_form() for n in self.parts]
        stacked = stack_factors(forms)
        up = stacked.up.new_zeros(self.site.out_features, stacked.up.shape[1])
        col = 0
        for n, form in zip(self.parts, forms):
            i, width = SLICE_NAMES.index(n), form.up.shape[1]
            up[i * self.d:(i + 1) * self.d, col:col + width] = form.up
            col += width
        return Factors(stacked.down, up, stacked.mid)

    # ---- bypass form ----------------------------------------------------------------------------------------------
    def bypass(self, x: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        pieces = self._pieces(out, dim=-1)
        biases = self._pieces(bias) if bias is not None else [None] * len(SLICE_NAMES)
        return torch.cat([self._part(n).bypass(x, p, b) if n in self.parts else p
                          for n, p, b in zip(SLICE_NAMES, pieces, biases)], dim=-1)

    def bypass_macs(self, x_shape: Sequence[int]) -> int:
        return sum(self._part(n).bypass_macs(x_shape) for n in self.parts)

    def bypass_ops(self) -> int:
        return sum(self._part(n).bypass_ops() for n in self.parts)

    def delta_ops(self) -> int:
        return sum(self._part(n).delta_ops() for n in self.parts)

    # ---- bookkeeping ---------------------------------------------------------------------------------------------
    def mpc_factors(self):
        factors = [f for n in self.parts for f in (self._part(n).mpc_factors() or [])]
        return factors or None

    def why_not_mergeable(self) -> str:
        for n in self.parts:
            if not self._part(n).mergeable:
                return f'slice {n!r}: {self._part(n).why_not_mergeable()}'
        return super().why_not_mergeable()

    def metadata(self) -> Dict[str, Any]:
        return {n: meta for n in self.parts if (meta := self._part(n).metadata())}

    def check_metadata(self, meta: Dict[str, Any], where: str) -> None:
        unknown = sorted(set(meta) - set(self.parts))
        if unknown:
            raise ValueError(f'{where}: saved metadata for slice(s) {unknown}, but this adapter has slices '
                             f'{self.parts}')
        for n, part_meta in meta.items():
            self._part(n).check_metadata(part_meta, f'{where}, slice {n!r}')

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, slices={self.parts}'
