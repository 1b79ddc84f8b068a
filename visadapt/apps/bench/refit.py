"""``--refit``: fit the path-cost constants (:class:`visadapt.core.path_cost.PathCost`) of the run's device type to
the run's per-layer path timings.

Each timed layer gives two equations, one per forced path: measured seconds = s · (cost terms · fields), with the
terms from :func:`.paths.cost_terms` and the unknowns s (seconds per MAC-equivalent) and s · field for every linear
field (:data:`.paths.LINEAR_FIELDS`). They are solved by non-negative least squares on relative errors (each equation
divided by its measured time, so small layers count as much as large ones); the fields are the solution divided by
s. The non-linear fields (``cached_elems``, ``narrow_input_grad``, ``narrow_channels``) stay at their current values.
The refit constants are then judged like ``auto``: on how many layers the path they predict cheaper is within
``PATH_TOLERANCE`` of the faster measured one, next to the current constants (the choices ``auto`` made in the run).
Both are judged on the layers they were fitted to (in-sample): a check of the fit, not a validation.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Sequence

import numpy as np

from visadapt.core.path_cost import PathCost, cost_model

from .paths import LINEAR_FIELDS, PATH_TOLERANCE

__all__ = ['refit', 'pathcost_repr', 'earlier_rows']


def _ok(row: Dict[str, Any], chosen: str) -> bool:
    best = min(row['weight_ms'], row['bypass_ms'])
    return row[f'{chosen}_ms'] <= PATH_TOLERANCE * best


def _choose(row: Dict[str, Any], theta: Sequence[float]) -> str:
    terms = row['cost_terms']
    return 'bypass' if np.dot(terms['bypass'], theta) < np.dot(terms['weight'], theta) else 'weight'


def pathcost_repr(model: PathCost) -> str:
    """``PathCost(field=value, ...)``, ready to paste into ``visadapt/core/path_cost.py`` or ``set_cost_model``."""
    parts = [f'{f.name}={getattr(model, f.name):.4g}' if isinstance(getattr(model, f.name), float)
             else f'{f.name}={getattr(model, f.name)}' for f in dataclasses.fields(model)]
    return 'PathCost(' + ', '.join(parts) + ')'


def refit(rows: List[Dict[str, Any]], device_type: str) -> Dict[str, Any]:
    """The refit of ``device_type``'s constants to ``rows`` (path-choice rows of one run); see the module doc."""
    from scipy.optimize import nnls
    current = cost_model(device_type)
    theta_now = [1.0] + [getattr(current, f) for f in LINEAR_FIELDS]
    result: Dict[str, Any] = {
        'device_type': device_type, 'layers': len(rows), 'current': dataclasses.asdict(current),
        'current_ok': sum(_ok(r, r['auto_path']) for r in rows),
        # the cost terms reproduce auto's choice with the current constants (a check of the terms themselves)
        'current_terms_agree': sum(_choose(r, theta_now) == r['auto_path'] for r in rows)}
    if not rows:
        return {**result, 'error': 'no per-layer path timings in this run (--no-path-choice?)'}
    terms = np.array([r['cost_terms'][p] for r in rows for p in ('weight', 'bypass')], dtype=float)
    seconds = np.array([r[f'{p}_ms'] / 1e3 for r in rows for p in ('weight', 'bypass')], dtype=float)
    # the current constants' time prediction at their best seconds-per-MAC scale (least squares on relative errors)
    ratio = terms @ np.array(theta_now) / seconds
    scale = float(ratio.sum() / (ratio ** 2).sum())
    result['current_median_rel_error'] = float(np.median(np.abs(scale * ratio - 1)))
    solution, residual = nnls(terms / seconds[:, None], np.ones_like(seconds))
    if solution[0] <= 0:
        return {**result, 'error': 'the fit gives no weight to the MAC count (too few or too similar layers)'}
    fields = {f: float(v / solution[0]) for f, v in zip(LINEAR_FIELDS, solution[1:])}
    fitted = dataclasses.replace(current, **fields)
    theta = [1.0] + [fields[f] for f in LINEAR_FIELDS]
    predicted = terms @ solution
    choices = [_choose(r, theta) for r in rows]
    return {**result, 'refit': dataclasses.asdict(fitted), 'refit_repr': pathcost_repr(fitted),
            'seconds_per_mac': float(solution[0]), 'refit_ok': sum(_ok(r, c) for r, c in zip(rows, choices)),
            'refit_changes': sum(c != r['auto_path'] for r, c in zip(rows, choices)),
            'median_rel_error': float(np.median(np.abs(predicted - seconds) / seconds)),
            'residual': float(residual)}


def earlier_rows(paths: Sequence[str], device_type: str) -> List[Dict[str, Any]]:
    """The per-layer path rows of earlier ``bench.json`` files (``--refit-from``), all from ``device_type``.

    Raises ValueError naming the file that is unreadable, from another device type or without cost terms."""
    import torch
    rows: List[Dict[str, Any]] = []
    for path in paths:
        try:
            with open(path, encoding='utf-8') as f:
                result = json.load(f)
            device = torch.device(result['meta']['device']).type
            found = [r for m in result['models'] for r in m['path_choice']]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f'--refit-from {path!r}: not a readable visadapt-bench JSON ({err})') from None
        if device != device_type:
            raise ValueError(f'--refit-from {path!r} was measured on {device}, this run refits {device_type}')
        if any('cost_terms' not in r for r in found):
            raise ValueError(f'--refit-from {path!r} has path timings without cost terms (an older bench version)')
        rows += found
    return rows
