"""Layer sites: what an adapter attaches to, described once for every method.

A :class:`Site` captures the weight shape and the operator geometry (Linear or ConvNd with stride, padding,
padding_mode, dilation and groups) of one adapted layer. Methods only see a ``Site``; they never inspect the
``nn.Module`` itself. The helpers here run "the layer's own operator with another weight", which is what every
materialized (W + ΔW) path and every factorized bypass chain needs, so the conv geometry is handled in one place
(PEFT's conv bugs were all geometry bugs: stride, dilation, padding_mode, grouped kernels).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['Site', 'site_from_module', 'base_weight', 'base_bias', 'SUPPORTED_LAYER_TYPES', 'is_plain_layer', 'run_op',
           'pointwise', 'output_positions', 'input_positions', 'base_flops']

# Modules whose forward is exactly "F.linear / F.convNd with self.weight and self.bias". Subclasses that override
# ``forward`` (e.g. timm's Conv2dSame) compute something else and are refused with a clear error.
SUPPORTED_LAYER_TYPES: Tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class Site:
    """Geometry of one adapted weight.

    Attributes:
        kind: ``'linear'`` or ``'conv'``.
        weight_shape: shape of the adapted weight: ``(out, in)`` for Linear, ``(out, in // groups, *kernel)`` for
            ConvNd (PyTorch's own layout).
        stride, padding, dilation, groups, padding_mode: conv geometry (unused for Linear). ``padding`` may be a
            string (``'same'``/``'valid'``) exactly as the layer has it.
        reversed_padding: the layer's ``_reversed_padding_repeated_twice`` for non-zero padding modes.
        has_bias: whether the layer has a bias parameter (BitFit folds Δb into it; without one it has no weight path).
    """
    kind: str
    weight_shape: Tuple[int, ...]
    stride: Tuple[int, ...] = ()
    padding: Union[str, Tuple[int, ...]] = ()
    dilation: Tuple[int, ...] = ()
    groups: int = 1
    padding_mode: str = 'zeros'
    reversed_padding: Tuple[int, ...] = ()
    has_bias: bool = True

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """Input size seen by one output unit (``in // groups`` for convs)."""
        return self.weight_shape[1]

    @property
    def kernel_size(self) -> Tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    @property
    def ndim(self) -> int:
        """Number of spatial dims (0 for Linear)."""
        return len(self.weight_shape) - 2

    @property
    def is_conv(self) -> bool:
        return self.kind == 'conv'

    def matrix_shape(self) -> Tuple[int, int]:
        """Shape of the weight seen as a matrix (out, in/groups * prod(kernel))."""
        return self.weight_shape[0], math.prod(self.weight_shape[1:])

    def with_shape(self, weight_shape: Sequence[int]) -> 'Site':
        """Same geometry, different weight shape (used for fused-weight slices)."""
        return dataclasses.replace(self, weight_shape=tuple(weight_shape))


def site_from_module(module: nn.Module) -> Site:
    """Describe ``module``'s geometry. Raises TypeError for unsupported layer types."""
    if isinstance(module, nn.MultiheadAttention) and not module._qkv_same_embed_dim:
        raise TypeError(f'nn.MultiheadAttention with kdim={module.kdim}, vdim={module.vdim} != embed_dim='
                        f'{module.embed_dim} keeps separate q/k/v projection weights; only the fused '
                        f'in_proj_weight (kdim == vdim == embed_dim) can be adapted')
    has_bias = base_bias(module) is not None
    if isinstance(module, nn.MultiheadAttention):  # the fused in-projection (q; k; v) stacked on the output dim
        return Site('linear', tuple(module.in_proj_weight.shape), has_bias=has_bias)
    if not isinstance(module, SUPPORTED_LAYER_TYPES):
        raise TypeError(
            f'unsupported layer type {type(module).__module__}.{type(module).__name__}; supported: '
            + ', '.join(f'nn.{t.__name__}' for t in SUPPORTED_LAYER_TYPES))
    base = next(t for t in SUPPORTED_LAYER_TYPES if isinstance(module, t))
    overridden = type(module).forward is not base.forward or (
        base is not nn.Linear and type(module)._conv_forward is not base._conv_forward)
    if overridden:
        raise TypeError(
            f'unsupported layer type {type(module).__module__}.{type(module).__name__}: it subclasses nn.{base.__name__} '
            f'but overrides forward() or _conv_forward(), so its output is not F.{"linear" if base is nn.Linear else "conv"}(x, W, b); '
            f'supported: plain ' + ', '.join(f'nn.{t.__name__}' for t in SUPPORTED_LAYER_TYPES))
    shape = tuple(module.weight.shape)
    if isinstance(module, nn.Linear):
        return Site('linear', shape, has_bias=has_bias)
    if getattr(module, 'transposed', False):
        raise TypeError(f'unsupported layer type {type(module).__name__} (transposed convolution)')
    return Site('conv', shape, tuple(module.stride), module.padding if isinstance(module.padding, str)
                else tuple(module.padding), tuple(module.dilation), module.groups, module.padding_mode,
                tuple(module._reversed_padding_repeated_twice), has_bias)


def is_plain_layer(module: nn.Module) -> bool:
    """True for a supported layer whose ``forward`` is its base class's own (so not e.g. timm's ``Conv2dSame``)."""
    base = next((t for t in SUPPORTED_LAYER_TYPES if isinstance(module, t)), None)
    return base is not None and type(module).forward is base.forward


def base_weight(module: nn.Module) -> torch.Tensor:
    """The weight an adapter on ``module`` updates: ``weight``, or ``in_proj_weight`` of nn.MultiheadAttention."""
    if isinstance(module, nn.MultiheadAttention):
        return module.in_proj_weight
    return module.weight


def base_bias(module: nn.Module) -> Optional[torch.Tensor]:
    """The bias that goes with :func:`base_weight`: ``bias``, or ``in_proj_bias`` of nn.MultiheadAttention."""
    if isinstance(module, nn.MultiheadAttention):
        return module.in_proj_bias
    return getattr(module, 'bias', None)


def run_op(site: Site, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           groups: Optional[int] = None) -> torch.Tensor:
    """Apply the site's operator (Linear or ConvNd with the site's full geometry) with another weight.

    ``groups`` overrides the site's group count: bypass chains run their spatial step with ``groups`` equal to the
    layer's, on ``groups * r`` channels.
    """
    if site.kind == 'linear':
        return F.linear(x, weight, bias)
    groups = site.groups if groups is None else groups
    conv = _CONV_FN[site.ndim]
    if site.padding_mode != 'zeros':
        x = F.pad(x, site.reversed_padding, mode=site.padding_mode)
        return conv(x, weight, bias, site.stride, 0, site.dilation, groups)
    return conv(x, weight, bias, site.stride, site.padding, site.dilation, groups)


def pointwise(site: Site, x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A 1x1 (per-position) channel map: ``weight`` is ``(out, in // groups)``. Linear: a matmul on the last dim."""
    if site.kind == 'linear':
        return F.linear(x, weight)
    return _CONV_FN[site.ndim](x, weight.reshape(*weight.shape, *([1] * site.ndim)), None, 1, 0, 1, groups)


def output_positions(site: Site, x_shape: Sequence[int]) -> int:
    """Number of output positions (batch * spatial, or tokens for Linear) for an input of ``x_shape``."""
    if site.kind == 'linear':
        return math.prod(x_shape[:-1])
    n, spatial = x_shape[0], x_shape[2:]
    out = []
    for i, size in enumerate(spatial):
        k, d, s = site.kernel_size[i], site.dilation[i], site.stride[i]
        if isinstance(site.padding, str):
            out.append(size if site.padding == 'same' else (size - d * (k - 1) - 1) // s + 1)
        else:
            out.append((size + 2 * site.padding[i] - d * (k - 1) - 1) // s + 1)
    return n * math.prod(out)


def input_positions(site: Site, x_shape: Sequence[int]) -> int:
    return math.prod(x_shape[:-1]) if site.kind == 'linear' else x_shape[0] * math.prod(x_shape[2:])


def base_flops(site: Site, x_shape: Sequence[int]) -> int:
    """Multiply-accumulates of the layer's own forward on an input of ``x_shape``."""
    return output_positions(site, x_shape) * math.prod(site.weight_shape)
