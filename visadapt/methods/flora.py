"""FLoRA: low-rank updates that keep the weight's N-D structure (Tucker decomposition).

Paper: "Low-Rank Adaptation with Structural Integrity" / FLoRA, Si et al., arXiv:2405.14739, sections 3 and 4.3.

ΔW = s · G ×_1 A^(1) ×_2 A^(2) ×_3 ... ×_N A^(N) over the weight's own modes, in PyTorch's layout:

* Linear ``(out, in)``: ΔW = s · A^(1) G A^(2)ᵀ (the paper's A G Bᵀ with A = A^(1) on the output side);
* ConvNd ``(out, in/groups, k_1, ..., k_d)``: one factor per mode; the in-channel mode has size in/groups, so
  grouped and depthwise convs (in/groups = 1) work. The paper writes the conv core as r1 × r2 × r3 × r3 with
  A ∈ R^{d_in × r1}, B ∈ R^{d_out × r2}; here mode 1 is out (rank ``r``), mode 2 is in/groups (rank ``r``) and the
  kernel modes have rank ``r3``, each clamped to its mode's size.

Init: G = 0, so ΔW = 0 at step 0 and the adapted model starts exactly at the pretrained one. Factors
A^(n) ~ N(0, 1/I_n): each column has unit norm in expectation, the factors are near-orthonormal and
‖ΔW‖_F ≈ s‖G‖_F, so the scale means the same thing for every layer size. (The paper only says "random Gaussian".)

Trainable parameters per layer: Σ_n I_n·J_n + Π_n J_n, e.g. a 3×3 conv 64→128 with r=8, r3=2:
128·8 + 64·8 + 3·2 + 3·2 + 8·8·2·2 = 1,804.

Two forward paths with equal results: build ΔW and run one op with W + ΔW ("weight"), or a factorized chain
("bypass"): a grouped 1×1 projection to r channels per group, a grouped k×k conv with the core (in the layer's own
stride/padding/dilation/padding_mode), and a grouped 1×1 expansion (when r equals in/groups, e.g. RGB stems and
depthwise convs, the projection is folded into the k×k kernel). For Linears and 1×1 convs the chain has two
activation ops, like LoRA's: the projection (in the layer's geometry) and the expansion by A^(1) G, the core folded
into the up factor once per call. The core picks the cheaper path per input shape (visadapt.core.path_cost).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..core.adapter import Adapter
from ..core.config import AdapterConfig, check_positive_int
from ..core.factors import Factors
from ..core.registry import register
from ..core.site import Site, input_positions, output_positions, pointwise, run_op
from .mpc import MPCConfigMixin

__all__ = ['FLoRAConfig', 'FLoRAAdapter', 'flora_ranks', 'flora_num_params', 'mode_product', 'tucker_weight',
           'flora_delta_weight', 'flora_bypass']


@dataclass
class FLoRAConfig(MPCConfigMixin, AdapterConfig):
    """FLoRA hyper-parameters (plus ``mpc='o'``/``'d'`` on the channel factors, see :mod:`visadapt.methods.mpc`).

    Attributes:
        r: rank of the channel modes (out and in/groups), clamped to each mode's size.
        r3: rank of every kernel (spatial) mode, clamped to the kernel size (paper: 2 for 3×3 and larger kernels).
        scale: the constant s multiplying ΔW (paper: 4 for ConvNeXt-V2-L, 0.04 for InternViT-6B, 0.4 for NLP).
    """
    method = 'FLoRA'
    mpc_kinds = ('o', 'd')
    r: int = 8
    r3: int = 2
    scale: float = 1.0

    def validate(self) -> None:
        check_positive_int(self.r, 'FLoRA rank r')
        check_positive_int(self.r3, 'FLoRA spatial rank r3')
        if not math.isfinite(self.scale):
            raise ValueError(f'FLoRA scale must be a finite number, got {self.scale!r}')


# ---- pure functions ------------------------------------------------------------------------------------------------
def flora_ranks(weight_shape: Sequence[int], r: int, r3: int) -> Tuple[int, ...]:
    """Core shape J for a weight of shape I: channel modes rank r, kernel modes rank r3, each ≤ its mode size."""
    return tuple(min(size, r if n < 2 else r3) for n, size in enumerate(weight_shape))


def flora_num_params(weight_shape: Sequence[int], r: int, r3: int) -> int:
    """Σ_n I_n·J_n + Π_n J_n."""
    ranks = flora_ranks(weight_shape, r, r3)
    return sum(i * j for i, j in zip(weight_shape, ranks)) + math.prod(ranks)


def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-n product ``tensor ×_mode matrix`` with ``matrix`` of shape (I_n, J_n): mode ``mode`` goes J_n → I_n.

    Seen as (P, J_n, Q) (P, Q: the sizes of the modes before and after), the product is one (batched) matmul whose
    output is already contiguous in the result's layout: no permutes or copies, which dominated the cost of a small
    layer's ΔW (fewer ops forward and backward).
    """
    # under autocast the previous product comes back in bf16/fp16 while the factors stay fp32: follow the running
    # tensor's dtype (a no-op without autocast)
    matrix = matrix.to(tensor.dtype)
    shape = tensor.shape
    before, after = math.prod(shape[:mode]), math.prod(shape[mode + 1:])
    if after == 1:
        out = tensor.reshape(before, shape[mode]) @ matrix.t()
    elif before == 1:
        out = matrix @ tensor.reshape(shape[mode], after)
    else:
        out = torch.matmul(matrix, tensor.reshape(before, shape[mode], after))
    return out.reshape(*shape[:mode], matrix.shape[0], *shape[mode + 1:])


