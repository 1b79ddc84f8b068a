"""VeRA: Vector-based Random Matrix Adaptation, ΔW = Λ_b B Λ_d A with frozen random A, B.

Paper: "VeRA: Vector-based Random Matrix Adaptation", Kopiczko et al., arXiv:2310.11454.

In ``y = W x`` form (W ∈ R^{out×in}), as the paper writes it: ΔW = diag(b) B diag(d) A with

* A ∈ R^{r×in} and B ∈ R^{out×r}: frozen, random (Kaiming-uniform, as the paper), shared by every layer with the
  same shapes. They are regenerated from ``seed`` (a CPU ``torch.Generator``, so the values do not depend on the
  device) and are never saved: the adapter file holds only d and b, plus the seed and fingerprints of the
  regenerated matrices (:mod:`visadapt.core.fingerprints`) in its metadata. Loading with another seed, onto layers
  of other shapes, or on a PyTorch whose generator draws different numbers, is a clear error. Layers with equal shapes share one CPU tensor.
* d ∈ R^{r} and b ∈ R^{out}: trainable scaling vectors. Init b = 0 (so ΔW = 0 and the output is the base output
  bit for bit at step 0) and d = ``d_init`` (paper: 0.1).
* ConvNd: A is an r-channel conv with the layer's kernel (shape (r, in/groups, *k), i.e. the matrix A ∈
  R^{r×(in/groups·Πk)}), shared by the groups as in LoRA's chain form, and B a 1×1 conv (out, r). ΔW is then
  diag(b) B diag(d) A reshaped to the weight layout.
* Trainable parameters per layer: r + out (the paper's L·(d_model + r) for L layers).

VeRA is LoRA's chain with A → diag(d) A and B → diag(b) B, so it reuses LoRA's pure functions for ΔW and for the
bypass (which the core picks when cheaper).
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
from ..core.site import Site, output_positions
from .lora import lora_bypass, lora_delta_weight

__all__ = ['VeRAConfig', 'VeRAAdapter', 'vera_projections', 'vera_delta_weight']

_SHARED: Dict[Tuple[int, Tuple[int, ...]], torch.Tensor] = {}


@dataclass
class VeRAConfig(AdapterConfig):
    """VeRA hyper-parameters.

    Attributes:
        r: rank of the frozen random projections (VeRA uses much larger r than LoRA, e.g. 256).
        seed: seed of the frozen random A and B (stored in the adapter's config and metadata).
        d_init: initial value of every entry of d (paper: 0.1).
    """
    method = 'VeRA'
    r: int = 256
    seed: int = 0
    d_init: float = 0.1

    def validate(self) -> None:
        check_positive_int(self.r, 'VeRA rank r')
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f'VeRA seed must be an integer in [0, 2**63), got {self.seed!r}')
        if isinstance(self.d_init, bool) or not isinstance(self.d_init, (int, float)) or not math.isfinite(self.d_init):
            raise ValueError(f'VeRA d_init must be a finite number, got {self.d_init!r}')


# ---- pure functions ------------------------------------------------------------------------------------------------
def _kaiming(shape: Tuple[int, ...], seed: int, salt: int) -> torch.Tensor:
    """Kaiming-uniform (a=√5, as nn.Linear) from a seeded CPU generator; shared per (seed, salt, shape)."""
    key = (seed, salt, shape)
    if key not in _SHARED:
        gen = torch.Generator(device='cpu').manual_seed((seed * 1_000_003 + salt) % 2 ** 63)
        tensor = torch.empty(shape)
        nn.init.kaiming_uniform_(tensor.view(shape[0], -1), a=math.sqrt(5), generator=gen)
        _SHARED[key] = tensor
    return _SHARED[key]


def vera_projections(site: Site, r: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The frozen (A, B): A (r, in/groups, *k) (the matrix A ∈ R^{r×in/groups·Πk}), B (out, r); float32, CPU."""
    a_shape = (r, site.in_features, *site.kernel_size)
    return _kaiming(a_shape, seed, 0), _kaiming((site.out_features, r), seed, 1)


def vera_delta_weight(site: Site, A: torch.Tensor, B: torch.Tensor, d: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ΔW = diag(b) B diag(d) A in the layer's weight layout."""
    return lora_delta_weight(site, d.view(-1, *([1] * (A.dim() - 1))) * A, b.unsqueeze(1) * B, 1.0, 'chain')


# ---- the adapter ----------------------------------------------------------------------------------------------------
@register(VeRAConfig)
class VeRAAdapter(Adapter):
    """Tensors: ``d`` (r,), ``b`` (out,); frozen non-persistent buffers ``A``, ``B``."""
    has_bypass = True

    def __init__(self, config: VeRAConfig, site: Site, weight: torch.Tensor):
        super().__init__(config, site, weight)
        self.seed, self.d_init = config.seed, config.d_init
        A, B = vera_projections(site, config.r, config.seed)
        self.register_buffer('A', A, persistent=False)
        self.register_buffer('B', B, persistent=False)
        self.d = nn.Parameter(torch.empty(config.r))
        self.b = nn.Parameter(torch.empty(site.out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.d, self.d_init)
        nn.init.zeros_(self.b)

    def delta_weight(self) -> torch.Tensor:
        return vera_delta_weight(self.site, self.A.to(self.d.dtype), self.B.to(self.d.dtype), self.d, self.b)

    def delta_macs(self) -> int:
        return self.B.shape[0] * self.A.numel()

    def bypass(self, x: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        A = self.d.view(-1, *([1] * (self.A.dim() - 1))) * self.A.to(self.d.dtype)
        return out + lora_bypass(self.site, x, A, self.b.unsqueeze(1) * self.B.to(self.b.dtype), 1.0)

    def bypass_macs(self, x_shape: Sequence[int]) -> int:
        positions = output_positions(self.site, x_shape)
        return positions * self.site.groups * self.A.numel() + positions * self.B.numel() + self.A.numel()

    def factor_form(self) -> Factors:
        """down = diag(d) A (r, in/groups, *k), up = diag(b) B (out, r): an exact rank-r LoRA."""
        down = self.d.view(-1, *([1] * (self.A.dim() - 1))) * self.A.to(self.d.dtype)
        up = self.b.unsqueeze(1) * self.B.to(self.b.dtype)
        return Factors(down, up.reshape(*up.shape, *([1] * self.site.ndim)))

    def metadata(self) -> Dict[str, Any]:
        return {'seed': self.seed, 'A': fingerprint(self.A), 'B': fingerprint(self.B)}

    def check_metadata(self, meta: Dict[str, Any], where: str) -> None:
        if meta.get('seed') != self.seed:
            raise ValueError(f'{where}: VeRA seed mismatch: the adapter was trained with frozen projections from '
                             f'seed {meta.get("seed")!r} but this config regenerates them from seed {self.seed!r}')
        for key, tensor in (('A', self.A), ('B', self.B)):
            problem = fingerprint_mismatch(meta[key], fingerprint(tensor)) if key in meta else None
            if problem == 'shape':
                raise ValueError(f'{where}: VeRA {key} shape mismatch: saved {tuple(meta[key]["shape"])}, this layer '
                                 f'needs {tuple(tensor.shape)} (different layer shape or rank r)')
            if problem == 'values':
                raise ValueError(f'{where}: the VeRA projection {key} regenerated from seed {self.seed} differs from '
                                 f'the saved one: this PyTorch draws other random numbers than the one that trained '
                                 f'the adapter')

    def extra_repr(self) -> str:
        return f'r={self.d.numel()}, seed={self.seed}, ' + super().extra_repr()
