"""SVFT: Singular Vectors guided Fine-Tuning, ΔW = U M Vᵀ with the frozen singular vectors of W and a sparse M.

Paper: "SVFT: Parameter-Efficient Fine-Tuning with Singular Vectors", Lingam et al., arXiv:2405.19597, section 3
(formulation and the four sparsity patterns), appendix B / Table 7 (parameter counts), appendix C.3 (truncation).

The paper's W0 ∈ R^{d1×d2} = U Σ Vᵀ maps onto PyTorch's ``y = W x`` with W ∈ R^{out×in}: d1 = out, d2 = in, U holds
the left singular vectors (out × p), V the right ones (in × p), p = min(out, in) (or the truncation rank ``r``):

    y = W x + U M Vᵀ x,   M ∈ R^{p×p} sparse with a fixed pattern Ω of trainable entries.

Patterns (``pattern``):

* ``'plain'`` (SVFT_P): M diagonal, p entries (the paper's L_tuned × D_model);
* ``'banded'`` (SVFT_B^d): the main diagonal and ``off_diag`` = d off-diagonals on each side,
  p(2d + 1) − d(d + 1) entries for d < p (Table 7: D·k + (D − k)(k + 1) with k = d), p² for d ≥ p − 1;
* ``'random'`` (SVFT_R^d): k distinct entries drawn uniformly without replacement from a CPU generator seeded with
  ``seed`` (reproducible on any device);
* ``'top_k'`` (SVFT_T^d): the k entries (i, j) with the largest alignment |u_iᵀ v_j|; needs u_i and v_j of the same
  length, i.e. a square W (out = in), else a clear error.

For random and top-k, ``k=None`` takes the banded count for ``off_diag`` (as the official code does). The pattern is
stored in the adapter (buffer ``indices``, (2, k) rows/cols) with the values (``values``, k), so a saved adapter
always reloads with exactly its pattern.

U and V come from ``torch.linalg.svd`` of the frozen W at injection, computed in float32 (float64 for float64
weights) whatever the model dtype. They are non-persistent buffers (never saved: they are derived from the base
weight), can be stored in bfloat16/float16 (``basis_dtype``) and truncated to the top ``r`` singular directions
(appendix C.3). The adapter file records a fingerprint of the base weight (:mod:`visadapt.core.fingerprints`); loading
onto another base weight is a ValueError, while the same weight in another dtype (e.g. bf16 at inference) is
accepted.

Init: M = 0 (``init='zero'``, default), so ΔW = 0 and step 0 is the base model bit for bit. ``init='gated'`` is the
official code's: values Kaiming-normal (std √(2/k)) times σ(g) with a trainable scalar gate g = 0, so ΔW ≠ 0 at
step 0 (one extra trainable parameter).

Trainable parameters per matrix: plain p, banded p(2d + 1) − d(d + 1), random/top-k k (+1 with the gate).

Forward: the core picks per input shape between materializing ΔW = U M Vᵀ (p²·min(out, in) + out·p·in MACs, then
one op with W + ΔW) and the bypass (M Vᵀ) → U on the activations ((in + out)·p MACs per position, plus M folded into
Vᵀ once); both are exact. M is built dense (p×p) for every pattern but plain (a diagonal: a scaling): a GEMM with a
p×p matrix ran 1.6-27× faster than gathering/scattering its k entries on this project's 2-core CPU, even at 5% fill
(banded d=20, p=768), and does not materialize positions × k elements.

ConvNd: W is seen as the matrix (out, in/groups·Πk) (each output filter flattened), whose SVD gives U (out × p) and
V (in/groups·Πk × p), p = min(out, in/groups·Πk); ΔW is folded back to the weight layout. The bypass runs M Vᵀ as
a p-channel conv with the layer's kernel and geometry (shared by the groups), and U as a grouped 1×1 conv (the rows of U for group g's outputs read group g's p channels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..core.adapter import Adapter
from ..core.config import AdapterConfig, check_positive_int
from ..core.factors import Factors
from ..core.fingerprints import fingerprint, fingerprint_mismatch
from ..core.registry import register
from ..core.site import Site, output_positions, pointwise, run_op

__all__ = ['SVFTConfig', 'SVFTAdapter', 'svft_pattern', 'svft_num_params', 'svft_bases', 'svft_m', 'svft_um',
           'svft_delta_weight', 'svft_delta_macs', 'svft_apply_m']

PATTERNS = ('plain', 'banded', 'random', 'top_k')
INITS = ('zero', 'gated')
_BASIS_DTYPES = {'float32': torch.float32, 'float64': torch.float64, 'bfloat16': torch.bfloat16,
                 'float16': torch.float16}


@dataclass
class SVFTConfig(AdapterConfig):
    """SVFT hyper-parameters.

    Attributes:
        pattern: sparsity pattern of M: ``'plain'``, ``'banded'``, ``'random'`` or ``'top_k'``.
        off_diag: d, the off-diagonals on each side for ``'banded'`` (and the default k of random/top-k).
        k: number of trainable entries for ``'random'``/``'top_k'``; None means the banded count for ``off_diag``.
        r: keep only the top ``r`` singular directions (U, V truncated to r columns); None keeps all.
        seed: seed of the ``'random'`` pattern.
        init: ``'zero'`` (M = 0, ΔW = 0 at step 0) or ``'gated'`` (official code: Kaiming-normal values times
            σ(gate), gate = 0 trainable).
        basis_dtype: storage dtype of the frozen U, V: None (the adapter dtype), or ``'bfloat16'``/``'float16'``/
            ``'float32'``/``'float64'``. Computation upcasts to the dtype of M (or of the activations).
    """
    method = 'SVFT'
    supported_types = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
    pattern: str = 'plain'
    off_diag: int = 2
    k: Optional[int] = None
    r: Optional[int] = None
    seed: int = 0
    init: str = 'zero'
    basis_dtype: Optional[str] = None

    def validate(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f'SVFT pattern={self.pattern!r} is not valid; use one of {PATTERNS}')
        if isinstance(self.off_diag, bool) or not isinstance(self.off_diag, int) or self.off_diag < 0:
            raise ValueError(f'SVFT off_diag must be an integer >= 0, got {self.off_diag!r}')
        if self.k is not None:
            check_positive_int(self.k, 'SVFT k')
            if self.pattern not in ('random', 'top_k'):
                raise ValueError(f"SVFT k={self.k} only applies to pattern='random' or 'top_k', not "
                                 f"{self.pattern!r} (use off_diag for 'banded')")
        if self.r is not None:
            check_positive_int(self.r, 'SVFT truncation rank r')
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f'SVFT seed must be an integer in [0, 2**63), got {self.seed!r}')
        if self.init not in INITS:
            raise ValueError(f'SVFT init={self.init!r} is not valid; use one of {INITS}')
        if self.basis_dtype is not None and self.basis_dtype not in _BASIS_DTYPES:
            raise ValueError(f'SVFT basis_dtype={self.basis_dtype!r} is not valid; use None or one of '
                             f'{sorted(_BASIS_DTYPES)}')


# ---- pure functions ------------------------------------------------------------------------------------------------
def banded_count(p: int, d: int) -> int:
    """Entries of a p×p band with d off-diagonals on each side: p(2d + 1) − d(d + 1), capped at p²."""
    d = min(d, p - 1)
    return p * (2 * d + 1) - d * (d + 1)


def svft_num_params(out_features: int, in_features: int, pattern: str, off_diag: int = 2, k: Optional[int] = None,
                    r: Optional[int] = None, gated: bool = False) -> int:
    """Trainable entries of M for a matrix of shape (out, in) (Table 7), plus one for the gate."""
    p = min(out_features, in_features, r or out_features)
    if pattern == 'plain':
        n = p
    elif pattern == 'banded':
        n = banded_count(p, off_diag)
    else:
        n = banded_count(p, off_diag) if k is None else k
    return n + int(gated)


def svft_bases(matrix: torch.Tensor, r: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """U (out, p) and V (in, p): the top-p singular vectors of ``matrix`` (out, in), p = min(out, in, r).

    Signs are canonical (the largest-magnitude entry of each u_i is positive, v_i flipped with it). Singular vectors
    of repeated singular values are only defined up to a rotation; real weights have distinct ones.
    Computed in float32 (float64 for a float64 input) on the matrix's device.
    """
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    u, _, vh = torch.linalg.svd(matrix.detach().to(dtype), full_matrices=False)
    p = u.shape[1] if r is None else min(r, u.shape[1])
    u, v = u[:, :p], vh[:p].t()
    # u_i, v_i are unique only up to a joint sign; off-diagonal terms m_ij u_i v_jᵀ see the sign of each pair, so
    # fix it (largest-magnitude entry of u_i positive) to make a saved M mean the same on any device or LAPACK
    signs = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True))).squeeze(0)
    signs[signs == 0] = 1
    return (u * signs).contiguous(), (v * signs).contiguous()


def svft_pattern(pattern: str, p: int, off_diag: int = 2, k: Optional[int] = None, seed: int = 0,
                 U: Optional[torch.Tensor] = None, V: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices (2, k) (rows, cols) of the trainable entries of the p×p matrix M, sorted row-major.

    ``'top_k'`` needs U and V (columns: singular vectors of equal length) to rank |u_iᵀ v_j|.
    """
    if pattern == 'plain':
        idx = torch.arange(p)
        return torch.stack([idx, idx])
    if pattern == 'banded':  # diagonal by diagonal (O(p·d), not O(p²)), then row-major order
        d = min(off_diag, p - 1)
        rows = torch.cat([torch.arange(max(0, -o), p - max(0, o)) for o in range(-d, d + 1)])
        cols = torch.cat([torch.arange(max(0, o), p - max(0, -o)) for o in range(-d, d + 1)])
        flat = (rows * p + cols).sort().values
        return torch.stack([flat // p, flat % p])
    n = banded_count(p, off_diag) if k is None else k
    if n > p * p:
        raise ValueError(f'SVFT {pattern} pattern: k={n} is larger than the {p}×{p} matrix M ({p * p} entries); '
                         f'use k <= {p * p}')
    if pattern == 'random':
        gen = torch.Generator(device='cpu').manual_seed(seed)
        flat = torch.randperm(p * p, generator=gen)[:n]
    elif pattern == 'top_k':
        if U is None or V is None or U.shape[0] != V.shape[0]:
            shape = None if U is None or V is None else (U.shape[0], V.shape[0])
            raise ValueError(f"SVFT pattern='top_k' ranks |u_iᵀ v_j| and needs a square weight (out == in); got "
                             f"a weight matrix of shape (out, in) = {shape}; use 'banded' or 'random' here")
        align = (U.t().double() @ V.double()).abs().flatten()   # (p·p,): |u_iᵀ v_j| row-major
        flat = torch.topk(align if align.is_meta else align.cpu(), n, sorted=False).indices
    else:
        raise ValueError(f'SVFT pattern={pattern!r} is not valid; use one of {PATTERNS}')
    flat = flat.sort().values
    return torch.stack([flat // p, flat % p])


def svft_m(values: torch.Tensor, indices: torch.Tensor, p: int) -> torch.Tensor:
    """M as a dense (p, p) matrix with ``values`` at ``indices`` and zeros elsewhere (differentiable in ``values``).

    The products with M run densely: on this project's 2-core CPU a p×p GEMM beat gathering and scattering the k
    entries even at 5% fill (an index_select over the activations also materializes positions × k elements), see
    docs/bench.md; GPUs have not been measured.
    """
    dense = values.new_zeros(p * p)
    dense.index_put_((indices[0] * p + indices[1],), values)  # in place on the fresh buffer: no clone of p² zeros
    return dense.view(p, p)


def svft_um(U: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, diagonal: bool = False) -> torch.Tensor:
    """U M (out, p); ``diagonal``: M is diag(values) (the plain pattern), a column scaling."""
    if diagonal:
        return U * values
    return U @ svft_m(values, indices, U.shape[1])


def svft_delta_weight(U: torch.Tensor, V: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                      diagonal: bool = False) -> torch.Tensor:
    """ΔW = U M Vᵀ (out, in) for M with ``values`` at ``indices``; computed in the dtype of ``values``.

    A dense M is multiplied into the shorter side (out·p² or p²·in MACs), then one (out, p)·(p, in) product.
    """
    U, V = U.to(values.dtype), V.to(values.dtype)
    if diagonal or U.shape[0] <= V.shape[0]:
        return svft_um(U, values, indices, diagonal) @ V.t()
    return U @ (svft_m(values, indices, U.shape[1]) @ V.t())


def svft_delta_macs(out_features: int, in_features: int, p: int, diagonal: bool) -> int:
    """MACs of :func:`svft_delta_weight`."""
    return (out_features * p if diagonal else p * p * min(out_features, in_features)) + out_features * p * in_features


def svft_apply_m(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, dim: int = -1,
                 diagonal: bool = False) -> torch.Tensor:
    """M z along ``dim`` of ``z`` (size p): (M z)_i = Σ_{(i, j) ∈ Ω} m_ij z_j."""
    values = values.to(z.dtype)  # z is bf16/fp16 under autocast
    dim = dim % z.dim()
    if diagonal:
        shape = [1] * z.dim()
        shape[dim] = -1
        return z * values.view(shape)
    return (z.movedim(dim, -1) @ svft_m(values, indices, z.shape[dim]).t()).movedim(-1, dim)


# ---- the adapter ----------------------------------------------------------------------------------------------------
@register(SVFTConfig)
class SVFTAdapter(Adapter):
    """Tensors: ``values`` (k,) trainable; ``indices`` (2, k) persistent int64 buffer (the pattern); ``gate`` (1,)
    with ``init='gated'``; ``U`` (out, p) and ``V`` (in/groups·Πk, p) non-persistent buffers."""
    has_bypass = True

    def __init__(self, config: SVFTConfig, site: Site, weight: torch.Tensor):
        super().__init__(config, site, weight)
        out_f, in_f = site.matrix_shape()
        U, V = svft_bases(weight.reshape(out_f, in_f), config.r)
        self.p = U.shape[1]
        indices = svft_pattern(config.pattern, self.p, config.off_diag, config.k, config.seed, U, V)
        self.fingerprint = None if weight.is_meta else fingerprint(weight)  # meta: dry-run counts (budget)
        self.basis_dtype = None if config.basis_dtype is None else _BASIS_DTYPES[config.basis_dtype]
        self.register_buffer('U', U, persistent=False)
        self.register_buffer('V', V, persistent=False)
        self.register_buffer('indices', indices)
        self.diagonal = config.pattern == 'plain'  # M = diag(values): products with M are scalings
        self.values = nn.Parameter(torch.empty(indices.shape[1]))
        self.gate = nn.Parameter(torch.zeros(1)) if config.init == 'gated' else None
        self.reset_parameters()
        self._apply_basis_dtype()

    def reset_parameters(self) -> None:
        if self.gate is None:
            nn.init.zeros_(self.values)
        else:  # the official code: kaiming_normal_ on a (1, k) view, i.e. std √(2/k); gate 0 → σ = 0.5
            nn.init.normal_(self.values, std=math.sqrt(2.0 / self.values.numel()))
            nn.init.zeros_(self.gate)

    def _apply(self, fn, recurse=True):
        """Module.to()/.half() cast every float buffer; keep U and V in ``basis_dtype`` when one is set."""
        out = super()._apply(fn, recurse)
        self._apply_basis_dtype()
        return out

    def _apply_basis_dtype(self) -> None:
        if getattr(self, 'basis_dtype', None) is not None:
            self.U = self.U.to(self.basis_dtype)
            self.V = self.V.to(self.basis_dtype)

    def m_values(self) -> torch.Tensor:
        """The non-zero entries of M (k,), including the gate σ(g) when ``init='gated'``."""
        return self.values if self.gate is None else self.values * torch.sigmoid(self.gate)

    def delta_weight(self) -> torch.Tensor:
        return svft_delta_weight(self.U, self.V, self.m_values(), self.indices, self.diagonal
                                 ).reshape(self.site.weight_shape)

    def delta_macs(self) -> int:
        out_f, in_f = self.site.matrix_shape()
        return svft_delta_macs(out_f, in_f, self.p, self.diagonal)

    def _folds_m(self, positions: int) -> bool:
        """Multiply M into Vᵀ once (in·p² MACs) rather than into the activations (positions·groups·p²)?"""
        return self.site.matrix_shape()[1] <= positions * self.site.groups

    def bypass(self, x: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        site, dtype = self.site, x.dtype
        values, U, V = self.m_values().to(dtype), self.U.to(dtype), self.V.to(dtype)
        fold = self._folds_m(output_positions(site, x.shape))
        # M Vᵀ = (V Mᵀ)ᵀ, and Mᵀ has the entries at the swapped indices
        down = (svft_um(V, values, self.indices.flip(0), self.diagonal) if fold else V).t()   # (p, in): [M] Vᵀ
        if site.kind == 'linear':
            z = x @ down.t()                                                              # (..., p)
            if not fold:
                z = svft_apply_m(z, values, self.indices, diagonal=self.diagonal)
            return out + z @ U.t()
        g = site.groups
        kernel = down.reshape(self.p, *site.weight_shape[1:])                             # p filters
        if g > 1:  # shared by the groups (with g == 1 a repeat would only copy)
            kernel = kernel.repeat(g, *([1] * (kernel.dim() - 1)))
        z = run_op(site, x, kernel, groups=g)                                             # (N, g·p, *S')
        if not fold:
            z = svft_apply_m(z.unflatten(1, (g, self.p)), values, self.indices, dim=2,
                             diagonal=self.diagonal).flatten(1, 2)
        return out + pointwise(site, z, U, groups=g)                                      # (N, out, *S')

    def bypass_ops(self) -> int:  # [M] Vᵀ, M (folded or on the activations), U
        return 3

    def delta_ops(self) -> int:
        return 1 if self.diagonal else 2

    def bypass_macs(self, x_shape: Sequence[int]) -> int:
        out_f, in_f = self.site.matrix_shape()
        positions, g = output_positions(self.site, x_shape), self.site.groups
        m_cost = self.p if self.diagonal else self.p * self.p
        apply_m = in_f * m_cost if self._folds_m(positions) else positions * g * m_cost
        return positions * g * self.p * in_f + apply_m + positions * out_f * self.p

    def factor_form(self) -> Factors:
        """down = Vᵀ (p, in/groups, *k) (a p-filter conv in the layer's geometry), up = U M (out, p)."""
        values = self.m_values()
        up = svft_um(self.U.to(values.dtype), values, self.indices, self.diagonal)
        down = self.V.to(values.dtype).t().reshape(self.p, *self.site.weight_shape[1:])
        return Factors(down, up.reshape(*up.shape, *([1] * self.site.ndim)))

    def metadata(self) -> Dict[str, Any]:
        return {'base_weight': self.fingerprint}

    def check_metadata(self, meta: Dict[str, Any], where: str) -> None:
        saved = meta.get('base_weight')
        problem = None if saved is None else fingerprint_mismatch(saved, self.fingerprint)
        if problem == 'shape':
            raise ValueError(f'{where}: SVFT was trained on a base weight of shape {saved.get("shape")}, this layer '
                             f'has {self.fingerprint["shape"]}')
        if problem == 'values':
            raise ValueError(f'{where}: SVFT adapter was trained on a different base weight (fingerprint '
                             f'{str(saved.get("sha256", "?"))[:12]}…, this layer {self.fingerprint["sha256"][:12]}…); '
                             f'its U and V are the singular vectors of that weight, so it cannot be loaded onto this one')

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, p={self.p}, k={self.indices.shape[1]}'
