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

Two ways to train with the o/d regularizers (:mod:`visadapt.core.regularization`):

1. add it to the loss yourself: ``loss = task_loss + visadapt.regularization_loss(model)``;
2. leave the training loop untouched: ``visadapt.core.attach_regularizer(model)`` registers, on every adapter
   parameter that appears in some MPC factor, a hook that runs after the parameter's gradient has been accumulated
   in a backward pass and adds d(regularization_loss)/dθ to ``θ.grad``. One backward then yields exactly the
   gradients of ``task_loss + regularization_loss(model)`` (tested), so timm/mmengine/diffusers loops need no edit.

The total loss is Σ_adapters λ_adapter · mean_layers R(A_layer, B_layer), with λ = ``mpc_weight`` of that adapter's
config (a mean over layers, as PEFT's AdaLoRA does for its orthogonality loss, so λ does not depend on depth).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['MPCConfigMixin', 'MPCAdapterMixin', 'MPC_KINDS', 'MPC_ACTIVATIONS']

MPC_KINDS = ('o', 'd', 'n')
MPC_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    'relu': F.relu, 'gelu': F.gelu, 'silu': F.silu, 'tanh': torch.tanh}


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
