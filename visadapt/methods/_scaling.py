"""Shared math of the diagonal-scaling methods (IA)³, SSL and SSB: W' = diag(l) W diag(s).

Paper: Si et al., "See Further for Parameter Efficient Fine-tuning by Standing on the Shoulders of Decomposition",
arXiv:2407.05417, section 3.2.2, eq. (7): Ŵ = D_1 W D_2.

In visadapt's ``y = W x`` convention (W ∈ R^{out×in}):

* ``l`` ∈ R^{out} scales the rows of W, i.e. the layer's output channels (the (IA)³ vector);
* ``s`` ∈ R^{in} scales the columns of W, i.e. the layer's input channels. For a ConvNd (weight ``(out, in/groups,
  *k)``) "columns" means input channels, not the flattened (in/groups·Πk) columns: ``s`` has one entry per input
  channel of the layer (``in_channels``, all groups), so W diag(s) is exactly "scale the input feature map by s",
  and in a grouped conv output channel o sees s[group(o)·in/groups + j] on its weight column j.

Both start at ones, so W' = W bit for bit at step 0. The update is a rescaling of W, hence mergeable: merge writes
diag(l) W diag(s) into the weight and unmerge divides it out again (a zero scale erases a row or column of W for good;
unmerge then raises). The bias is not scaled.
"""
from __future__ import annotations

import math
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn as nn

from ..core.adapter import Adapter
from ..core.site import Site, output_positions

__all__ = ['ScalingAdapter', 'in_channels', 'in_scale_matrix', 'channel_view', 'scaled_weight', 'unscaled_weight',
           'check_nonzero_scales', 'scale_output']


def in_channels(site: Site) -> int:
    """Input channels of the layer (all groups): in_features for Linear, in/groups·groups for ConvNd."""
    return site.in_features * (site.groups if site.is_conv else 1)


def in_scale_matrix(site: Site, s: torch.Tensor) -> torch.Tensor:
    """Per-weight-entry factors of diag(s) in the weight layout: ``(1, in)`` for Linear, ``(out, in/groups, 1, ...)``
    for ConvNd (row o takes the slice of ``s`` that belongs to its group)."""
    if site.kind == 'linear':
        return s.unsqueeze(0)
    g, cin, out = site.groups, site.in_features, site.out_features
    per_row = s.view(g, 1, cin).expand(g, out // g, cin).reshape(out, cin)
    return per_row.reshape(out, cin, *([1] * site.ndim))


def channel_view(site: Site, v: torch.Tensor, ndim: int) -> torch.Tensor:
    """``v`` (out,) shaped to broadcast over an output of ``ndim`` dims (channels last for Linear, dim 1 for convs)."""
    if site.kind == 'linear':
        return v
    return v.view(-1, *([1] * (ndim - 2)))


def scaled_weight(site: Site, weight: torch.Tensor, l: Optional[torch.Tensor], s: Optional[torch.Tensor]
                  ) -> torch.Tensor:
    """diag(l) W diag(s) in W's layout and dtype (computed in the wider of W's and the scales' dtypes)."""
    dtype = torch.promote_types(weight.dtype, (l if l is not None else s).dtype)
    out = weight.to(dtype)
    if l is not None:
        out = out * l.to(dtype).view(-1, *([1] * (weight.dim() - 1)))
    if s is not None:
        out = out * in_scale_matrix(site, s.to(dtype))
    return out.to(weight.dtype)


def check_nonzero_scales(l: Optional[torch.Tensor], s: Optional[torch.Tensor]) -> None:
    """Raise ValueError if a scale is exactly zero: merge erased that row/column of W for good."""
    for name, v in (('l', l), ('s', s)):
        if v is not None and bool((v == 0).any()):
            raise ValueError(f'cannot unmerge: scale vector {name} has {int((v == 0).sum())} zero entries, so the '
                             f'matching rows/columns of the base weight were erased by merge')


def unscaled_weight(site: Site, merged: torch.Tensor, l: Optional[torch.Tensor], s: Optional[torch.Tensor]
                    ) -> torch.Tensor:
    """Inverse of :func:`scaled_weight`. Raises ValueError if a scale is exactly zero (that row/column is lost)."""
    check_nonzero_scales(l, s)
    dtype = torch.promote_types(merged.dtype, (l if l is not None else s).dtype)
    out = merged.to(dtype)
    if l is not None:
        out = out / l.to(dtype).view(-1, *([1] * (merged.dim() - 1)))
    if s is not None:
        out = out / in_scale_matrix(site, s.to(dtype))
    return out.to(merged.dtype)


def scale_output(site: Site, out: torch.Tensor, bias: Optional[torch.Tensor], l: torch.Tensor) -> torch.Tensor:
    """l ⊙ (W x) + b given ``out`` = W x + b: written as out + (l − 1)(out − b), exact when l = 1."""
    l = channel_view(site, l.to(out.dtype), out.dim())
    wx = out if bias is None else out - channel_view(site, bias.to(out.dtype), out.dim())
    return out + (l - 1) * wx


class ScalingAdapter(Adapter):
    """Tensors: ``l`` (out,) if ``scale_out``, ``s`` (in,) if ``scale_in``; both initialized to ones."""
    scale_out: ClassVar[bool] = False
    scale_in: ClassVar[bool] = False

    def __init__(self, config, site: Site, weight: torch.Tensor):
        super().__init__(config, site, weight)
        if self.scale_out:
            self.l = nn.Parameter(torch.empty(site.out_features))
        if self.scale_in:
            self.s = nn.Parameter(torch.empty(in_channels(site)))
        self.reset_parameters()

    def _scales(self):
        return (self.l if self.scale_out else None), (self.s if self.scale_in else None)

    def reset_parameters(self) -> None:
        for p in self.parameters():
            nn.init.ones_(p)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = diag(l) W diag(s) − W needs W: use ``adapted_weight(W) - W`` (the analysis tools do)."""
        raise NotImplementedError(f'{type(self).__name__} is multiplicative; ΔW = adapted_weight(W) - W')

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return scaled_weight(self.site, weight, *self._scales())

    def restored_weight(self, merged: torch.Tensor) -> torch.Tensor:
        return unscaled_weight(self.site, merged, *self._scales())

    def check_restorable(self) -> None:
        check_nonzero_scales(*self._scales())

    def delta_macs(self) -> int:
        return math.prod(self.site.weight_shape) * (int(self.scale_out) + int(self.scale_in))

    def bypass_ops(self) -> int:  # elementwise scalings of the output, no matmul
        return 0

    def delta_ops(self) -> int:
        return 0

    def bypass_macs(self, x_shape: Sequence[int]) -> Optional[int]:
        if not self.has_bypass:
            return None
        return 2 * output_positions(self.site, x_shape) * self.site.out_features
