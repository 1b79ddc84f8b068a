"""The per-layer adapter base class: the one contract every method implements.

A method subclasses :class:`Adapter`, declares its tensors in ``__init__``, initializes them in
``reset_parameters`` and gives its update in one (or both) of two forms:

* ``delta_weight()``: the scaled ΔW in the layer's own weight layout. The core then merges, unmerges and runs the
  "weight" path (one op with W + ΔW) for it. Multiplicative methods override ``adapted_weight`` /
  ``restored_weight`` instead.
* ``bypass(x, out, bias)``: a factorized path that adds the update to the frozen layer's output without
  materializing ΔW, with ``bypass_macs`` so the core can pick the cheaper path per input shape.

Optionally ``factor_form()`` declares the update's exact factored form (:class:`visadapt.core.factors.Factors`), which
every export reads. What an adapter can do (``has_weight_path``, ``has_bypass``, ``mergeable``) are read-only
properties derived from its state, fixed once it is built.

Everything else (targeting, freezing, merge bookkeeping, save/load, dtype policy) is written once in the core.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .factors import Factors
from .path_cost import cost_model
from .site import Site

__all__ = ['Adapter', 'FORWARD_PATHS']

FORWARD_PATHS = ('auto', 'weight', 'bypass')


def _any_trainable(module: nn.Module) -> bool:
    """``any(p.requires_grad for p in module.parameters())`` without the generator machinery (hot path)."""
    for p in module._parameters.values():
        if p is not None and p.requires_grad:
            return True
    return any(_any_trainable(child) for child in module._modules.values() if child is not None)


class Adapter(nn.Module):
    """One method's trainable update for one layer (or one slice of a fused layer).

    Args:
        config: the method's config, already specialised for this layer (per-pattern overrides applied).
        site: the adapted weight's geometry.
        weight: the frozen base weight (read-only; SVD-based methods derive buffers from it).
    """
    def __init__(self, config: Any, site: Site, weight: torch.Tensor):
        super().__init__()
        self.config = config
        self.site = site
        self.forward_path = getattr(config, 'forward_path', 'auto')
        if self.forward_path not in FORWARD_PATHS:
            raise ValueError(f"forward_path={self.forward_path!r} is not valid; use one of {FORWARD_PATHS}")
        self._path_cache: Dict[Tuple, bool] = {}

    # ---- what this adapter can do (derived from its state; subclasses override) ----------------------------------
    @property
    def has_weight_path(self) -> bool:
        """Does it implement ``delta_weight``/``adapted_weight`` (the weight path) here?"""
        return True

    @property
    def has_bypass(self) -> bool:
        """Does it implement ``bypass``/``bypass_macs`` (the factorized path) here?"""
        return False

    @property
    def mergeable(self) -> bool:
        """Can its update be folded into W exactly?"""
        return self.has_weight_path

    def check_forward_path(self) -> None:
        """Raise ValueError if the configured ``forward_path`` is one this adapter does not have (the core calls it
        once the adapter is built)."""
        if self.forward_path == 'bypass' and not self.has_bypass:
            raise ValueError(f"forward_path='bypass' is not available for {type(self).__name__} here "
                             f"({self.why_no_bypass()}); use 'weight' or 'auto'")
        if self.forward_path == 'weight' and not self.has_weight_path:
            raise ValueError(f"forward_path='weight' is not available {self.why_no_weight_path()}; use 'bypass' or "
                             f"'auto'")

    # ---- the update, in weight form -------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """Scaled ΔW with shape ``site.weight_shape`` (float32 unless the adapter was built in another dtype)."""
        raise NotImplementedError

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W' from W. Additive methods get ``W + ΔW``; multiplicative ones override."""
        return weight + self.delta_weight().to(weight.dtype)

    def restored_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`adapted_weight` (used by unmerge)."""
        return merged - self.delta_weight().to(merged.dtype)

    def check_restorable(self) -> None:
        """Raise ValueError if :meth:`restored_weight` cannot invert the merged weight (the core asks before it
        unmerges anything, so a refusal leaves the model unchanged)."""

    def adapted_bias(self, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return bias

    def restored_bias(self, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return bias

    def delta_macs(self) -> int:
        """Multiply-accumulates to build ΔW once (for the path choice)."""
        return 0

    # ---- the update, in bypass form -------------------------------------------------------------------------------
    def bypass(self, x: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """Return the adapted output given the input ``x`` and the frozen layer's output ``out`` (bias included)."""
        raise NotImplementedError

    def bypass_macs(self, x_shape: Sequence[int]) -> Optional[int]:
        """Multiply-accumulates of :meth:`bypass` for an input of ``x_shape``; None when there is no bypass."""
        return None

    def bypass_ops(self) -> int:
        """Matmul/conv calls in one forward of :meth:`bypass` (each has a fixed cost, see ``visadapt.core.path_cost``)."""
        return 2

    def delta_ops(self) -> int:
        """Matmul calls that build ΔW once."""
        return 1

    # ---- choices and bookkeeping ---------------------------------------------------------------------------------
    def forced_path(self) -> Optional[bool]:
        """True (bypass) or False (weight path) when the config or the adapter's capabilities fix the path, None when
        ``auto`` chooses per input. Fixed once the adapter is built, so it is computed once (this is on the hot path
        of every forward)."""
        forced = self.__dict__.get('_forced_path', ())
        if forced == ():
            if self.forward_path == 'bypass' or not self.has_weight_path:
                forced = True
            elif self.forward_path == 'weight' or not self.has_bypass:
                forced = False
            else:
                forced = None
            self.__dict__['_forced_path'] = forced
        return forced

    def use_bypass(self, x: torch.Tensor) -> bool:
        """Pick the path for this input: forced by ``config.forward_path``, else the one
        :mod:`visadapt.core.path_cost` predicts cheaper for this shape, device and mode (training or not); cached per
        input shape."""
        forced = self.forced_path()
        if forced is not None:
            return forced
        training = torch.is_grad_enabled() and _any_trainable(self)
        input_grad = torch.is_grad_enabled() and x.requires_grad
        key = (tuple(x.shape), x.device.type, training, input_grad)
        choice = self._path_cache.get(key)
        if choice is None:
            choice = cost_model(x.device.type).prefers_bypass(self, x.shape, training, input_grad)
            self._path_cache[key] = choice
        return choice

    def factor_form(self) -> Factors:
        """The exact factored form of the update (see :mod:`visadapt.core.factors`), read by every export.

        Raises ValueError naming the method when it has none (the default).
        """
        raise ValueError(f'{self.config.method} has no exact low-rank (LoRA or Tucker) form: '
                         f'{self.why_no_factors()}')

    def why_no_factors(self) -> str:
        return 'its update is not a product of small factors'

    def mpc_factors(self):
        """Down/up matrices for the MPC regularizers: a list of (A (r×in), B (out×r)) pairs, or None if the method
        has no such factors. Gradients must flow through them (they are the adapter's own parameters or views)."""
        return None

    def why_no_weight_path(self) -> str:
        """Completes "forward_path='weight' is not available ..."."""
        return f'for {type(self).__name__} here ({self.why_not_mergeable()})'

    def why_no_bypass(self) -> str:
        return f'{self.config.method} has no factorized path'

    def why_not_mergeable(self) -> str:
        return 'its update is not a function of the weight alone'

    def metadata(self) -> Dict[str, Any]:
        """JSON-serializable facts saved beside the tensors (e.g. a base-weight fingerprint)."""
        return {}

    def check_metadata(self, meta: Dict[str, Any], where: str) -> None:
        """Raise ValueError if ``meta`` (from a saved adapter) does not fit this layer."""

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def extra_repr(self) -> str:
        return f'shape={tuple(self.site.weight_shape)}, path={self.forward_path}'
