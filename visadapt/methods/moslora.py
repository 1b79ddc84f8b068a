"""MoSLoRA: Mixture-of-Subspaces LoRA, ΔW = (α/r) · B M A with a trainable r×r mixer M.

Paper: "Mixture-of-Subspaces in Low-Rank Adaptation", Wu et al., arXiv:2406.11909.

A LoRA variant written on top of :mod:`visadapt.methods.lora`: A ∈ R^{r×in} (down) and B ∈ R^{out×r} (up) are
LoRA's (same shapes, conv forms and init), and the mixer M ∈ R^{r×r} fuses the r rank-one subspaces. ΔW and the
bypass are LoRA's with B replaced by B M (the paper's W_up · W_mixer · W_down, transposed into ``y = W x``).

* Init as the paper: A and M Kaiming-uniform (a=√5), B = 0, so ΔW = 0 and the output is the base output bit for
  bit at step 0.
* Trainable parameters per layer: LoRA's + r², e.g. Linear r·(in + out) + r²; ConvNd chain form
  r·(in/groups·Πk + out) + r².
* MPC: o/d regularize A and B (M plays the role of the paper's G); ``mpc='n'`` computes B M σ(A x).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..core.registry import register
from ..core.site import Site
from .lora import LoRAAdapter, LoRAConfig, lora_bypass, lora_delta_weight

__all__ = ['MoSLoRAConfig', 'MoSLoRAAdapter']


@dataclass
class MoSLoRAConfig(LoRAConfig):
    """MoSLoRA hyper-parameters: those of :class:`LoRAConfig` (r, alpha, conv_form, MPC)."""
    method = 'MoSLoRA'


@register(MoSLoRAConfig)
class MoSLoRAAdapter(LoRAAdapter):
    """Tensors: LoRA's ``A`` and ``B`` and the mixer ``M`` (r, r)."""

    def __init__(self, config: MoSLoRAConfig, site: Site, weight: torch.Tensor):
        super().__init__(config, site, weight)
        self.M = nn.Parameter(torch.empty(config.r, config.r))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, 'M'):
            nn.init.kaiming_uniform_(self.M, a=math.sqrt(5))

    def _up(self) -> torch.Tensor:
        """The effective up matrix B M (out, r) (also LoRA's factored form's up, scaled)."""
        return self.B @ self.M

    def delta_weight(self) -> torch.Tensor:
        self._check_weight_path()
        return lora_delta_weight(self.site, self.A, self._up(), self.scale, self.conv_form)

    def delta_macs(self) -> int:
        return super().delta_macs() + self.B.numel() * self.M.shape[0]

    def bypass(self, x: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return out + lora_bypass(self.site, x, self.A, self._up(), self.scale, self.mpc_act)

    def bypass_ops(self) -> int:  # B M once, then the A → (B M) chain
        return 3

    def delta_ops(self) -> int:
        return 2

    def bypass_macs(self, x_shape: Sequence[int]) -> int:
        return super().bypass_macs(x_shape) + self.B.numel() * self.M.shape[0]
