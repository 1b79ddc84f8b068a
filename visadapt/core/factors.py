"""The exact factored form of an update, declared by each method and read by every export.

An adapter whose ΔW is exactly a product of small factors returns them from :meth:`visadapt.Adapter.factor_form` as a
:class:`Factors`: ``ΔW = up · down`` (LoRA form) or ``ΔW = up ·₁ mid ·₂ down`` (Tucker form, a core ``mid`` with the
layer's kernel between a 1×1 down and a 1×1 up), with every scale folded into ``up``. DoRA adds its magnitude
vector. The exports (diffusers/PEFT LoRA, kohya/LyCORIS, PEFT directories) read this form only, so a new method gets
every export by implementing ``factor_form()``, and a method without an exact form is refused by name.

Layouts (PyTorch's own; ``k`` the kernel, ``R`` the rank, ``ones`` = (1,)·ndim):

* Linear: ``down`` (R, in), ``up`` (out, R);
* ConvNd, LoRA form: ``down`` (R, in/groups, *k) — a conv with the layer's kernel and geometry — and ``up``
  (out, R, *ones);
* ConvNd, Tucker form: ``down`` (R_in, in/groups, *ones), ``mid`` (R_up, R_in, *k), ``up`` (out, R_up, *ones).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

__all__ = ['Factors', 'stack_factors']


@dataclass
class Factors:
    """ΔW of one adapter on one layer in factored form (see the module docstring for the shapes).

    Attributes:
        down: the input-side factor.
        up: the output-side factor, with the update's scale folded in.
        mid: None (LoRA form), or the Tucker core (R_up, R_in, *k) (rows: up side, columns: down side).
        magnitude: None for additive updates; DoRA's m (out,): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_c.
    """
    down: torch.Tensor
    up: torch.Tensor
    mid: Optional[torch.Tensor] = None
    magnitude: Optional[torch.Tensor] = None

    @property
    def rank(self) -> int:
        """R of a LoRA form (rows of ``down``); the core's larger side for a Tucker form."""
        return self.down.shape[0] if self.mid is None else max(self.mid.shape[0], self.mid.shape[1])

    def delta_weight(self) -> torch.Tensor:
        """ΔW = up · (mid ·) down in the layer's weight layout (the magnitude is not applied)."""
        up, down = self.up.flatten(1), self.down.flatten(1)
        if self.mid is None:
            return (up @ down).reshape(self.up.shape[0], *self.down.shape[1:])
        return torch.einsum('ij...,pi,jc->pc...', self.mid, up, down)

    def as_chain(self) -> 'Factors':
        """The same ΔW in LoRA form: a Tucker core is folded into ``down`` (R_up, in/groups, *k)."""
        if self.mid is None:
            return self
        down = torch.einsum('ij...,jc->ic...', self.mid, self.down.flatten(1))
        return replace(self, down=down.contiguous(), mid=None)

    def simplified(self) -> 'Factors':
        """LoRA form when the core has no spatial extent (1×1 kernels, Linears), else unchanged."""
        if self.mid is not None and all(k == 1 for k in self.mid.shape[2:]):
            return self.as_chain()
        return self

    def detached(self, dtype: torch.dtype = torch.float32) -> 'Factors':
        """Detached copies in ``dtype`` (what the exports write)."""
        def cast(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.detach().to(dtype).contiguous()
        return Factors(cast(self.down), cast(self.up), cast(self.mid), cast(self.magnitude))


def stack_factors(parts: Sequence[Factors]) -> Factors:
    """Several additive updates on one layer as one exact form: ranks concatenated, Tucker cores block-diagonal.

    Raises ValueError when a part with a magnitude has company (DoRA does not compose additively); alone, it is
    returned as it is.
    """
    if len(parts) == 1:
        return parts[0]
    if any(p.magnitude is not None for p in parts):
        raise ValueError('a DoRA update (magnitude vector) cannot be combined with other adapters on the same layer')
    if len({p.mid is None for p in parts}) > 1:
        parts = [p.as_chain() for p in parts]
    down = torch.cat([p.down for p in parts])
    up = torch.cat([p.up for p in parts], dim=1)
    if parts[0].mid is None:
        return Factors(down, up)
    rows = sum(p.mid.shape[0] for p in parts)
    mid = down.new_zeros(rows, down.shape[0], *parts[0].mid.shape[2:])
    r0 = c0 = 0
    for p in parts:
        mid[r0:r0 + p.mid.shape[0], c0:c0 + p.mid.shape[1]] = p.mid
        r0, c0 = r0 + p.mid.shape[0], c0 + p.mid.shape[1]
    return Factors(down, up, mid)