def tucker_weight(core: torch.Tensor, factors: Sequence[torch.Tensor], modes: Optional[Sequence[int]] = None
                  ) -> torch.Tensor:
    """G ×_n A^(n) for the given modes (default all). Kernel modes first: they are smallest, keeping it cheap.

    A mode whose factor is 1×1 (the kernel modes of a 1×1 conv, the input mode of a depthwise conv) is a product with
    a scalar: all of them become one multiplication of the core, instead of a matmul each with its reshapes forward
    and backward (a third of the ops of ΔW on ConvNeXt and EfficientNet models, docs/bench.md).
    """
    modes = range(core.dim()) if modes is None else modes
    scalar_modes = [n for n in modes if _is_scalar(factors[n])]
    out = core
    if scalar_modes:
        out = core * functools.reduce(torch.mul, (factors[n].reshape(()) for n in scalar_modes)).to(core.dtype)
    for n in sorted(set(modes) - set(scalar_modes), reverse=True):
        out = mode_product(out, factors[n], n)
    return out


def _is_scalar(factor: torch.Tensor) -> bool:
    return factor.shape[0] == 1 and factor.shape[1] == 1


def tucker_ops(ranks: Sequence[int], weight_shape: Sequence[int]) -> int:
    """Ops :func:`tucker_weight` runs over all modes: a matmul per mode with a larger-than-1×1 factor, plus one
    multiplication for the 1×1 ones."""
    scalars = sum(1 for i, j in zip(weight_shape, ranks) if i == 1 and j == 1)
    return len(ranks) - scalars + (1 if scalars else 0)


def flora_delta_weight(core: torch.Tensor, factors: Sequence[torch.Tensor], scale: float) -> torch.Tensor:
    """ΔW = s · G ×_1 A^(1) ... ×_N A^(N), shape (I_1, ..., I_N)."""
    # s scales the (tiny) core, not the |W|-sized result: one fewer pass over ΔW, forward and backward
    return tucker_weight(core if scale == 1.0 else scale * core, factors)


def flora_bypass(site: Site, x: torch.Tensor, core: torch.Tensor, factors: Sequence[torch.Tensor],
                 scale: float) -> torch.Tensor:
    """ΔW applied to ``x`` without building ΔW: returns s · op(x, ΔW), same shape as the layer output."""
    core, factors = core.to(x.dtype), [f.to(x.dtype) for f in factors]
    if scale != 1.0:  # on the core, not on the activation-sized output
        core = scale * core
    if site.kind == 'linear':  # the core folded into the up factor (out·r_out·r_in MACs once): two activation ops
        z = pointwise(site, x, factors[1].t())              # (..., r_in)
        return pointwise(site, z, factors[0] @ core)       # (..., out)
    g = site.groups
    if _pointwise_chain(site, core.shape[1]):
        # 1×1 kernels: the down projection runs with the layer's geometry (stride, padding) and the core (with its
        # 1×1 kernel-mode factors) folds into the up factor: two convs instead of three, as LoRA
        down = factors[1].t().reshape(core.shape[1], site.in_features, *([1] * site.ndim))
        z = run_op(site, x, down if g == 1 else down.repeat(g, *([1] * (down.dim() - 1))), groups=g)
        up = factors[0] @ tucker_weight(core, factors, modes=range(2, core.dim())).flatten(1)   # (out, r_in)
        return pointwise(site, z, up, groups=g)                                               # (N, out, *S')
    # r_in = in/g (RGB stems, depthwise convs): the projection would not reduce anything, so fold A^(2) into the
    # kernel instead of running a full-resolution 1×1 conv (same result: the 1×1 commutes with padding)
    fold = core.shape[1] == site.in_features
    kernel = tucker_weight(core, factors, modes=range(1 if fold else 2, core.dim()))  # (r_out, r_in or in/g, *k)
    if not fold:
        down = factors[1].t()                                           # (r_in, in/g), shared by the groups
        x = pointwise(site, x, down if g == 1 else down.repeat(g, 1), groups=g)  # (N, g·r_in, *S)
    if g > 1:  # (a repeat with g == 1 would only copy the kernel and add an autograd node)
        kernel = kernel.repeat(g, *([1] * (kernel.dim() - 1)))
    z = run_op(site, x, kernel, groups=g)                               # layer geometry, g·r_out channels
    return pointwise(site, z, factors[0], groups=g)                     # (N, out, *S')


