"""MPC: Matrix Pattern Constraints for methods with a down matrix A (r×in) and an up matrix B (out×r).

Paper: "See Further for Parameter Efficient Fine-tuning by Standing on the Shoulders of Decomposition", Si et al.,
arXiv:2407.05417, section 4.2 (equations (20) and (21)).

The paper writes W ∈ R^{n×m} acting as ``x W`` with A ∈ R^{n×r} (down) and B ∈ R^{r×m} (up). In visadapt's
``y = W x`` convention (W ∈ R^{out×in}) the same matrices are A = A_paperᵀ ∈ R^{r×in} and B = B_paperᵀ ∈ R^{out×r},
so the paper's AᵀA becomes A Aᵀ and its B Bᵀ becomes Bᵀ B:

* MPC_o (``mpc='o'``, eq. 20): R = ‖A Aᵀ − I‖²_F + ‖Bᵀ B − I‖²_F (rows of A and columns of B orthonormal);
* MPC_d (``mpc='d'``, eq. 21): R = ‖A Aᵀ − I‖²_F + ‖Bᵀ B − diag(Bᵀ B)‖²_F (columns of B only orthogonal);
* MPC_n (``mpc='n'``): no loss; a nonlinearity σ between the two matrices, ΔW x := B σ(A x). The update is then
  not a matrix, so such adapters run only on the bypass path and cannot be merged (``visadapt.merge`` raises).

Which methods support it: those whose config mixes in :class:`MPCConfigMixin` and whose adapter implements
:meth:`visadapt.Adapter.mpc_factors`: LoRA, DoRA (o/d), MELoRA (one pair per mini-LoRA), MoSLoRA (A and B around
the mixer), SeRA (the blocks of its block-diagonal A and B), FLoRA (o/d: the in-channel factor A^(2)ᵀ and the
out-channel factor A^(1)). Other configs have no ``mpc`` field, so asking for it fails at config time.

Two ways to train with the o/d regularizers:

1. add it to the loss yourself: ``loss = task_loss + visadapt.regularization_loss(model)``;
2. leave the training loop untouched: ``visadapt.methods.mpc.attach_regularizer(model)`` registers, on every adapter
   parameter that appears in some MPC factor, a hook that runs after the parameter's gradient has been accumulated
   in a backward pass and adds d(regularization_loss)/dθ to ``θ.grad``. One backward then yields exactly the
   gradients of ``task_loss + regularization_loss(model)`` (tested), so timm/mmengine/diffusers loops need no edit.

The total loss is Σ_adapters λ_adapter · mean_layers R(A_layer, B_layer), with λ = ``mpc_weight`` of that adapter's
config (a mean over layers, as PEFT's AdaLoRA does for its orthogonality loss, so λ does not depend on depth).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.layer import iter_adapted

__all__ = ['MPCConfigMixin', 'MPCAdapterMixin', 'MPC_KINDS', 'MPC_ACTIVATIONS', 'mpc_loss', 'gram_penalty',
           'regularization_loss', 'attach_regularizer', 'detach_regularizer', 'RegularizerHandle']

MPC_KINDS = ('o', 'd', 'n')
MPC_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    'relu': F.relu, 'gelu': F.gelu, 'silu': F.silu, 'tanh': torch.tanh}
_HOOKS_ATTR = '_visadapt_mpc_hooks'


@dataclass
class MPCConfigMixin:
    """Config fields for the MPC regularizers; mixed into the configs of methods with A/B factors.

    Attributes:
        mpc: None (off), ``'o'`` (MPC_o), ``'d'`` (MPC_d) or ``'n'`` (MPC_n, a nonlinearity between A and B).
        mpc_weight: λ, the weight of the o/d regularizer (mean over this adapter's layers). Unused for ``'n'``.
        mpc_act: the nonlinearity σ for ``mpc='n'``: one of ``MPC_ACTIVATIONS``.
    """
    #: MPC kinds this method supports (a method that cannot run B σ(A x) leaves out 'n')
    mpc_kinds: ClassVar[Tuple[str, ...]] = MPC_KINDS

    mpc: Optional[str] = None
    mpc_weight: float = 0.1
    mpc_act: str = 'relu'

    def __post_init__(self) -> None:
        if self.mpc is not None and self.mpc not in self.mpc_kinds:
            raise ValueError(f'{type(self).__name__}: mpc={self.mpc!r} is not valid; use None or one of '
                             f'{self.mpc_kinds}')
        if isinstance(self.mpc_weight, bool) or not isinstance(self.mpc_weight, (int, float)) \
                or not math.isfinite(self.mpc_weight) or self.mpc_weight < 0:
            raise ValueError(f'{type(self).__name__}: mpc_weight must be a finite number >= 0, got {self.mpc_weight!r}')
        if self.mpc_act not in MPC_ACTIVATIONS:
            raise ValueError(f'{type(self).__name__}: mpc_act={self.mpc_act!r} is not valid; use one of '
                             f'{sorted(MPC_ACTIVATIONS)}')
        super().__post_init__()


class MPCAdapterMixin:
    """Adapter side of MPC_n: call :meth:`_init_mpc` in ``__init__`` after ``Adapter.__init__``.

    Sets ``self.mpc_act`` (the activation for ``mpc='n'``, else None); with MPC_n the adapter has no weight path
    (so it is not mergeable and a forced ``forward_path='weight'`` is refused) and no exact factored form.
    """
    mpc_act: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def _init_mpc(self, config: MPCConfigMixin) -> None:
        self.mpc_act = MPC_ACTIVATIONS[config.mpc_act] if config.mpc == 'n' else None
        if self.mpc_act is not None and not self.has_bypass:
            raise ValueError(f"mpc='n' needs the factorized bypass path (B σ(A x)), which {type(self).__name__} "
                             f"does not have for this layer; use mpc='o' or 'd'")

    @property
    def has_weight_path(self) -> bool:
        return self.mpc_act is None and super().has_weight_path

    def why_not_mergeable(self) -> str:
        if self.mpc_act is not None:
            return "mpc='n' puts a nonlinearity between A and B, so the update B σ(A x) is not a weight matrix"
        return super().why_not_mergeable()

    def why_no_weight_path(self) -> str:
        if self.mpc_act is not None:
            return "with mpc='n' (B σ(A x) is not a matrix)"
        return super().why_no_weight_path()

    def why_no_factors(self) -> str:
        if self.mpc_act is not None:
            return "mpc='n' puts a nonlinearity between A and B"
        return super().why_no_factors()

    def _check_weight_path(self) -> None:
        if self.mpc_act is not None:
            raise ValueError("an adapter with mpc='n' has no ΔW: B σ(A x) is not a weight matrix")


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
