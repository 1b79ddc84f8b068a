"""LoRA: ΔW = (α/r) · B A, the baseline every method is compared against.

Paper: "LoRA: Low-Rank Adaptation of Large Language Models", Hu et al., arXiv:2106.09685.

* Linear ``(out, in)``: A ∈ R^{r×in}, B ∈ R^{out×r}. Trainable: r·(in + out).
* ConvNd, ``conv_form='chain'`` (PEFT's form): A is an r-channel conv with the layer's kernel, stride, padding,
  dilation and groups (per group, shared), B a 1×1 conv r → out. ΔW[o] = Σ_j B[o, j] A[j] reshaped to
  ``(out, in/groups, *k)``. Trainable: r·(in/groups·Πk + out). Has a factorized bypass.
* ConvNd, ``conv_form='reshape'`` (FLoRA paper eq. (3)): ΔW is the rank-r matrix B A of shape (out·k_1) × (in/groups·
  k_2···k_d), folded back to the weight layout (rows: out channel and first kernel dim; columns: in channel and the
  remaining kernel dims). Trainable: r·(out·k_1 + in/groups·k_2···k_d). Weight path only.

Init as in the paper / PEFT: A Kaiming-uniform (a=√5), B = 0, so ΔW = 0 at step 0. ``alpha`` defaults to r (scale 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..core.adapter import Adapter
from ..core.config import AdapterConfig, check_positive_int
from ..core.factors import Factors
from ..core.registry import register
from ..core.site import Site, output_positions, pointwise, run_op
from .mpc import MPCAdapterMixin, MPCConfigMixin

__all__ = ['LoRAConfig', 'LoRAAdapter', 'lora_shapes', 'lora_delta_weight', 'lora_bypass']

CONV_FORMS = ('chain', 'reshape')


@dataclass
class LoRAConfig(MPCConfigMixin, AdapterConfig):
    """LoRA hyper-parameters (plus the MPC fields ``mpc``/``mpc_weight``/``mpc_act``, see :mod:`visadapt.methods.mpc`).

    Attributes:
        r: rank.
        alpha: ΔW is scaled by alpha / r; None means alpha = r.
        conv_form: ``'chain'`` (k×k down conv then 1×1 up conv, as PEFT) or ``'reshape'`` (FLoRA paper eq. 3).
    """
    method = 'LoRA'
    r: int = 8
    alpha: Optional[float] = None
    conv_form: str = 'chain'

    def validate(self) -> None:
        check_positive_int(self.r, 'LoRA rank r')
        if self.conv_form not in CONV_FORMS:
            raise ValueError(f'LoRA conv_form={self.conv_form!r} is not valid; use one of {CONV_FORMS}')
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            raise ValueError(f'LoRA alpha must be a finite number or None, got {self.alpha!r}')

    @property
    def scale(self) -> float:
        return (self.r if self.alpha is None else self.alpha) / self.r


# ---- pure functions ------------------------------------------------------------------------------------------------
def lora_shapes(site: Site, r: int, conv_form: str) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Shapes of (A, B)."""
    if site.kind == 'linear' or conv_form == 'chain':
        return (r, site.in_features, *site.kernel_size), (site.out_features, r)
    k = site.kernel_size
    return (r, site.in_features * math.prod(k[1:])), (site.out_features * k[0], r)


def lora_delta_weight(site: Site, A: torch.Tensor, B: torch.Tensor, scale: float, conv_form: str) -> torch.Tensor:
    """ΔW = scale · B A in the layer's weight layout."""
    delta = (B if scale == 1.0 else scale * B) @ A.flatten(1)   # scale the small factor, not ΔW
    if site.kind == 'linear' or conv_form == 'chain':
        return delta.reshape(site.weight_shape)
    out, cin, k = site.out_features, site.in_features, site.kernel_size
    # rows are (out, k_1), columns (in/groups, k_2, ..., k_d): move k_1 back next to the other kernel dims
    return delta.reshape(out, k[0], cin, *k[1:]).movedim(1, 2)


def lora_bypass(site: Site, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                act: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """scale · op(x, B A) through the chain: the layer's op with A (r channels per group), then a 1×1 with B.

    ``act`` (MPC_n) is applied between the two: scale · B act(A x).
    """
    A, B = A.to(x.dtype), B.to(x.dtype)
    if scale != 1.0:  # on B (out × r), not on the activation-sized output; act comes before B, so it commutes
        B = scale * B
    if site.kind == 'linear':
        z = pointwise(site, x, A)
        return pointwise(site, z if act is None else act(z), B)
    g = site.groups
    z = run_op(site, x, A if g == 1 else A.repeat(g, *([1] * (A.dim() - 1))), groups=g)
    return pointwise(site, z if act is None else act(z), B, groups=g)


# ---- the adapter ----------------------------------------------------------------------------------------------------
@register(LoRAConfig)
class LoRAAdapter(MPCAdapterMixin, Adapter):
    """Tensors: ``A`` (down) and ``B`` (up); shapes from :func:`lora_shapes`."""

    def __init__(self, config: LoRAConfig, site: Site, weight: torch.Tensor):
        super().__init__(config, site, weight)
        self.conv_form = config.conv_form
        self.scale = config.scale
        a_shape, b_shape = lora_shapes(site, config.r, config.conv_form)
        self.A = nn.Parameter(torch.empty(a_shape))
        self.B = nn.Parameter(torch.empty(b_shape))
        self.reset_parameters()
        self._init_mpc(config)

    @property
    def has_bypass(self) -> bool:
        """The conv reshape form is not a chain: weight path only (for Linears both forms are the same)."""
        return self.site.kind == 'linear' or self.conv_form == 'chain'

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.A.view(self.A.shape[0], -1), a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def delta_weight(self) -> torch.Tensor:
        self._check_weight_path()
        return lora_delta_weight(self.site, self.A, self.B, self.scale, self.conv_form)

    def delta_macs(self) -> int:
        return self.B.shape[0] * self.A[0].numel() * self.A.shape[0]

    def bypass(self, x: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return out + lora_bypass(self.site, x, self.A, self.B, self.scale, self.mpc_act)

    def bypass_macs(self, x_shape: Sequence[int]) -> int:
        positions = output_positions(self.site, x_shape)
        return positions * self.site.groups * self.A.numel() + positions * self.B.numel()

    def _up(self) -> torch.Tensor:
        """The effective up matrix (out, r) (MoSLoRA mixes B)."""
        return self.B

    def factor_form(self) -> Factors:
        """down = A (the chain's conv with the layer's kernel), up = scale · B. The conv reshape form is a chain too
        when its first kernel dim is 1 (then its rows are just the output channels)."""
        if not self._is_chain():
            return super().factor_form()
        self._check_weight_path()
        up = self.scale * self._up()
        return Factors(self.A.reshape(self.A.shape[0], *self.site.weight_shape[1:]),
                       up.reshape(*up.shape, *([1] * self.site.ndim)))

    def _is_chain(self) -> bool:
        return self.has_bypass or self.site.kernel_size[0] == 1

    def why_no_bypass(self) -> str:
        return "it needs LoRA conv_form='chain'; the reshape form has only the weight path"

    def why_no_factors(self) -> str:
        if not self._is_chain():
            return "the conv reshape form's ΔW (rows: out channel × first kernel dim) is not a rank-r chain"
        return super().why_no_factors()

    def mpc_factors(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """A flattened to (r, in/groups·Πk) (reshape form: (r, in/groups·k_2···k_d)) and B (out, r)."""
        return [(self.A.flatten(1), self.B)]