def _pointwise_chain(site: Site, r_in: int) -> bool:
    """A conv with 1×1 kernels whose in-factor reduces the channels: run the two-op chain (down, core·up)."""
    return all(k == 1 for k in site.kernel_size) and r_in < site.in_features


def _mode_products_macs(shape: Sequence[int], weight_shape: Sequence[int], modes: Sequence[int]) -> int:
    """MACs of :func:`tucker_weight` on a core of ``shape`` over ``modes`` (last mode first, as it runs; the 1×1
    factors' scalar multiplication is not a matmul)."""
    size, macs = list(shape), 0
    for n in sorted(modes, reverse=True):
        if size[n] == 1 and weight_shape[n] == 1:
            continue
        macs += math.prod(size) * weight_shape[n]
        size[n] = weight_shape[n]
    return macs


def flora_bypass_macs(site: Site, x_shape: Sequence[int], ranks: Sequence[int]) -> int:
    """MACs of :func:`flora_bypass`, the per-call work on the factors included."""
    r_out, r_in, ws = ranks[0], ranks[1], site.weight_shape
    fold_core = site.out_features * r_out * r_in                    # up = A^(1) G
    if site.kind == 'linear':
        return input_positions(site, x_shape) * (site.in_features + site.out_features) * r_in + fold_core
    g, positions = site.groups, output_positions(site, x_shape)
    kernel_modes = _mode_products_macs(ranks, ws, range(2, len(ranks)))
    if _pointwise_chain(site, r_in):
        return positions * (g * site.in_features + site.out_features) * r_in + kernel_modes + fold_core
    fold_in = r_in == site.in_features
    kernel = _mode_products_macs(ranks, ws, range(1 if fold_in else 2, len(ranks)))
    project = 0 if fold_in else input_positions(site, x_shape) * g * site.in_features * r_in
    return kernel + project + positions * (g * r_out * r_in * math.prod(site.kernel_size) + site.out_features * r_out)


def flora_delta_macs(weight_shape: Sequence[int], ranks: Sequence[int]) -> int:
    return _mode_products_macs(ranks, weight_shape, range(len(ranks)))


# ---- the adapter ----------------------------------------------------------------------------------------------------
@register(FLoRAConfig)
class FLoRAAdapter(Adapter):
    """Tensors: ``G`` (core, shape J) and ``A1..AN`` (factor n: (I_n, J_n))."""
    has_bypass = True

    def __init__(self, config: FLoRAConfig, site: Site, weight: torch.Tensor):
        super().__init__(config, site, weight)
        self.ranks = flora_ranks(site.weight_shape, config.r, config.r3)
        self.scale = config.scale
        self.G = nn.Parameter(torch.empty(self.ranks))
        self.factors = nn.ParameterList([nn.Parameter(torch.empty(i, j))
                                         for i, j in zip(site.weight_shape, self.ranks)])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.G)
        for factor in self.factors:
            nn.init.normal_(factor, std=factor.shape[0] ** -0.5)

    def delta_weight(self) -> torch.Tensor:
        return flora_delta_weight(self.G, list(self.factors), self.scale)

    def delta_macs(self) -> int:
        return flora_delta_macs(self.site.weight_shape, self.ranks)

    def bypass(self, x: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return out + flora_bypass(self.site, x, self.G, list(self.factors), self.scale)

    def bypass_macs(self, x_shape: Sequence[int]) -> int:
        return flora_bypass_macs(self.site, x_shape, self.ranks)

    def bypass_ops(self) -> int:
        """Linears and 1×1 convs: down, A^(1) G, up; other convs: down, core (the spatial conv), up, or two calls
        when r_in = in/g folds the down into the kernel."""
        return 2 if self.site.is_conv and self.ranks[1] == self.site.in_features else 3

    def delta_ops(self) -> int:
        return tucker_ops(self.ranks, self.site.weight_shape)

    def factor_form(self) -> Factors:
        """Linear: down = G A^(2)ᵀ (r_out, in), up = s·A^(1). ConvNd: the Tucker form down = A^(2)ᵀ (1×1),
        mid = G ×₃ A^(3) ... (the kernel modes), up = s·A^(1) (1×1)."""
        ones = (1,) * self.site.ndim
        up = self.scale * self.factors[0]
        if self.site.kind == 'linear':
            return Factors(self.G @ self.factors[1].t(), up)
        mid = tucker_weight(self.G, list(self.factors), modes=range(2, self.G.dim()))     # (r_out, r_in, *k)
        down = self.factors[1].t()                                                        # (r_in, in/groups)
        return Factors(down.reshape(*down.shape, *ones), up.reshape(*up.shape, *ones), mid)

    def mpc_factors(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """A = A^(2)ᵀ (r_in, in/groups) on the input side, B = A^(1) (out, r_out) on the output side."""
        return [(self.factors[1].t(), self.factors[0])]

    def extra_repr(self) -> str:
        return f'ranks={self.ranks}, scale={self.scale}, ' + super().extra_repr()
