"""BitFit: fine-tune only the biases, b' = b + Δb.

Paper: "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models", Ben Zaken et
al., arXiv:2106.10199.

* ``delta_b`` ∈ R^{out} per adapted Linear/ConvNd, added to the layer's bias (the weight is untouched, ΔW = 0).
  Keeping Δb apart from the frozen bias, instead of unfreezing ``layer.bias``, gives BitFit everything an adapter
  has: save only Δb, disable, merge, unmerge, several adapters on one model.
* Init Δb = 0, so the output is the base output bit for bit at step 0.
* Trainable parameters per layer: out.
* Layers without a bias (e.g. convs followed by BatchNorm): ``bias_free='add'`` (default) adapts them with a bias
  delta applied on the output (bypass path only); such a layer has no bias parameter to fold Δb into, so that
  adapter cannot be merged (``merge`` raises). ``bias_free='skip'`` adapts only layers that have a bias, which keeps
  the whole adapter mergeable (in a conv-BN net a bias before a training-mode BN is cancelled by the batch mean
  anyway).
* The BitFit paper also trains LayerNorm biases; norm layers are not adapters' targets here: list them in
  ``train_modules`` to train them fully.
* Paths: weight (the layer's op with bias b + Δb) and bypass (out + Δb); equal results.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..core.adapter import Adapter
from ..core.config import AdapterConfig
from ..core.registry import register
from ..core.site import Site, base_bias, output_positions
from ._scaling import channel_view

__all__ = ['BitFitConfig', 'BitFitAdapter']

BIAS_FREE = ('add', 'skip')


@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit options.

    Attributes:
        bias_free: what to do with target layers that have no bias: ``'add'`` a bias delta (not mergeable there) or
            ``'skip'`` them.
    """
    method = 'BitFit'
    bias_free: str = 'add'

    def validate(self) -> None:
        if self.bias_free not in BIAS_FREE:
            raise ValueError(f'BitFit bias_free={self.bias_free!r} is not valid; use one of {BIAS_FREE}')

    refusal_note = "they have no bias and bias_free='skip'; use bias_free='add' to give them a bias delta"

    def accepts(self, module: nn.Module) -> bool:
        return self.bias_free == 'add' or base_bias(module) is not None


@register(BitFitConfig)
class BitFitAdapter(Adapter):
    """Tensor: ``delta_b`` (out,), zeros at init."""
    has_bypass = True

    def __init__(self, config: BitFitConfig, site: Site, weight: torch.Tensor):
        super().__init__(config, site, weight)
        self.delta_b = nn.Parameter(torch.empty(site.out_features))
        self.reset_parameters()

    @property
    def has_weight_path(self) -> bool:
        """A bias-free layer gets the bypass only and no merge (there is no bias parameter to hold Δb)."""
        return self.site.has_bias

    def why_no_weight_path(self) -> str:
        return ("for BitFit on a layer without a bias (there is no bias to add Δb to); use bias_free='skip' to leave "
                "such layers out, or")

    def why_not_mergeable(self) -> str:
        return "the layer has no bias parameter to fold Δb into (use BitFitConfig(bias_free='skip') to leave such " \
               "layers out)"

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.delta_b)

    def delta_weight(self) -> torch.Tensor:
        return self.delta_b.new_zeros(self.site.weight_shape)

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def restored_weight(self, merged: torch.Tensor) -> torch.Tensor:
        return merged

    def adapted_bias(self, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if bias is None:
            raise ValueError('BitFit weight path needs a layer bias')  # unreachable: such layers use the bypass
        return bias + self.delta_b.to(bias.dtype)

    def restored_bias(self, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return bias - self.delta_b.to(bias.dtype)

    def delta_macs(self) -> int:
        return self.site.out_features

    def bypass(self, x: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return out + channel_view(self.site, self.delta_b.to(out.dtype), out.dim())

    def bypass_ops(self) -> int:  # an add, no matmul
        return 0

    def delta_ops(self) -> int:
        return 0

    def bypass_macs(self, x_shape: Sequence[int]) -> int:
        return output_positions(self.site, x_shape) * self.site.out_features
