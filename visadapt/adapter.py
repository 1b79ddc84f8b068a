"""The per-layer adapter base class: the one contract every method implements.

A method subclasses :class:`Adapter`, declares its tensors in ``__init__``, initializes them in
``reset_parameters`` and gives its update in one (or both) of two forms:

* ``delta_weight()``: the scaled ΔW in the layer's own weight layout. The core then merges, unmerges and runs the
  "weight" path (one op with W + ΔW) for it. Multiplicative methods override ``adapted_weight`` /
  ``restored_weight`` instead.
* ``bypass(x, out, bias)``: a factorized path that adds the update to the frozen layer's output without
  materializing ΔW, with ``bypass_macs`` so the core can pick the cheaper path per input shape.

Everything else (targeting, freezing, merge bookkeeping, save/load, dtype policy) is written once in the core.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .path_cost import cost_model
from .site import Site

__all__ = ['Adapter']

FORWARD_PATHS = ('auto', 'weight', 'bypass')


class Adapter(nn.Module):
    """One method's trainable update for one layer (or one slice of a fused layer).

    Args:
        config: the method's config, already specialised for this layer (per-pattern overrides applied).
        site: the adapted weight's geometry.
        weight: the frozen base weight (read-only; SVD-based methods derive buffers from it).
    """
    #: can this update be folded into W exactly?
    mergeable: ClassVar[bool] = True
    #: does the method implement ``delta_weight``/``adapted_weight`` (the weight path)?
    has_weight_path: ClassVar[bool] = True
    #: does the method implement ``bypass``/``bypass_macs`` (the factorized path)?
    has_bypass: ClassVar[bool] = False

    def __init__(self, config: Any, site: Site, weight: torch.Tensor):
        super().__init__()
        self.config = config
        self.site = site
        self.forward_path = getattr(config, 'forward_path', 'auto')
        if self.forward_path not in FORWARD_PATHS:
            raise ValueError(f"forward_path={self.forward_path!r} is not valid; use one of {FORWARD_PATHS}")
        if self.forward_path == 'bypass' and not self.has_bypass:
            raise ValueError(f"forward_path='bypass' is not available for {type(self).__name__}; use 'weight' or 'auto'")
        if self.forward_path == 'weight' and not self.has_weight_path:
            raise ValueError(f"forward_path='weight' is not available for {type(self).__name__}; use 'bypass' or 'auto'")
        self._path_cache: Dict[Tuple, bool] = {}

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
        """Matmul/conv calls in one forward of :meth:`bypass` (each has a fixed cost, see ``visadapt.path_cost``)."""
        return 2

    def delta_ops(self) -> int:
        """Matmul calls that build ΔW once."""
        return 1

    # ---- choices and bookkeeping ---------------------------------------------------------------------------------
    def use_bypass(self, x: torch.Tensor) -> bool:
        """Pick the path for this input: forced by ``config.forward_path``, else the one
        :mod:`visadapt.path_cost` predicts cheaper for this shape, device and mode (training or not); cached per
        input shape."""
        if self.forward_path == 'bypass' or not self.has_weight_path:
            return True
        if self.forward_path == 'weight' or not self.has_bypass:
            return False
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        input_grad = torch.is_grad_enabled() and x.requires_grad
        key = (tuple(x.shape), x.device.type, training, input_grad)
        choice = self._path_cache.get(key)
        if choice is None:
            choice = cost_model(x.device.type).prefers_bypass(self, x.shape, training, input_grad)
            self._path_cache[key] = choice
        return choice

    def mpc_factors(self):
        """Down/up matrices for the MPC regularizers: a list of (A (r×in), B (out×r)) pairs, or None if the method
        has no such factors. Gradients must flow through them (they are the adapter's own parameters or views)."""
        return None

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
