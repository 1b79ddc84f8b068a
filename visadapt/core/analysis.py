"""What did an adapter learn? ΔW per layer, its spectrum, its norm, feature amplification and subspace similarity.

* ΔW of adapter ``name`` on a layer is ``adapted_weight(W) − W`` computed in float64 from the layer's current base
  weight W, so it covers additive (LoRA, FLoRA, SeRA, ...) and multiplicative ((IA)³, SSL, SSB, DoRA) methods alike.
  Only unmerged adapters with a weight form are analysed (merged ones: unmerge first; ``mpc='n'`` has no ΔW).
* Matrix form: a ConvNd ΔW of shape (out, in/groups, *k) is flattened to (out, in/groups·Πk), PyTorch's own row
  layout (one row per output filter). For a grouped conv the rows of every group share the column space.
* Singular values σ_1 ≥ σ_2 ≥ ... of that matrix; ‖ΔW‖_F = sqrt(Σ σ_i²).
* Feature amplification factor (LoRA paper §7.3, FLoRA paper App. B.2.1): ‖ΔW‖_F / ‖Uᵀ W V‖_F with U, V the top-r
  left/right singular vectors of ΔW and r the adapter's rank (default: the numerical rank of ΔW, which is the
  configured r for LoRA-type adapters once both factors are non-zero; pass ``rank`` to fix it).
* Subspace similarity (SeRA paper eq. 4, after the LoRA paper §7.2): for two updates of the same layer,
  φ(ΔW_1, ΔW_2, i, j) = ‖U_1^(i)ᵀ U_2^(j)‖²_F / min(i, j) ∈ [0, 1], U^(i) the top-i left singular vectors. φ of an
  update with itself is 1 on the diagonal i = j.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .layer import is_adapted, iter_adapted

__all__ = ['LayerAnalysis', 'delta_weight', 'delta_matrix', 'numerical_rank', 'amplification_factor',
           'subspace_similarity', 'analyze', 'compare']


@dataclass
class LayerAnalysis:
    """The numbers for one adapted layer (tensors in float64 on the CPU).

    Attributes:
        layer, adapter, method: where and what.
        weight_shape: ΔW in the layer's layout; ``matrix_shape``: its (out, in/groups·Πk) matrix form.
        singular_values: (min(out, cols),) descending.
        frobenius_norm: ‖ΔW‖_F.
        rank: r used for the amplification factor; ``numerical_rank``: singular values above the tolerance.
        amplification_factor: ‖ΔW‖_F / ‖Uᵀ W V‖_F (nan when ΔW = 0).
        left_vectors: U of ΔW, (out, rank) (kept for :func:`compare`).
    """
    layer: str
    adapter: str
    method: str
    weight_shape: List[int]
    matrix_shape: List[int]
    singular_values: torch.Tensor
    frobenius_norm: float
    rank: int
    numerical_rank: int
    amplification_factor: float
    left_vectors: torch.Tensor = field(repr=False)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready numbers (no singular vectors)."""
        return {'layer': self.layer, 'adapter': self.adapter, 'method': self.method,
                'weight_shape': self.weight_shape, 'matrix_shape': self.matrix_shape, 'rank': self.rank,
                'numerical_rank': self.numerical_rank, 'frobenius_norm': self.frobenius_norm,
                'amplification_factor': self.amplification_factor,
                'singular_values': self.singular_values.tolist()}


# ---- pure functions ------------------------------------------------------------------------------------------------
def delta_matrix(delta: torch.Tensor) -> torch.Tensor:
    """ΔW as a matrix: (out, in) for Linear, (out, in/groups·Πk) for ConvNd."""
    return delta.reshape(delta.shape[0], -1)


def numerical_rank(singular_values: torch.Tensor, rtol: float = 1e-5) -> int:
    """Number of singular values above ``rtol``·σ_1 (ΔW is built from float32 tensors: its noise is ~1e-7·σ_1)."""
    if singular_values.numel() == 0 or singular_values[0] <= 0:
        return 0
    return int((singular_values > rtol * singular_values[0]).sum())


