"""DoRA: Weight-Decomposed Low-Rank Adaptation, W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_c, with ΔW the LoRA update.

Paper: "DoRA: Weight-Decomposed Low-Rank Adaptation", Liu et al., arXiv:2402.09353.

DoRA is a LoRA variant, written on top of :mod:`visadapt.methods.lora` (same A, B, init, conv forms and pure
functions); it adds a magnitude vector:

* ``m`` ∈ R^{out}: one magnitude per output channel (per row of W for Linear, per output filter of a ConvNd);
  ‖·‖_c is the norm of each output channel's weights, i.e. over the (in/groups, *k) entries of row o. The paper's
  W ∈ R^{d×k} with column-wise norms ‖·‖_c acts as x W, so its columns are our rows.
* Init: m = ‖W‖_c (computed in float32 from the base weight) and LoRA's B = 0, so W' = W (the ratio m / ‖W‖_c is
  exactly 1.0, so the output is the base output bit for bit).
* The norm ‖W + ΔW‖_c is detached in the backward pass (paper §4.3, "reduction of training overhead"): gradients
  flow through m and W + ΔW but not through the norm.
* Trainable parameters per layer: LoRA's count + out, e.g. Linear r·(in + out) + out; ConvNd (chain form)
  r·(in/groups·Πk + out) + out.
* Merge writes W' into the weight and remembers the row norms ‖W + ΔW‖_c it divided by (out floats, not saved);
  unmerge inverts it exactly up to rounding: W = W'·‖W + ΔW‖_c / m − ΔW. (W' alone does not determine W: its
  row norms are |m| whatever W was.)
* Weight path only: the bypass form needs ‖W + ΔW‖_c, i.e. the base weight, which a bypass does not see.
* MPC: ``mpc='o'``/``'d'`` regularize LoRA's A and B; ``'n'`` is refused (the norm needs ΔW as a matrix).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..core.factors import Factors
from ..core.registry import register
from ..core.site import Site
from .lora import LoRAAdapter, LoRAConfig

__all__ = ['DoRAConfig', 'DoRAAdapter', 'channel_norm', 'dora_weight']


@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA hyper-parameters: those of :class:`LoRAConfig` (r, alpha, conv_form, MPC o/d)."""
    method = 'DoRA'
    mpc_kinds = ('o', 'd')


# ---- pure functions ------------------------------------------------------------------------------------------------
def channel_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖_c: the L2 norm of each output channel's weights, shape (out,), in float32 or wider."""
    return weight.to(torch.promote_types(weight.dtype, torch.float32)).flatten(1).norm(dim=1)


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, m: torch.Tensor):
    """(W', ‖W + ΔW‖_c detached): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_c in W's dtype (math in float32 or wider)."""
    dtype = torch.promote_types(torch.promote_types(weight.dtype, delta.dtype), torch.float32)
    v = weight.to(dtype) + delta.to(dtype)
    norm = channel_norm(v).detach()
    # an all-zero row (pretrained nets have dead channels, e.g. 5 depthwise filters of EfficientNet-Lite0) stays zero
    # instead of 0/0 = NaN: any finite divisor gives m · 0 = 0 there
    scale = (m.to(dtype) / torch.where(norm > 0, norm, torch.ones_like(norm))).view(-1, *([1] * (weight.dim() - 1)))
    return (v * scale).to(weight.dtype), norm


# ---- the adapter ----------------------------------------------------------------------------------------------------
@register(DoRAConfig)
class DoRAAdapter(LoRAAdapter):
    """Tensors: LoRA's ``A``, ``B`` and the magnitude ``m`` (out,); buffer ``w_norm`` = ‖W‖_c (not saved)."""
    has_bypass = False  # the norm ‖W + ΔW‖_c needs W, which a bypass does not see

    def __init__(self, config: DoRAConfig, site: Site, weight: torch.Tensor):
        super().__init__(config, site, weight)
        self.register_buffer('w_norm', channel_norm(weight.detach()), persistent=False)
        self.m = nn.Parameter(self.w_norm.clone())
        self._merged_norm: Optional[torch.Tensor] = None

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, 'm'):
            with torch.no_grad():
                self.m.copy_(self.w_norm)

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        merged, norm = dora_weight(weight, self.delta_weight(), self.m)
        self._merged_norm = norm  # what unmerge divides back out (only the call made by merge is ever used)
        return merged

    def check_restorable(self) -> None:
        if self._merged_norm is None:
            raise ValueError('DoRA restored_weight needs the norms recorded by a previous adapted_weight (merge)')
        if bool((self.m == 0).any()):
            raise ValueError('a DoRA magnitude m is exactly 0, so that output channel was erased by merge')

    def restored_weight(self, merged: torch.Tensor) -> torch.Tensor:
        self.check_restorable()
        dtype = torch.promote_types(merged.dtype, torch.float32)
        ratio = (self._merged_norm.to(dtype) / self.m.to(dtype)).view(-1, *([1] * (merged.dim() - 1)))
        return (merged.to(dtype) * ratio - self.delta_weight().to(dtype)).to(merged.dtype)

    def factor_form(self) -> Factors:
        """LoRA's chain (down = A, up = scale · B) and the magnitude m; needs the chain form."""
        return dataclasses.replace(super().factor_form(), magnitude=self.m)

    def _is_chain(self) -> bool:  # DoRA has no bypass: read the form from the config
        return self.site.kind == 'linear' or self.conv_form == 'chain' or self.site.kernel_size[0] == 1

    def why_no_bypass(self) -> str:
        return 'the norm ‖W + ΔW‖_c needs the base weight, which a bypass does not see'

    def delta_macs(self) -> int:
        return super().delta_macs() + 2 * self.B.shape[0] * self.A[0].numel()

    def extra_repr(self) -> str:
        return f'r={self.A.shape[0]}, ' + super().extra_repr()
