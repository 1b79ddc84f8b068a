"""Adapters on ``nn.MultiheadAttention`` (open_clip's text and vision towers, torchvision's ViT).

``nn.MultiheadAttention`` is not a Linear: its forward hands ``in_proj_weight`` (q; k; v stacked, (3E, E)) and
``out_proj.weight`` to ``F.multi_head_attention_forward`` and never calls ``out_proj.forward()``. So:

* an adapter *on the attention module* updates ``in_proj_weight``/``in_proj_bias`` (usually per q/k/v slice, see
  :mod:`visadapt.core.slices`). The adapted class passes the adapted weights to the attention's own forward for that call
  (weight path only: the projections happen inside the fused kernel, so bypass-only adapters, e.g. ``mpc='n'``, are
  refused at injection). ``merge``/``unmerge`` act on ``in_proj_weight``/``in_proj_bias`` (the adapted class exposes
  them as ``weight``/``bias`` so the core's merge code is shared);
* an adapter *on* ``out_proj`` (a Linear, targeted like any other) would be silently ignored by the plain attention
  forward. :func:`sync_attention` (called by ``inject`` and ``remove``) therefore also converts the parent attention
  module whenever its ``out_proj`` holds adapters; the adapted forward then uses ``out_proj``'s adapted weight, or,
  when one of them picks its factorized path, runs the attention with an identity output projection and applies the
  adapted ``out_proj`` layer itself.

Parameter names never change (``attn.in_proj_weight`` stays ``attn.in_proj_weight``), and the attention module
keeps its class identity (``isinstance(m, nn.MultiheadAttention)``); removing the adapters restores the class.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

# the context manager behind torch.func.functional_call: swaps parameters for one call with autograd intact; used
# directly (not functional_call) so the attention's own forward runs once, without re-entering hooks
from torch.nn.utils.stateless import _reparametrize_module

from .adapter import Adapter
from .layer import AdaptedLayer, convert, fold_adapters, is_adapted, is_adapter_key, register_adapted_mixin, restore
from .site import Site

__all__ = ['AdaptedAttention', 'sync_attention', 'check_attention_adapter']


class AdaptedAttention(AdaptedLayer):
    """Adapted ``nn.MultiheadAttention``: adapters in ``visadapt`` update ``in_proj_weight``/``in_proj_bias``."""

    @property
    def weight(self) -> torch.Tensor:
        """The adapted weight of this layer: ``in_proj_weight`` (3E, E)."""
        return self.in_proj_weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.in_proj_bias

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        base_forward = super(AdaptedLayer, self).forward  # nn.MultiheadAttention.forward (or a subclass')
        own = self.active_adapters()
        out_proj = self.out_proj
        out_adapters: List[Adapter] = out_proj.active_adapters() if is_adapted(out_proj) else []
        if not own and not out_adapters:
            return base_forward(query, key, value, *args, **kwargs)
        params: Dict[str, torch.Tensor] = {}
        if own:
            _set_params(params, '', *fold_adapters(own, self.in_proj_weight, self.in_proj_bias), 'in_proj_')
        post = None
        if out_adapters:
            if any(a.use_bypass(query) for a in out_adapters):
                # run the attention with an identity output projection, then the adapted out_proj layer itself
                eye = torch.eye(out_proj.in_features, dtype=query.dtype, device=query.device)
                zero = None if out_proj.bias is None else torch.zeros_like(out_proj.bias)
                _set_params(params, 'out_proj.', eye, zero)
                post = out_proj
            else:
                _set_params(params, 'out_proj.', *fold_adapters(out_adapters, out_proj.weight, out_proj.bias))
        with _reparametrize_module(self, params):
            out, weights = base_forward(query, key, value, *args, **kwargs)
        if post is not None:
            out = post(out)
        return out, weights


def _set_params(params: Dict[str, torch.Tensor], prefix: str, weight: torch.Tensor, bias: Optional[torch.Tensor],
                stem: str = '') -> None:
    params[f'{prefix}{stem}weight'] = weight
    if bias is not None:
        params[f'{prefix}{stem}bias'] = bias


register_adapted_mixin(nn.MultiheadAttention, AdaptedAttention)


def check_attention_adapter(adapter: Adapter) -> None:
    """Raise ValueError if ``adapter`` cannot update an attention module's in_proj_weight (weight path only)."""
    if not adapter.has_weight_path:
        raise ValueError(f'nn.MultiheadAttention projects q, k, v inside F.multi_head_attention_forward, so its '
                         f'in_proj_weight can only take adapters with a weight path; {type(adapter).__name__} has none '
                         f'here (e.g. mpc=\'n\'); target the attention\'s out_proj or other Linear layers instead')
    if adapter.forward_path == 'bypass':
        raise ValueError("forward_path='bypass' is not available on nn.MultiheadAttention (its in-projection runs "
                         "inside the fused attention); use 'auto' or 'weight'")


def sync_attention(model: nn.Module) -> None:
    """Convert every nn.MultiheadAttention whose ``out_proj`` holds adapters (so they take effect), and restore the
    class of converted ones that hold no adapter any more. Called by ``inject`` and ``remove``."""
    for name, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention) or is_adapter_key(name):
            continue
        out_proj = getattr(module, 'out_proj', None)
        needed = out_proj is not None and is_adapted(out_proj) and len(out_proj.visadapt) > 0
        if needed and not is_adapted(module):
            # a separate-q/k/v attention has no fused in_proj to adapt; its site is never used (no own adapters)
            convert(module, None if module._qkv_same_embed_dim else Site('linear', (0, module.embed_dim)))
        elif not needed and is_adapted(module) and len(module.visadapt) == 0:
            restore(module)
