"""SeRA: Vector Segmented and Recombined Adaptation, ΔW = α · B C A with block-diagonal A and B.

Paper: "SeRA: Vector Segmented and Recombined Adaptation for Parameter-Efficient Fine-Tuning" (ICLR 2025
submission), section 3 (structure) and 3.2 (parameter count).

The paper writes row vectors, h = x W with x ∈ R^{d_in}: x is split into ``split`` sub-vectors x_i ∈ R^{d_in/split},
each reduced by its own A_i ∈ R^{(d_in/split)×(r/split)}; the concatenated r-vector is recombined by a dense
C ∈ R^{r×r} and expanded block-wise by B_i ∈ R^{(r/split)×(d_out/split)}, and the update is scaled by the constant α.
In visadapt's ``y = W x`` convention (W ∈ R^{out×in}) every matrix is transposed:

    ΔW = α · B C A,   A = blockdiag(A_1, …, A_s) ∈ R^{r×in},   C ∈ R^{r×r},   B = blockdiag(B_1, …, B_s) ∈ R^{out×r}

with A_i ∈ R^{(r/s)×(in/s)} and B_i ∈ R^{(out/s)×(r/s)}, s = ``split``. ``split`` must divide r, in and out
(the paper's default, also ours, is split = r: every A_i and B_i is a single row/column).

Tensors are stored as stacks of their blocks, ``A`` (s, r/s, in/s) and ``B`` (s, out/s, r/s); the block-diagonal
matrices are never built. The bypass is x → per-segment batched matmul with A → C → per-segment batched matmul
with B, costing (in + out)·r/s + r² multiply-accumulates per token (LoRA at rank r: (in + out)·r). ΔW is built by two
batched matmuls in out·r²/s + out·in·r/s.

Init as the paper's GLUE setup: A and C Kaiming-uniform (a=√5, fan-in of one block: in/s for A, r for C), B = 0, so
ΔW = 0 and the adapted model equals the pretrained one at step 0.

Trainable parameters per layer exactly (in + out)·r/s + r², e.g. ViT-B q with r=16, s=16: (768 + 768)·1 + 256 = 1,792.

Layers: ``nn.Linear``, fused qkv slices (``slices=['q', 'v']``) and ``nn.MultiheadAttention`` in-projections. Convs
are not supported: a segment of a conv's input would have to be a group of input channels with its whole kernel,
and depthwise/grouped kernels (in/groups = 1) cannot be segmented, so SeRA declares Linear layers only.

MPC (:mod:`visadapt.methods.mpc`): ``mpc='o'``/``'d'`` regularize A and B. Their Gram matrices are block-diagonal, so the
penalty is computed exactly from the blocks (A_i A_iᵀ and B_iᵀ B_i); ``mpc='n'`` computes α · B C σ(A x).
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
from ..core.site import Site
from .mpc import MPCAdapterMixin, MPCConfigMixin

__all__ = ['SeRAConfig', 'SeRAAdapter', 'sera_num_params', 'sera_check_split', 'sera_delta_weight', 'sera_bypass']


@dataclass
class SeRAConfig(MPCConfigMixin, AdapterConfig):
    """SeRA hyper-parameters (plus the MPC fields ``mpc``/``mpc_weight``/``mpc_act``, see :mod:`visadapt.methods.mpc`).

    Attributes:
        r: rank of the recombination matrix C (the width of the bottleneck).
        split: number of segments s; must divide r and the layer's in and out features. None means s = r (paper).
        alpha: the constant α multiplying ΔW (the paper scales x ΔW by α "consistent with LoRA").
    """
    method = 'SeRA'
    supported_types = (nn.Linear, nn.MultiheadAttention)
    r: int = 8
    split: Optional[int] = None
    alpha: float = 1.0

    def validate(self) -> None:
        check_positive_int(self.r, 'SeRA rank r')
        if self.split is not None:
            check_positive_int(self.split, 'SeRA split')
            if self.r % self.split:
                raise ValueError(f'SeRA split={self.split} must divide the rank r={self.r}; valid splits for '
                                 f'r={self.r}: '
                                 f'{[s for s in range(1, self.r + 1) if self.r % s == 0]}')
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ValueError(f'SeRA alpha must be a finite number, got {self.alpha!r}')

    @property
    def num_segments(self) -> int:
        return self.r if self.split is None else self.split


# ---- pure functions ------------------------------------------------------------------------------------------------
def sera_num_params(in_features: int, out_features: int, r: int, split: int) -> int:
    """(in + out)·r/split + r²."""
    return (in_features + out_features) * r // split + r * r


def sera_check_split(in_features: int, out_features: int, r: int, split: int) -> None:
    """Raise ValueError unless ``split`` divides r, in_features and out_features."""
    bad = [f'{what}={n}' for what, n in (('r', r), ('in_features', in_features), ('out_features', out_features))
           if n % split]
    if bad:
        raise ValueError(f'SeRA split={split} must divide r, in_features and out_features, but does not divide '
                         f'{", ".join(bad)}; pick a split that divides gcd(r, in, out) = '
                         f'{math.gcd(r, math.gcd(in_features, out_features))}')


def sera_delta_weight(A: torch.Tensor, C: torch.Tensor, B: torch.Tensor, alpha: float) -> torch.Tensor:
    """ΔW = α · B C A (out, in) from the blocks ``A`` (s, r/s, in/s), ``C`` (r, r), ``B`` (s, out/s, r/s).

    (B C) has row block i equal to B_i C[rows of segment i] (one bmm); (B C) A has column block j equal to
    (B C)[:, columns of segment j] A_j (a second bmm). Neither block-diagonal matrix is formed.
    """
    s, rs, in_s = A.shape
    out_s = B.shape[1]
    bc = torch.bmm(B, C.view(s, rs, s * rs))                         # (s, out/s, r): row blocks of B C
    bc = bc.reshape(s * out_s, s, rs).transpose(0, 1)                # (s, out, r/s): column blocks of B C
    delta = torch.bmm(bc, A)                                         # (s, out, in/s): column blocks of ΔW
    return alpha * delta.transpose(0, 1).reshape(s * out_s, s * in_s)


def sera_bypass(x: torch.Tensor, A: torch.Tensor, C: torch.Tensor, B: torch.Tensor, alpha: float,
                act: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """α · B C act(A x) on the last dim of ``x`` (..., in) → (..., out) without the block-diagonal matrices."""
    A, C, B = A.to(x.dtype), C.to(x.dtype), B.to(x.dtype)
    s, rs, in_s = A.shape
    lead = x.shape[:-1]
    z = torch.einsum('nsi,sri->nsr', x.reshape(-1, s, in_s), A)      # per-segment reduction: (N, s, r/s)
    if act is not None:
        z = act(z)
    z = (z.reshape(-1, s * rs) @ C.t()).view(-1, s, rs)             # recombination by C: (N, s, r/s)
    y = torch.einsum('nsr,sor->nso', z, B)                           # per-segment expansion: (N, s, out/s)
    return alpha * y.reshape(*lead, s * B.shape[1])


# ---- the adapter ----------------------------------------------------------------------------------------------------
@register(SeRAConfig)
class SeRAAdapter(MPCAdapterMixin, Adapter):
    """Tensors: ``A`` (s, r/s, in/s), ``C`` (r, r), ``B`` (s, out/s, r/s): the blocks of ΔW = α · B C A."""
    has_bypass = True

    def __init__(self, config: SeRAConfig, site: Site, weight: torch.Tensor):
        super().__init__(config, site, weight)
        if site.kind != 'linear':
            raise TypeError(f'SeRA adapts Linear weights only, got a {site.kind} layer of weight shape '
                            f'{tuple(site.weight_shape)}')
        r, s = config.r, config.num_segments
        out_f, in_f = site.out_features, site.in_features
        sera_check_split(in_f, out_f, r, s)
        self.alpha = float(config.alpha)
        self.A = nn.Parameter(torch.empty(s, r // s, in_f // s))
        self.C = nn.Parameter(torch.empty(r, r))
        self.B = nn.Parameter(torch.empty(s, out_f // s, r // s))
        self.reset_parameters()
        self._init_mpc(config)

    def reset_parameters(self) -> None:
        # Kaiming-uniform with a=√5 (PyTorch's Linear default, used by LoRA): U(-1/√fan_in, 1/√fan_in)
        bound = 1.0 / math.sqrt(self.A.shape[2])                       # fan-in of one A block: in/s
        nn.init.uniform_(self.A, -bound, bound)
        nn.init.kaiming_uniform_(self.C, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def delta_weight(self) -> torch.Tensor:
        self._check_weight_path()
        return sera_delta_weight(self.A, self.C, self.B, self.alpha)

    def delta_macs(self) -> int:
        s, rs, in_s = self.A.shape
        out_f = self.B.shape[0] * self.B.shape[1]
        return out_f * rs * s * rs + out_f * rs * in_s * s          # out·r²/s + out·in·r/s

    def bypass(self, x: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return out + sera_bypass(x, self.A, self.C, self.B, self.alpha, self.mpc_act)

    def bypass_ops(self) -> int:  # A, C, B
        return 3

    def delta_ops(self) -> int:
        return 2

    def bypass_macs(self, x_shape: Sequence[int]) -> int:
        return math.prod(x_shape[:-1]) * (self.A.numel() + self.C.numel() + self.B.numel())

    def factor_form(self) -> Factors:
        """down = blockdiag(A_1..A_s) (r, in), up = α · blockdiag(B_1..B_s) C (out, r)."""
        self._check_weight_path()
        return Factors(torch.block_diag(*self.A), self.alpha * torch.block_diag(*self.B) @ self.C)

    def mpc_factors(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """The blocks ``A`` (s, r/s, in/s) and ``B`` (s, out/s, r/s) as a batch of s pairs.

        A and B are block-diagonal, so A Aᵀ = blockdiag(A_i A_iᵀ) and Bᵀ B = blockdiag(B_iᵀ B_i): the MPC penalty of
        the full matrices is exactly the sum of the per-block penalties (the off-diagonal blocks are zero).
        """
        return [(self.A, self.B)]

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, r={self.C.shape[0]}, split={self.A.shape[0]}, alpha={self.alpha}'
