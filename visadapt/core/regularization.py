"""The MPC regularizers' losses over a whole model (the configs' ``mpc`` field and the adapters' ``mpc_factors``).

The method side (config fields, MPC_n's nonlinearity) is :mod:`visadapt.methods.mpc`, which also explains the math;
this module adds the losses to training, for every adapter whose config asks for ``mpc='o'`` or ``'d'``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from .layer import iter_adapted

__all__ = ['mpc_loss', 'gram_penalty', 'regularization_loss', 'attach_regularizer', 'detach_regularizer',
           'RegularizerHandle']

_HOOKS_ATTR = '_visadapt_mpc_hooks'


# ---- the losses ----------------------------------------------------------------------------------------------------
def gram_penalty(gram: torch.Tensor, diagonal_free: bool) -> torch.Tensor:
    """‖G − I‖²_F, or ‖G − diag(G)‖²_F when ``diagonal_free``; ``gram`` is (..., r, r), summed over leading dims."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    if diagonal_free:
        return (gram * (1 - eye)).square().sum()
    return (gram - eye).square().sum()


def mpc_loss(factors: Sequence[Tuple[torch.Tensor, torch.Tensor]], kind: str) -> torch.Tensor:
    """R(A, B) summed over ``factors``: pairs of A (..., r, in) and B (..., out, r) (leading batch dims allowed).

    ``kind`` is ``'o'`` (‖A Aᵀ − I‖² + ‖Bᵀ B − I‖²) or ``'d'`` (‖A Aᵀ − I‖² + ‖Bᵀ B − diag(Bᵀ B)‖²). Computed in
    float32 or better.
    """
    if kind not in ('o', 'd'):
        raise ValueError(f"mpc_loss kind must be 'o' or 'd' ('n' has no loss), got {kind!r}")
    total = None
    for A, B in factors:
        dtype = torch.promote_types(A.dtype, torch.float32)
        A, B = A.to(dtype), B.to(dtype)
        term = gram_penalty(A @ A.transpose(-1, -2), False) + gram_penalty(B.transpose(-1, -2) @ B, kind == 'd')
        total = term if total is None else total + term
    if total is None:
        raise ValueError('mpc_loss needs at least one (A, B) pair')
    return total


def _mpc_layers(model: nn.Module) -> Dict[str, List[nn.Module]]:
    """Adapter name → its per-layer adapters whose config asks for an o/d regularizer."""
    out: Dict[str, List[nn.Module]] = {}
    for _, module in iter_adapted(model):
        for name, adapter in module.visadapt.items():
            if getattr(adapter.config, 'mpc', None) in ('o', 'd'):
                out.setdefault(name, []).append(adapter)
    return out


def _adapter_term(adapter: nn.Module, coef: float) -> torch.Tensor:
    factors = adapter.mpc_factors()
    if not factors:
        raise ValueError(f'{type(adapter).__name__} has no A/B factors for the MPC regularizer')
    return coef * mpc_loss(factors, adapter.config.mpc)


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """Σ_adapters λ · mean_layers R(A, B) over every adapter configured with ``mpc='o'`` or ``'d'``.

    Returns a 0-dim float tensor (zero, on the model's device, when no adapter has an o/d MPC). Differentiable with
    respect to the adapter parameters: add it to the task loss before ``backward()``.
    """
    total = None
    for adapters in _mpc_layers(model).values():
        for adapter in adapters:
            term = _adapter_term(adapter, adapter.config.mpc_weight / len(adapters))
            total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total


class RegularizerHandle:
    """What :func:`attach_regularizer` returns: ``handle.remove()`` takes the hooks off again."""

    def __init__(self, model: nn.Module, handles: List[torch.utils.hooks.RemovableHandle], num_params: int):
        self._model, self._handles, self.num_params = model, handles, num_params

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._model.__dict__.get(_HOOKS_ATTR) is self:
            del self._model.__dict__[_HOOKS_ATTR]

    def __repr__(self) -> str:
        return f'RegularizerHandle(params={self.num_params}, active={bool(self._handles)})'


def attach_regularizer(model: nn.Module) -> RegularizerHandle:
    """Apply the MPC o/d regularizers with no change to the training loop.

    Registers ``register_post_accumulate_grad_hook`` on every trainable parameter that the A/B factors of an adapter
    with ``mpc='o'``/``'d'`` are made of.
    After backward has accumulated a parameter's task gradient, its hook adds d/dθ of that adapter's term of
    :func:`regularization_loss` (recomputed from the current factors) to ``θ.grad``. So each ``loss.backward()``
    gives the gradients of ``loss + regularization_loss(model)``, and plain PyTorch, timm, mmengine and diffusers
    training loops need no change (see the note on AMP below).

    Notes:
        * Call it after the adapters exist (after ``inject``/``load_adapter``); adapters injected later are not
          covered. Calling it twice on a model raises; use ``handle.remove()`` first.
        * A parameter that takes no part in a backward (a disabled or merged adapter) gets no hook call, hence no
          regularizer gradient, in that backward.
        * With gradient accumulation over k backward calls per optimizer step the term is added k times: divide
          ``mpc_weight`` by k to match adding it once per step.
        * With an AMP ``GradScaler`` the task gradient is scaled but the added term is not; prefer
          :func:`regularization_loss` there.

    Returns:
        A :class:`RegularizerHandle` (``remove()`` detaches the hooks). Raises ValueError when no adapter of
        ``model`` has an o/d MPC configured.
    """
    if model.__dict__.get(_HOOKS_ATTR) is not None:
        raise ValueError('attach_regularizer was already called on this model; call .remove() on its handle first')
    layers = _mpc_layers(model)
    if not layers:
        raise ValueError("attach_regularizer: no adapter in this model has mpc='o' or mpc='d' in its config")
    handles: List[torch.utils.hooks.RemovableHandle] = []
    for adapters in layers.values():
        for adapter in adapters:
            coef = adapter.config.mpc_weight / len(adapters)
            params = [p for p in adapter.parameters() if p.requires_grad]
            with torch.enable_grad():  # hook only the parameters the factors are made of (not DoRA's m, MoSLoRA's M)
                used = torch.autograd.grad(_adapter_term(adapter, coef), params, allow_unused=True)
            for param, grad in zip(params, used):
                if grad is not None:
                    handles.append(param.register_post_accumulate_grad_hook(_make_hook(adapter, coef)))
    handle = RegularizerHandle(model, handles, len(handles))
    model.__dict__[_HOOKS_ATTR] = handle
    return handle


def detach_regularizer(model: nn.Module) -> None:
    """Remove the hooks :func:`attach_regularizer` put on ``model`` (no-op when there are none)."""
    handle = model.__dict__.get(_HOOKS_ATTR)
    if handle is not None:
        handle.remove()


def _make_hook(adapter: nn.Module, coef: float) -> Callable[[torch.Tensor], None]:
    def hook(param: torch.Tensor) -> None:
        with torch.enable_grad():
            term = _adapter_term(adapter, coef)
            (grad,) = torch.autograd.grad(term, [param], allow_unused=True)
        if grad is None:
            return
        if param.grad is None:
            param.grad = grad.to(param.dtype)
        else:
            param.grad.add_(grad.to(param.grad.dtype))
    return hook
