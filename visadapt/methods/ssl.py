"""SSL: Scaling the Subspace of the Left singular vectors, W' = W diag(s).

Paper: "See Further for Parameter Efficient Fine-tuning by Standing on the Shoulders of Decomposition", Si et al.,
arXiv:2407.05417, section 3.2.2 (eq. (7) with D_2 = I). The paper writes W ∈ R^{n×m} acting as x W, and SSL is
D_1 W there: it scales the n input dimensions, which are W's columns in visadapt's ``y = W x`` convention, where
(IA)³ scales the other side. Name kept from the paper (its "left" is the input side of x W).

* ``s`` ∈ R^{in}, one factor per input channel of the layer (ConvNd: ``in_channels`` over all groups, so
  W diag(s) equals scaling the input feature map channel-wise; see :mod:`visadapt.methods._scaling`).
* Init: s = 1, so W' = W bit for bit at step 0. The bias is not scaled.
* Trainable parameters per layer: in (Linear in_features, ConvNd in_channels).
* Mergeable (merge writes W diag(s), unmerge divides it out). Weight path only: a bypass would have to run the
  layer's op a second time on s ⊙ x, which is never cheaper than one op with W diag(s).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.config import AdapterConfig
from ..core.registry import register
from ._scaling import ScalingAdapter

__all__ = ['SSLConfig', 'SSLAdapter']


@dataclass
class SSLConfig(AdapterConfig):
    """SSL has no hyper-parameters beyond the shared targeting fields."""
    method = 'SSL'


@register(SSLConfig)
class SSLAdapter(ScalingAdapter):
    """Tensor: ``s`` (in,), ones at init."""
    scale_in = True
