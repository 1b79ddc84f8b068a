"""SSB: Scaling the Subspace of Both singular vectors, W' = diag(l) W diag(s).

Paper: "See Further for Parameter Efficient Fine-tuning by Standing on the Shoulders of Decomposition", Si et al.,
arXiv:2407.05417, section 3.2.2, eq. (7): Ŵ = D_1 W D_2. With the paper's x W convention mapped onto ``y = W x``,
``l`` ∈ R^{out} scales W's rows (output channels, the (IA)³ side) and ``s`` ∈ R^{in} its columns (input channels,
the SSL side; for ConvNd one factor per input channel over all groups, see :mod:`visadapt.methods._scaling`).

* Init: l = 1, s = 1, so W' = W bit for bit at step 0. The bias is not scaled.
* Trainable parameters per layer: out + in (one common scalar is redundant between l and s, as in the paper).
* Mergeable (merge writes diag(l) W diag(s), unmerge divides both out). Weight path only (the s side would need the
  layer's op a second time).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.config import AdapterConfig
from ..core.registry import register
from ._scaling import ScalingAdapter

__all__ = ['SSBConfig', 'SSBAdapter']


@dataclass
class SSBConfig(AdapterConfig):
    """SSB has no hyper-parameters beyond the shared targeting fields."""
    method = 'SSB'


@register(SSBConfig)
class SSBAdapter(ScalingAdapter):
    """Tensors: ``l`` (out,) and ``s`` (in,), ones at init."""
    scale_out = True
    scale_in = True
