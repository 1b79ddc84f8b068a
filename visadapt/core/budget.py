"""Budget matching: pick a method's rank so its adapter has (as nearly as possible) a given trainable count.

The papers compare methods "at an equal budget" by tuning ranks by hand; here it is one call::

    match = visadapt.core.budget.match_budget(model, visadapt.DoRAConfig(target_types=['Conv2d']), target=250_000)
    print(match)     # timm efficientnet_lite0: DoRA r=7: 245,645 trainable parameters (target 250,000, -1.7%)
    visadapt.inject(model, match.config)

Counts come from dry runs: the method's adapters are injected into a copy of the model whose tensors live on
PyTorch's ``meta`` device (no memory, no compute), so the count is exactly what :func:`visadapt.inject` reports,
for every registered method, every layer geometry and every per-layer rule (rank clamping, ``rank_pattern``,
slices), with no per-method formula to keep in sync. A method whose adapters cannot be built on ``meta`` is
counted on an ordinary copy instead.

The knob is the config's ``budget_field`` attribute when a method declares one, else its integer rank ``r``. The
count is non-decreasing in the knob, so the search doubles the knob until the target is bracketed and then bisects;
values the method rejects (e.g. SeRA's ``split`` must divide r and the layer sizes) are skipped.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn

from .config import AdapterConfig
from .selection import train_entry_parameters
from .tuner import adapter_names, get_injection, inject, remove

__all__ = ['budget_field', 'count_adapter_params', 'match_budget', 'BudgetMatch', 'BudgetCounter']

_DRY_RUN_NAME = '_visadapt_budget'


def budget_field(config: AdapterConfig) -> Optional[str]:
    """Name of the integer field that sets ``config``'s size (``config.budget_field`` if declared, else ``'r'``).

    Returns None for methods without such a knob (BitFit, (IA)³, SSL/SSB, head-only, full fine-tuning, ...).
    """
    declared = getattr(config, 'budget_field', None)
    names = {f.name: f for f in dataclasses.fields(config)}
    if isinstance(declared, str):
        return declared if declared in names else None
    value = getattr(config, 'r', None)
    if 'r' in names and isinstance(value, int) and not isinstance(value, bool):
        return 'r'
    return None


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are empty tensors on the ``meta`` device."""
    memo: Dict[int, torch.Tensor] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        meta = torch.empty_like(t, device='meta')
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


class BudgetCounter:
    """Counts a config's trainable parameters on ``model`` by dry-run injection (results cached per config).

    Args:
        model: the model to count on; it is never modified (the dry runs use a copy).
        count: ``'adapter'`` (the adapter's own parameters, the usual budget) or ``'trainable'`` (also the fully
            trained ``train_modules``, e.g. the classifier).
    """

    def __init__(self, model: nn.Module, count: str = 'adapter'):
        if count not in ('adapter', 'trainable'):
            raise ValueError(f"count={count!r} is not valid; use 'adapter' or 'trainable'")
        self.model = model
        self.count = count
        self._copy: Optional[nn.Module] = None
        self._on_meta = True
        self._cache: Dict[str, int] = {}

    def _target(self) -> nn.Module:
        if self._copy is None:
            self._copy = _meta_copy(self.model) if self._on_meta else copy.deepcopy(self.model)
        return self._copy

    def __call__(self, config: AdapterConfig) -> int:
        """Trainable count of ``config`` on the model. Raises what :func:`visadapt.inject` raises for bad configs."""
        key = repr(config.to_dict())
        if key not in self._cache:
            self._cache[key] = self._dry_run(config)
        return self._cache[key]

    def _dry_run(self, config: AdapterConfig) -> int:
        target = self._target()
        try:
            report = inject(target, config, name=_DRY_RUN_NAME)
        except (RuntimeError, NotImplementedError):
            if not self._on_meta:
                raise
            self._on_meta, self._copy = False, None  # the method needs real tensors (e.g. data-dependent init)
            return self._dry_run(config)
        try:
            if self.count == 'adapter':
                return report.adapter_params
            # trainable parameters this adapter adds, whatever other adapters the model already has
            others = [n for n in adapter_names(target) if n != _DRY_RUN_NAME]
            return report.trainable - (_trainable_of(target, others) if others else 0)
        finally:
            remove(target, _DRY_RUN_NAME)


def _trainable_of(model: nn.Module, names: Iterable[str]) -> int:
    seen, total = set(), 0
    for name in names:
        for entry in get_injection(model, name).train_modules:
            for p in train_entry_parameters(model, entry):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
    return total


def count_adapter_params(model: nn.Module, config: AdapterConfig, count: str = 'adapter') -> int:
    """Trainable parameters ``visadapt.inject(model, config)`` would add (adapter only, or with train_modules)."""
    return BudgetCounter(model, count)(config)


@dataclass
class BudgetMatch:
    """The result of :func:`match_budget`.

    Attributes:
        config: the input config with the chosen value of ``field`` (ready for :func:`visadapt.inject`).
        field: the knob that was tuned (None if the method has none and the count is fixed).
        value: its chosen value.
        achieved: the trainable count of ``config``.
        target: the requested count.
        counts: every evaluated knob value → count (None for values the method rejected).
    """
    config: AdapterConfig
    field: Optional[str]
    value: Optional[int]
    achieved: int
    target: int
    counts: Dict[int, Optional[int]] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def rel_error(self) -> float:
        """(achieved - target) / target."""
        return (self.achieved - self.target) / self.target

    def __str__(self) -> str:
        knob = f' {self.field}={self.value}' if self.field else ' (no rank to tune)'
        return (f'{self.config.method}{knob}: {self.achieved:,} trainable parameters '
                f'(target {self.target:,}, {100 * self.rel_error:+.1f}%)')


