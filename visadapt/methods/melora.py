"""MELoRA: Mini-Ensemble Low-Rank Adapters, ΔW = (α/r) · blockdiag(B_1 A_1, ..., B_n A_n).

Paper: "MELoRA: Mini-Ensemble Low-Rank Adapters for Parameter-Efficient Fine-Tuning", Ren et al., arXiv:2402.17263.

n mini-LoRAs of rank r each act on disjoint slices of the input and write disjoint slices of the output:

* Linear (out, in): A_i ∈ R^{r×(in/n)}, B_i ∈ R^{(out/n)×r}; ΔW is block diagonal with rank up to n·r, for the
  parameters of one rank-r LoRA: r·(in + out).
* ConvNd (out, in/groups, *k): within each of the layer's g groups the in/groups input channels and the out/groups
  output channels are split into n consecutive blocks; A_i (r, in/(g·n), *k) is shared by the groups (as LoRA's
  chain form shares A) and B has its own rows for every output channel, so B_{g,i} ∈ R^{(out/(g·n))×r}. ΔW[o, c] ≠ 0
  only when output channel o and weight column c fall in the same block i. Trainable: r·(in/groups·Πk + out).
* The layer's n is gcd(n, in/groups, out/groups): layers whose channel counts n does not divide use fewer, equal
  blocks (a depthwise conv, with in/groups = 1, gets n = 1, i.e. plain LoRA), like FLoRA clamps its ranks to mode
  sizes. ``adapter.n`` tells the value used.
* Init as LoRA: every A_i Kaiming-uniform (a=√5), B = 0, so ΔW = 0 and the output is the base output bit for bit.
* Computed without Python loops over blocks: ΔW by one batched contraction plus ``torch.diag_embed``; the bypass by
  two grouped ops (the layer's own conv with g·n groups, then a grouped 1×1), or two batched einsums for Linear.
* MPC: each mini-LoRA is an (A_i, B_i) pair for o/d; ``mpc='n'`` computes B_i σ(A_i x_i).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..core.adapter import Adapter
from ..core.config import AdapterConfig, check_positive_int
from ..core.factors import Factors
from ..core.registry import register
from ..core.site import Site, output_positions, pointwise, run_op
from .mpc import MPCAdapterMixin, MPCConfigMixin

__all__ = ['MELoRAConfig', 'MELoRAAdapter', 'melora_blocks', 'melora_delta_weight', 'melora_bypass']


@dataclass
class MELoRAConfig(MPCConfigMixin, AdapterConfig):
    """MELoRA hyper-parameters (plus the MPC fields, see :mod:`visadapt.methods.mpc`).

    Attributes:
        r: rank of each mini-LoRA (ΔW has rank up to n·r).
        n: number of mini-LoRAs (per layer: gcd(n, in/groups, out/groups)).
        alpha: ΔW is scaled by alpha / r; None means alpha = r.
    """
    method = 'MELoRA'
    r: int = 8
    n: int = 2
    alpha: Optional[float] = None

    def validate(self) -> None:
        check_positive_int(self.r, 'MELoRA rank r')
        check_positive_int(self.n, 'MELoRA number of mini-LoRAs n')
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            raise ValueError(f'MELoRA alpha must be a finite number or None, got {self.alpha!r}')

    @property
    def scale(self) -> float:
        return (self.r if self.alpha is None else self.alpha) / self.r


# ---- pure functions ------------------------------------------------------------------------------------------------
def melora_blocks(site: Site, n: int) -> int:
    """Blocks used on this layer: gcd(n, in/groups, out/groups)."""
    return math.gcd(n, site.in_features, site.out_features // site.groups)


def melora_shapes(site: Site, r: int, n: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Shapes of A (n, r, in/(g·n), *k) and B (g, n, out/(g·n), r)."""
    g = site.groups if site.is_conv else 1
    return (n, r, site.in_features // n, *site.kernel_size), (g, n, site.out_features // (g * n), r)


def melora_delta_weight(site: Site, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = scale · blockdiag_i(B_{g,i} A_i) per group, in the layer's weight layout (no loop over blocks)."""
    B = B if scale == 1.0 else scale * B                             # the small factor, not the |W|-sized result
    blocks = torch.einsum('gnor,nrc->gnoc', B, A.flatten(2))        # (g, n, O, C·Πk): the diagonal blocks
    full = torch.diag_embed(blocks.permute(0, 2, 3, 1))              # (g, O, C·Πk, n, n), zero off the diagonal
    full = full.permute(0, 3, 1, 4, 2)                               # (g, n, O, n', C·Πk)
    return full.reshape(site.weight_shape)


def melora_bypass(site: Site, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                  act=None) -> torch.Tensor:
    """scale · op(x, ΔW) through the blocks: per block B_i act(A_i x_i), same shape as the layer output."""
    A, B = A.to(x.dtype), B.to(x.dtype)
    if scale != 1.0:  # on B, not on the activation-sized output (act comes before B)
        B = scale * B
    n, r = A.shape[0], A.shape[1]
    if site.kind == 'linear':
        z = torch.einsum('...nc,nrc->...nr', x.unflatten(-1, (n, -1)), A)
        z = z if act is None else act(z)
        return torch.einsum('...nr,nor->...no', z, B[0]).flatten(-2)
    g = site.groups
    kernel = A.reshape(n * r, *A.shape[2:])                                     # (n·r, in/(g·n), *k)
    if g > 1:  # shared by the layer's groups: (g·n·r, in/(g·n), *k)
        kernel = kernel.repeat(g, *([1] * (A.dim() - 2)))
    z = run_op(site, x, kernel, groups=g * n)
    z = z if act is None else act(z)
    return pointwise(site, z, B.reshape(-1, r), groups=g * n)


# ---- the adapter ----------------------------------------------------------------------------------------------------
@register(MELoRAConfig)
class MELoRAAdapter(MPCAdapterMixin, Adapter):
    """Tensors: ``A`` (n, r, in/(g·n), *k) and ``B`` (g, n, out/(g·n), r); g = 1 for Linear."""
    has_bypass = True

    def __init__(self, config: MELoRAConfig, site: Site, weight: torch.Tensor):
        super().__init__(config, site, weight)
        self.n = melora_blocks(site, config.n)
        self.scale = config.scale
        a_shape, b_shape = melora_shapes(site, config.r, self.n)
        self.A = nn.Parameter(torch.empty(a_shape))
        self.B = nn.Parameter(torch.empty(b_shape))
        self.reset_parameters()
        self._init_mpc(config)

    def reset_parameters(self) -> None:
        n, r = self.A.shape[:2]
        nn.init.kaiming_uniform_(self.A.view(n * r, -1), a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def delta_weight(self) -> torch.Tensor:
        self._check_weight_path()
        return melora_delta_weight(self.site, self.A, self.B, self.scale)

    def delta_macs(self) -> int:
        return self.B[..., 0].numel() * self.A[0].numel()

    def bypass(self, x: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return out + melora_bypass(self.site, x, self.A, self.B, self.scale, self.mpc_act)

    def bypass_macs(self, x_shape: Sequence[int]) -> int:
        g = self.site.groups if self.site.is_conv else 1
        return output_positions(self.site, x_shape) * (g * self.A.numel() + self.B.numel())

    def factor_form(self) -> Factors:
        """A rank-n·r LoRA: down = blockdiag(A_i) (n·r, in/groups, *k), up = scale · blockdiag(B_i) (out, n·r)
        (every group's rows of block i read the columns of mini-LoRA i)."""
        self._check_weight_path()
        n, r = self.A.shape[:2]
        eye = torch.eye(n, dtype=self.A.dtype, device=self.A.device)
        down = torch.einsum('nrc...,nm->nrmc...', self.A, eye).reshape(n * r, n * self.A.shape[2], *self.A.shape[3:])
        up = torch.einsum('gnor,nm->gnomr', self.scale * self.B, eye).reshape(-1, n * r)
        return Factors(down, up.reshape(*up.shape, *([1] * self.site.ndim)))

    def mpc_factors(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """One batched pair: A_i (n, r, in/(g·n)·Πk) and B_i (n, out/n, r) (rows of every group of block i)."""
        n, r = self.A.shape[:2]
        return [(self.A.flatten(2), self.B.transpose(0, 1).reshape(n, -1, r))]

    def extra_repr(self) -> str:
        return f'n={self.n}, r={self.A.shape[1]}, ' + super().extra_repr()