def amplification_factor(delta: torch.Tensor, weight: torch.Tensor, rank: int) -> float:
    """‖ΔW‖_F / ‖Uᵀ W V‖_F with U (out, r), V (cols, r) the top-``rank`` singular vectors of ΔW (matrix forms)."""
    delta, weight = delta_matrix(delta).double(), delta_matrix(weight).double()
    if rank <= 0 or not torch.any(delta):
        return float('nan')
    U, _, Vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, U.shape[1])
    projected = U[:, :rank].T @ weight @ Vh[:rank].T
    return float(torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(projected))


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """φ[i−1, j−1] = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j) for every i ≤ U1's columns and j ≤ U2's columns.

    Args:
        U1: (out, I) orthonormal columns (top singular vectors of ΔW_1, descending).
        U2: (out, J) the same for ΔW_2 (same layer, same ``out``).
    Returns:
        (I, J) float64 tensor with entries in [0, 1].
    """
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f'subspace_similarity needs singular vectors of the same length, got {tuple(U1.shape)} and '
                         f'{tuple(U2.shape)} (two different layers?)')
    overlap = (U1.double().T @ U2.double()).square()                    # (I, J)
    cumulative = overlap.cumsum(0).cumsum(1)                            # Σ_{a≤i, b≤j}
    i = torch.arange(1, overlap.shape[0] + 1, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(1, overlap.shape[1] + 1, dtype=torch.float64).unsqueeze(0)
    return cumulative / torch.minimum(i, j)


# ---- model level ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def delta_weight(module: nn.Module, name: str = 'default') -> torch.Tensor:
    """ΔW of adapter ``name`` on adapted layer ``module``, float64, in the layer's weight layout.

    Raises ValueError if the adapter is merged (the base weight is not at hand) or has no weight form (MPC_n).
    """
    if not is_adapted(module):
        raise ValueError(f'{type(module).__name__} holds no adapter')
    return module.delta_weight(name, torch.float64)


def analyze(model: nn.Module, name: str = 'default', rank: Optional[int] = None,
            layers: Optional[Sequence[str]] = None) -> List[LayerAnalysis]:
    """Per-layer numbers for adapter ``name``, in model order.

    Args:
        rank: r for the amplification factor and the number of singular vectors kept for :func:`compare`;
            default: each layer's numerical rank.
        layers: optional glob patterns restricting the layers.
    """
    out = []
    for layer_name, module in iter_adapted(model, name):
        if layers and not any(fnmatch.fnmatchcase(layer_name, p) for p in layers):
            continue
        delta = delta_weight(module, name)
        matrix = delta_matrix(delta)
        U, S, _ = torch.linalg.svd(matrix, full_matrices=False)
        num_rank = numerical_rank(S)
        r = num_rank if rank is None else min(rank, S.numel())
        out.append(LayerAnalysis(
            layer=layer_name, adapter=name, method=module.visadapt[name].config.method,
            weight_shape=list(delta.shape), matrix_shape=list(matrix.shape), singular_values=S,
            frobenius_norm=float(torch.linalg.matrix_norm(matrix)), rank=r, numerical_rank=num_rank,
            amplification_factor=amplification_factor(matrix, module.base_params()[0].detach(), r),
            left_vectors=U[:, :r].clone()))
    if not out:
        raise ValueError(f'adapter {name!r} adapts no layer{" matching " + str(list(layers)) if layers else ""}')
    return out


def compare(first: Sequence[LayerAnalysis], second: Sequence[LayerAnalysis]) -> Dict[str, torch.Tensor]:
    """φ heatmaps for the layers both analyses cover: ``{layer: (I, J) tensor}`` (I, J their ranks).

    Layers whose ΔW is zero in either analysis (rank 0) are left out.
    """
    by_layer = {a.layer: a for a in second}
    result = {}
    for a in first:
        b = by_layer.get(a.layer)
        if b is None or a.rank == 0 or b.rank == 0:
            continue
        if a.left_vectors.shape[0] != b.left_vectors.shape[0]:
            raise ValueError(f'layer {a.layer!r} has ΔW with {a.left_vectors.shape[0]} rows in one analysis and '
                             f'{b.left_vectors.shape[0]} in the other: the adapters were trained on different models')
        result[a.layer] = subspace_similarity(a.left_vectors, b.left_vectors)
    return result
