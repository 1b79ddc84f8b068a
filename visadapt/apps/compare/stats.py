"""Seed statistics: the mean with its Student-t confidence interval, the paired difference of two methods trained on
the same seeds, and the verdict a directional claim gets from that interval.

Every run of a comparison is one seed (initialization and data order); a method's runs are independent draws, so
the interval of the mean is the t-interval ``mean ± t(1 - α/2, n - 1) · s / √n`` (s: sample standard deviation).
Two methods run on the same seeds are compared through the per-seed differences (a paired design: seed-to-seed
variation shared by both methods cancels), with the same interval for the mean difference and the two-sided paired
t-test (:func:`scipy.stats.ttest_rel`) for its p-value.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

__all__ = ['CONFIDENCE', 'VERDICTS', 'mean_ci', 'paired_difference', 'verdict']

CONFIDENCE = 0.95
#: the three answers a directional claim ("A beats B") can get: the interval of A - B is above 0, below 0, or holds 0
VERDICTS = ('reproduced in direction', 'not reproduced', 'not distinguishable at this size')


def _values(values: Sequence[float], what: str) -> list:
    out = [float(v) for v in values]
    if len(out) < 2:
        raise ValueError(f'{what}: a confidence interval needs at least 2 values, got {len(out)}')
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f'{what}: values must be finite, got {out}')
    return out


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE, what: str = 'values') -> Dict[str, float]:
    """Mean and two-sided Student-t confidence interval of independent values (one per seed).

    Returns:
        ``{'n', 'mean', 'std' (sample, ddof 1), 'half_width', 'low', 'high'}``.
    """
    from scipy import stats
    if not 0.0 < confidence < 1.0:
        raise ValueError(f'confidence must be in (0, 1), got {confidence!r}')
    x = _values(values, what)
    n = len(x)
    mean = math.fsum(x) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in x) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {'n': n, 'mean': mean, 'std': std, 'half_width': half, 'low': mean - half, 'high': mean + half}


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Dict[str, float]:
    """``a - b`` seed by seed (``a[i]`` and ``b[i]`` share seed i): the mean difference, its t-interval and the
    two-sided paired t-test p-value.

    Returns:
        :func:`mean_ci` of the differences plus ``'p'`` (1.0 when every difference is 0; 0.0 when they are all equal
        and non-zero, where the t statistic is infinite).
    """
    from scipy import stats
    a, b = _values(a, 'a'), _values(b, 'b')
    if len(a) != len(b):
        raise ValueError(f'paired values need the same seeds: got {len(a)} and {len(b)} values')
    out = mean_ci([x - y for x, y in zip(a, b)], confidence, 'differences')
    if out['std'] == 0.0:
        out['p'] = 1.0 if out['mean'] == 0.0 else 0.0
    else:  # the paired t-test (scipy.stats.ttest_rel's statistic and two-sided p-value)
        t = out['mean'] / (out['std'] / math.sqrt(out['n']))
        out['p'] = float(2.0 * stats.t.sf(abs(t), out['n'] - 1))
    return out


def verdict(difference: Dict[str, float]) -> str:
    """The answer to "A beats B" from the interval of ``A - B`` (:func:`paired_difference`): one of :data:`VERDICTS`."""
    if difference['low'] > 0.0:
        return VERDICTS[0]
    if difference['high'] < 0.0:
        return VERDICTS[1]
    return VERDICTS[2]