def match_budget(model: nn.Module, config: AdapterConfig, target: int, *, field: Optional[str] = None,
                 values: Optional[Iterable[int]] = None, max_value: int = 65536, count: str = 'adapter',
                 counter: Optional[BudgetCounter] = None, at_most: bool = False) -> BudgetMatch:
    """Choose ``config``'s rank so its trainable count on ``model`` is as close as possible to ``target`` (with
    ``at_most``: the largest count that does not exceed it).

    Args:
        model: the model the adapter is for (not modified).
        config: the method config; every field except the knob is kept.
        target: the wanted number of trainable parameters (> 0).
        field: the knob to tune (default: :func:`budget_field`).
        values: explicit candidate values (all evaluated); default: a doubling-then-bisection search over
            1..``max_value``.
        max_value: the largest knob value the search tries. Large values cost nothing to count (meta tensors), but
            a method whose count grows slowly with its rank (VeRA: r + d_out per layer) may need a rank whose
            frozen shared matrices are large; :attr:`BudgetMatch.value` says what was chosen.
        count: ``'adapter'`` or ``'trainable'`` (see :class:`BudgetCounter`).
        counter: a :class:`BudgetCounter` to reuse across calls on the same model (shares its cache).
        at_most: never exceed ``target`` (e.g. to give a baseline no more parameters than the method it is
            compared with).
    Returns:
        A :class:`BudgetMatch`; ties between two values go to the smaller one.
    Raises:
        ValueError: ``target`` is not a positive integer, the method has no knob (its fixed count is named), the
            knob is not an integer field, or no candidate value is valid for this model.
    """
    if isinstance(target, bool) or not isinstance(target, int) or target <= 0:
        raise ValueError(f'target must be a positive integer number of parameters, got {target!r}')
    counter = counter or BudgetCounter(model, count)
    field = field or budget_field(config)
    if field is None:
        fixed = counter(config)
        raise ValueError(f'{config.method} has no rank to tune (its count on this model is fixed at {fixed:,}); '
                         f'tunable methods have an integer field r or declare budget_field')
    names = {f.name for f in dataclasses.fields(config)}
    if field not in names or not isinstance(getattr(config, field), int):
        raise ValueError(f'{config.method} has no integer field {field!r} to tune; its fields: {sorted(names)}')
    counts = _evaluate_knob(counter, config, field, target, values, max_value)
    best = _best_value(config, field, counts, target, at_most)
    return BudgetMatch(dataclasses.replace(config, **{field: best}), field, best, counts[best], target, counts)


def _evaluate_knob(counter: BudgetCounter, config: AdapterConfig, field: str, target: int,
                   values: Optional[Iterable[int]], max_value: int) -> Dict[int, Optional[int]]:
    """Knob value → trainable count (None where the method rejects the value) for the values the search visits."""
    counts: Dict[int, Optional[int]] = {}

    def evaluate(v: int) -> Optional[int]:
        if v not in counts:
            try:
                counts[v] = counter(dataclasses.replace(config, **{field: v}))
            except (ValueError, TypeError):  # the method rejects this value (e.g. a divisibility rule)
                counts[v] = None
        return counts[v]

    if values is not None:
        for v in values:
            evaluate(int(v))
    else:
        _search(evaluate, target, max_value)
    return counts


def _best_value(config: AdapterConfig, field: str, counts: Dict[int, Optional[int]], target: int,
                at_most: bool) -> int:
    valid = {v: c for v, c in counts.items() if c is not None}
    if not valid:
        tried = sorted(counts)
        raise ValueError(f'{config.method}: no value of {field} in {tried[:8]}{"..." if len(tried) > 8 else ""} '
                         f'gives a valid adapter for this model')
    if at_most:
        fitting = {v: c for v, c in valid.items() if c <= target}
        if not fitting:
            raise ValueError(f'a parameter budget of {target:,} is too small for {config.method}: the smallest '
                             f'{field} tried already needs {min(valid.values()):,} parameters on these layers')
        valid = fitting
    return min(valid, key=lambda v: (abs(valid[v] - target), v))


def _search(evaluate, target: int, max_value: int) -> None:
    """Doubling to bracket ``target``, then bisection; invalid values are stepped over."""
    lo, hi, v, last = None, None, 1, None
    while v <= max_value:
        c = _first_valid(evaluate, v, min(2 * v, max_value + 1))
        if c is None:
            v *= 2
            continue
        v_valid, count = c
        if count >= target:
            hi = v_valid
            break
        lo = v_valid
        if last is not None and count == last:  # saturated (every rank clamped to its layer's size)
            return
        last = count
        v = max(2 * v, v_valid + 1)
    if hi is None or lo is None:
        return
    while hi - lo > 1:
        mid = (lo + hi) // 2
        found = None
        for step in range(0, hi - lo):  # nearest valid value inside (lo, hi), scanning outward from mid
            for cand in (mid - step, mid + step):
                if lo < cand < hi and evaluate(cand) is not None:
                    found = cand
                    break
            if found is not None:
                break
        if found is None:
            return
        if evaluate(found) < target:
            lo = found
        else:
            hi = found


def _first_valid(evaluate, start: int, stop: int):
    for v in range(start, stop):
        c = evaluate(v)
        if c is not None:
            return v, c
    return None
