"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations, y = l ⊙ (W x) + b.

Paper: "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", Liu et al.,
arXiv:2205.05638. Read as a subspace method (Si et al., arXiv:2407.05417, section 3.2.2), it is W' = diag(l) W: a
scaling of W's rows, i.e. of the layer's output channels. (That paper writes W ∈ R^{n×m} acting as x W, so its
"W D_2" scaling the m outputs is diag(l) W here.)

* ``l`` ∈ R^{out}, initialized to ones, so W' = W bit for bit at step 0 (the bias is left unscaled).
* Trainable parameters per layer: out (Linear out_features, ConvNd out_channels).
* Mergeable: merge writes diag(l) W, unmerge divides l out again.
* Two paths: the weight path runs one op with diag(l) W; the bypass rescales the frozen output,
  out + (l − 1) ⊙ (out − b), which costs 2·out per output position and needs no weight gradient, so the core's
  cost model usually picks it for training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..core.config import AdapterConfig
from ..core.registry import register
from ._scaling import ScalingAdapter, scale_output

__all__ = ['IA3Config', 'IA3Adapter']


@dataclass
class IA3Config(AdapterConfig):
    """(IA)³ has no hyper-parameters beyond the shared targeting fields."""
    method = 'IA3'


@register(IA3Config)
class IA3Adapter(ScalingAdapter):
    """Tensor: ``l`` (out,), ones at init."""
    scale_out = True
    has_bypass = True

    def bypass(self, x: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return scale_output(self.site, out, bias, self.l)
