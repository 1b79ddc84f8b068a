"""Fingerprints of frozen tensors an adapter depends on, so a saved adapter is never loaded onto the wrong ones.

SVFT's U and V are the singular vectors of the base weight and VeRA's A and B are regenerated from a seed: neither is
saved, so the adapter file records a fingerprint of the tensor it was trained with, and loading compares it with the
tensor at hand. A fingerprint is the shape, the SHA-256 of the float32 bytes and P_lᵀ T P_r for fixed random unit
probes (4×4 numbers): equal bytes match at once; otherwise the probes must agree within 2% (the same weight rounded
to bf16 moves them by ~0.5%, a different weight by ~100%), so an adapter trained on fp32 weights loads onto the same
weights in bf16.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

__all__ = ['fingerprint', 'fingerprint_mismatch', 'PROBE_RTOL']

_PROBES = 4
_PROBE_SEED = 20240529
#: relative distance of the probe projections below which two tensors count as the same (up to rounding)
PROBE_RTOL = 2e-2


def fingerprint(tensor: torch.Tensor) -> Dict[str, Any]:
    """``{'shape', 'sha256', 'probe'}`` of ``tensor`` (seen as a matrix: first dim × the rest), JSON-ready."""
    matrix = tensor.detach().float().cpu().reshape(tensor.shape[0], -1).contiguous()
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    left = F.normalize(torch.randn(matrix.shape[0], _PROBES, generator=gen, dtype=torch.float64), dim=0)
    right = F.normalize(torch.randn(matrix.shape[1], _PROBES, generator=gen, dtype=torch.float64), dim=0)
    return {'shape': list(tensor.shape), 'sha256': hashlib.sha256(matrix.numpy().tobytes()).hexdigest(),
            'probe': (left.t() @ matrix.double() @ right).flatten().tolist()}


def fingerprint_mismatch(saved: Dict[str, Any], current: Dict[str, Any]) -> Optional[str]:
    """None when ``saved`` (from a file) and ``current`` describe the same tensor (up to rounding); else
    ``'shape'`` or ``'values'``, for the caller's message."""
    if list(saved.get('shape', [])) != list(current['shape']):
        return 'shape'
    if saved.get('sha256') == current['sha256']:
        return None
    a = torch.tensor(saved.get('probe', []), dtype=torch.float64)
    b = torch.tensor(current['probe'], dtype=torch.float64)
    if a.shape != b.shape or (a - b).norm() > PROBE_RTOL * max(b.norm().item(), 1e-30):
        return 'values'
    return None
