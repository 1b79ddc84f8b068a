"""Results of a comparison: the statistics per method, the markdown table, the plots, and the verdicts on the papers'
claims; also the README/doc generator that turns a finished study into their comparison sections.

A row's score is its test metric over the seed runs at the chosen rate: mean and 95% t-interval; its difference from
the reference (LoRA) is paired by seed (same initialization seed and data order), with the interval of the mean
difference and the paired t-test p-value (:mod:`.stats`). A claim "A beats B" is *reproduced in direction* when the
interval of A − B lies above 0, *not reproduced* when it lies below 0, and *not distinguishable at this size* when it
holds 0, whatever the means are.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional, Sequence, Tuple

from visadapt.core import atomic_write_bytes

from .stats import mean_ci, paired_difference, verdict

__all__ = ['summarize', 'markdown_table', 'convergence_text', 'write_setting', 'write_plots', 'CLAIMS', 'claim_lines', 'study_markdown',
           'update_marked_section', 'write_docs', 'BEGIN', 'END', 'METRIC_TITLES']

METRIC_TITLES = {'accuracy': 'test accuracy (%)', 'sum': 'test Sum of R@1/5/10, both ways'}
BEGIN, END = '<!-- visadapt-compare:study:begin -->', '<!-- visadapt-compare:study:end -->'


def _test_scores(row: Dict[str, Any], metric: str) -> Dict[int, float]:
    return {r['identity']['seed']: float(r['test'][metric]) for r in row.get('runs', []) if 'test' in r}


def _cpu_seconds(row: Dict[str, Any]) -> float:
    """CPU seconds of every run of a row: sweep, seeds and convergence check."""
    check = (row.get('check') or {}).get('cpu_seconds', 0.0)
    return sum(s['cpu_seconds'] for s in row.get('sweep', [])) + sum(r['cpu_seconds'] for r in row.get('runs', [])) \
        + check


def summarize(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One summary per row: sizes, sweep, chosen rate, test mean and interval, paired difference from the reference
    (None for the reference itself or when the seeds differ), and why a row has no numbers (skip/failure)."""
    metric, seeds = result['metric'], list(result['protocol']['seeds'])
    rows = {r['label']: r for r in result['rows']}
    ref = _test_scores(rows.get(result['reference'], {}), metric)
    out = []
    for row in result['rows']:
        scores = _test_scores(row, metric)
        s: Dict[str, Any] = {k: row.get(k) for k in ('label', 'spec', 'adapter_params', 'skip', 'chosen_lr', 'edge',
                                                      'extended')}
        s.update(failed=row.get('failed', []), cpu_seconds=_cpu_seconds(row), scores=scores,
                 sweep={str(x['lr']): None if x['val'] is None else x['val'][metric] for x in row.get('sweep', [])},
                 trainable_params=row['runs'][0]['trainable_params'] if row.get('runs') else None)
        complete = sorted(scores) == sorted(seeds) and not s['failed']
        s['test'] = mean_ci([scores[k] for k in seeds]) if complete else None
        s['check'] = _check(row, metric)
        s['diff'] = None
        if complete and row['label'] != result['reference'] and sorted(ref) == sorted(seeds):
            s['diff'] = paired_difference([scores[k] for k in seeds], [ref[k] for k in seeds])
            s['diff']['verdict'] = verdict(s['diff'])
        out.append(s)
    return out


def _check(row: Dict[str, Any], metric: str) -> Optional[Dict[str, Any]]:
    """The convergence check against the same seed's run: validation scores and steps of both, or None."""
    check = row.get('check')
    if not check or 'val' not in check:
        return {'failed': check.get('failed') or check.get('diverged')} if check else None
    seed = check['identity']['seed']
    base = next((r for r in row.get('runs', []) if r['identity']['seed'] == seed), None)
    if base is None:
        return None
    return {'seed': seed, 'scale': check['identity']['scale'], 'steps': base['steps'], 'val': base['val'][metric],
            'long_steps': check['steps'], 'long_val': check['val'][metric],
            'gain': check['val'][metric] - base['val'][metric]}


def convergence_text(summary: List[Dict[str, Any]], metric: str) -> str:
    """One sentence on the convergence checks (empty when there are none)."""
    checks = [(s['label'], s['check']) for s in summary if s.get('check')]
    if not checks:
        return ''
    parts = [f"{label} {c['val']:.2f} after {c['steps']} steps, {c['long_val']:.2f} after {c['long_steps']} "
             f"({c['gain']:+.2f})" if 'gain' in c else f"{label}: the check run failed ({c['failed']})"
             for label, c in checks]
    done = next((c for _, c in checks if 'gain' in c), None)
    how = f"seed {done['seed']}, a schedule {done['scale']:g} times as long" if done else 'no check finished'
    return f'Convergence check (validation {metric} at the chosen rate; {how}): ' + '; '.join(parts) + '.'


def _fields(spec: Dict[str, Any]) -> str:
    return ', '.join(f'{k}={v}' for k, v in spec.items() if k != 'method') or 'defaults'


def _interval(ci: Dict[str, float], signed: bool = False) -> str:
    f = '{:+.2f}' if signed else '{:.2f}'
    return f"{f.format(ci['mean'])} [{f.format(ci['low'])}, {f.format(ci['high'])}]"


def _rates(s: Dict[str, Any]) -> str:
    if s['chosen_lr'] is None:
        return '—'
    grid = sorted(float(x) for x in s['sweep'])
    mark = ' (grid end)' if s['edge'] else ''
    return f"{s['chosen_lr']:.3g} of {', '.join(f'{x:.3g}' for x in grid)}{mark}"


def markdown_table(result: Dict[str, Any], summary: List[Dict[str, Any]]) -> str:
    """The comparison table: sizes, rates, test mean [95% CI], paired difference from the reference, p-value."""
    metric = result['metric']
    ref = result['reference']
    lines = [f'| method | config | adapter params | trainable params | rate (chosen of swept) | {METRIC_TITLES[metric]}: '
             f'mean [95% CI] | Δ vs {ref} [95% CI] | p (paired t) |', '|---|---|---:|---:|---|---:|---:|---:|']
    for s in summary:
        if s['skip'] or s['test'] is None:
            why = s['skip'] or '; '.join(s['failed']) or 'runs missing'
            lines.append(f"| {s['label']} | {_fields(s['spec'])} | {s['adapter_params']:,} | | | not run: {why} | | |")
            continue
        diff = '(reference)' if s['label'] == ref else _interval(s['diff'], True) if s['diff'] else '—'
        p = f"{s['diff']['p']:.3f}" if s['diff'] else ''
        lines.append(f"| {s['label']} | {_fields(s['spec'])} | {s['adapter_params']:,} | {s['trainable_params']:,} | "
                     f"{_rates(s)} | {_interval(s['test'])} | {diff} | {p} |")
    return '\n'.join(lines)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format='png', dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _results_figure(result: Dict[str, Any], summary: List[Dict[str, Any]]) -> bytes:
    """Left: test score vs trainable parameters (95% CIs); right: paired difference from the reference (95% CIs)."""
    import matplotlib.pyplot as plt
    done = [s for s in summary if s['test'] is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, s in enumerate(done):
        t = s['test']
        ax1.errorbar(s['trainable_params'], t['mean'], yerr=[[t['mean'] - t['low']], [t['high'] - t['mean']]],
                     fmt='o', capsize=3, color=f'C{i % 10}', label=s['label'])
    ax1.set_xscale('log')
    ax1.set_xlabel('trainable parameters (log scale)')
    ax1.set_ylabel(METRIC_TITLES[result['metric']] + ', mean and 95% CI')
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    diffs = [s for s in done if s['diff'] is not None]
    for y, s in enumerate(diffs):
        d = s['diff']
        ax2.errorbar(d['mean'], y, xerr=[[d['mean'] - d['low']], [d['high'] - d['mean']]], fmt='o', capsize=3,
                     color='C2' if d['low'] > 0 else 'C3' if d['high'] < 0 else 'C7')
    ax2.axvline(0.0, color='k', lw=0.8)
    ax2.set_yticks(range(len(diffs)), [s['label'] for s in diffs], fontsize=8)
    ax2.set_xlabel(f"difference from {result['reference']}, paired by seed (95% CI)")
    ax2.grid(alpha=0.3, axis='x')
    fig.suptitle(result['setting'], fontsize=10)
    return _png(fig)


def _curves_figure(result: Dict[str, Any]) -> Optional[bytes]:
    """Validation score during training (each seed thin, their mean thick) and the training loss of the rows that
    record curves: the evidence that the schedule is long enough."""
    import matplotlib.pyplot as plt
    import numpy as np
    rows = [r for r in result['rows'] if any(run.get('curve') for run in r.get('runs', []))]
    if not rows:
        return None
    metric = result['metric']
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, row in enumerate(rows):
        runs = [run for run in row['runs'] if run.get('curve')]
        steps = [p['step'] for p in runs[0]['curve']]
        values = np.array([[p['val'][metric] for p in run['curve']] for run in runs])
        for v in values:
            ax1.plot(steps, v, color=f'C{i}', lw=0.6, alpha=0.4)
        ax1.plot(steps, values.mean(axis=0), 'o-', color=f'C{i}', lw=1.8,
                 label=f"{row['label']} (lr {row['chosen_lr']:.3g}, {len(runs)} seeds)")
        check = row.get('check') or {}
        if check.get('curve'):
            ax1.plot([p['step'] for p in check['curve']], [p['val'][metric] for p in check['curve']], 's--',
                     color=f'C{i}', lw=1.0, label=f"{row['label']}: {check['identity']['scale']:g}× the schedule "
                                                  f"(seed {check['identity']['seed']})")
        loss = np.array([[p[1] for p in run['train_loss']] for run in runs])
        ax2.plot([p[0] for p in runs[0]['train_loss']], loss.mean(axis=0), color=f'C{i}', label=row['label'])
    ax1.set_xlabel('step')
    ax1.set_ylabel(f"validation {metric}")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.set_xlabel('step')
    ax2.set_ylabel('training loss (binned, mean over seeds)')
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"{result['setting']}: convergence at the chosen rates", fontsize=10)
    return _png(fig)


def write_plots(result: Dict[str, Any], summary: List[Dict[str, Any]], folder: str) -> List[str]:
    """``results.png`` and (when rows recorded curves) ``curves.png`` in ``folder``; returns the paths written."""
    import matplotlib
    matplotlib.use('Agg')
    paths = []
    for name, data in (('results.png', _results_figure(result, summary)), ('curves.png', _curves_figure(result))):
        if data is not None:
            paths.append(os.path.join(folder, name))
            atomic_write_bytes(paths[-1], data)
    return paths


def _describe(result: Dict[str, Any]) -> str:
    """One paragraph: what was run (data, sizes, schedule, protocol, budget) and what it cost."""
    st, p = result['settings'], result['protocol']
    cpu = sum(s['cpu_seconds'] for s in summarize(result))
    if st['kind'] == 'conv':
        size = f"{st['shots']} images per class" if st['shots'] else f"{st['train_size']:,} training images"
        what = (f"{st['model']} ({st['pretrained']} weights), {st['data']} at {st['image_size']}×{st['image_size']}, "
                f"{size}, {st['val_size']:,} validation images (from the training set), {st['test_size']:,} test "
                f"images; {st['epochs']} epochs of batch {st['batch_size']}")
    else:
        counts = next((r['runs'][0].get('counts') for r in result['rows'] if r.get('runs')), None) or {}
        n = {k: f"{v['images']:,} images / {v['captions']:,} captions" for k, v in counts.items()}
        what = (f"two-tower retrieval ({os.path.basename(st['model_config'])}), {n.get('train', '?')} to train, "
                f"{n.get('val', '?')} to validate, {n.get('test', '?')} to test; {st['epochs']} epochs of batch "
                f"{st['batch_size']}, triplet margin {st['margin']}")
    return (f"{what}. Budget {result['budget']:,} adapter parameters (LoRA r = {st['ref_rank']}); rates: "
            f"{p['points']} per method, ×{p['factor']:g} apart (+{p['extend']} past a winning end), chosen on the "
            f"validation split with seed {p['sweep_seed']}; then seeds {', '.join(map(str, p['seeds']))}. "
            f"{cpu / 60:.1f} CPU-minutes in all runs.")


def write_setting(result: Dict[str, Any], folder: str) -> Dict[str, Any]:
    """``results.json`` (raw result + summary), ``results.md`` and the plots in ``folder``; returns the summary."""
    summary = summarize(result)
    os.makedirs(folder, exist_ok=True)
    atomic_write_bytes(os.path.join(folder, 'results.json'),
                       json.dumps({**result, 'summary': summary}, indent=1).encode())
    text = (f"### {result['setting']}\n\n{_describe(result)}\n\n{markdown_table(result, summary)}\n\n"
            f"{convergence_text(summary, result['metric'])}\n")
    atomic_write_bytes(os.path.join(folder, 'results.md'), text.encode())
    write_plots(result, summary, folder)
    return {'markdown': text, 'summary': summary}


#: the seed papers' claims, each with its comparisons (which settings, method A, method B: "A beats B"). Settings:
#: 'conv' (conv settings with a training-set size), 'shots' (k-shot conv settings), 'attention' (retrieval). LoRA on
#: convs has two forms (chain: k×k conv to r channels then 1×1; reshape: the kernel as a matrix); a claim against
#: LoRA is checked against both.
CLAIMS: List[Tuple[str, List[Tuple[str, str, str]]]] = [
    ('FLoRA beats LoRA on convs at an equal budget (FLoRA paper, Table 1: ConvNeXt-V2-L, COCO 48.1 vs 47.4 mAP, '
     'ADE20K 51.9 vs 51.4 mIoU)', [('conv', 'FLoRA', 'LoRA (chain)'), ('conv', 'FLoRA', 'LoRA (reshape)')]),
    ('SVFT (banded, d = 2) matches or beats LoRA r = 8 with far fewer parameters in 10-shot image classification '
     '(SVFT paper, Table 9)', [('shots', 'SVFT (banded, d=2)', 'LoRA (chain)'),
                               ('shots', 'SVFT (banded, d=2)', 'LoRA (reshape)')]),
    ('SeRA beats LoRA and MELoRA in image–text retrieval at a comparable budget (SeRA paper, Table 1: CLIP-B Sum '
     '395.7 vs 363.9 / 394.4)', [('attention', 'SeRA', 'LoRA'), ('attention', 'SeRA', 'MELoRA')]),
    ('The MPC regularizers improve LoRA-family methods (subspace-tuning paper)',
     [('conv', 'FLoRA + MPC_o', 'FLoRA'), ('shots', 'FLoRA + MPC_o', 'FLoRA'), ('attention', 'LoRA + MPC_o', 'LoRA'),
      ('attention', 'LoRA + MPC_d', 'LoRA')]),
]


def _kind(result: Dict[str, Any]) -> str:
    st = result['settings']
    return 'attention' if st['kind'] == 'attention' else 'shots' if st.get('shots') else 'conv'


def _comparison(result: Dict[str, Any], a: str, b: str) -> Optional[Dict[str, Any]]:
    """A − B on the test metric, paired by seed, with sizes; None when either row has no complete runs."""
    rows = {r['label']: r for r in result['rows']}
    seeds = list(result['protocol']['seeds'])
    if a not in rows or b not in rows:
        return None
    sa, sb = _test_scores(rows[a], result['metric']), _test_scores(rows[b], result['metric'])
    if sorted(sa) != sorted(seeds) or sorted(sb) != sorted(seeds):
        return None
    diff = paired_difference([sa[k] for k in seeds], [sb[k] for k in seeds])
    return {**diff, 'verdict': verdict(diff), 'params': (rows[a]['adapter_params'], rows[b]['adapter_params'])}


def claim_lines(results: Sequence[Dict[str, Any]]) -> List[str]:
    """One markdown line per claim: the overall verdict, then each comparison's difference, interval, p and verdict."""
    lines = []
    for text, comparisons in CLAIMS:
        parts, verdicts = [], []
        for kind, a, b in comparisons:
            for result in (r for r in results if _kind(r) == kind):
                c = _comparison(result, a, b)
                if c is None:
                    parts.append(f'{result["setting"]}: {a} vs {b} not run')
                    continue
                verdicts.append(c['verdict'])
                parts.append(f"{result['setting']}: {a} − {b} = {_interval(c, True)} (p = {c['p']:.3f}; "
                             f"{c['params'][0]:,} vs {c['params'][1]:,} adapter parameters) → {c['verdict']}")
        overall = ('not run' if not verdicts else verdicts[0] if len(set(verdicts)) == 1
                   else 'mixed: ' + ', '.join(f'{verdicts.count(v)} {v}' for v in dict.fromkeys(verdicts)))
        if not parts:
            lines.append(f'- **{text}**: not run (this study has no setting for it).')
        else:
            lines.append(f'- **{text}**: *{overall}*. ' + '; '.join(parts) + '.')
    return lines


def study_markdown(results: Sequence[Dict[str, Any]], images: Dict[str, List[str]], where: str) -> str:
    """The study's section: every setting's description and table, its figures (paths relative to ``where``, the
    folder of the file the text goes into) and the claim lines."""
    out = []
    for result in results:
        summary = summarize(result)
        out += [f"**{result['setting']}**: {_describe(result)}", '', markdown_table(result, summary), '',
                convergence_text(summary, result['metric']), '']
        for path in images.get(result['setting'], []):
            name = os.path.splitext(os.path.basename(path))[0].split('--')[-1]
            out += [f'![{result["setting"]}: {name}]({os.path.relpath(path, where)})', '']
    out += ['What the papers claim, judged from the 95% intervals of the paired differences (test split):', '']
    out += claim_lines(results)
    return '\n'.join(out) + '\n'


def update_marked_section(path: str, text: str) -> None:
    """Replace what lies between :data:`BEGIN` and :data:`END` in ``path`` (atomically); both markers must be there."""
    with open(path, encoding='utf-8') as f:
        content = f.read()
    pattern = re.compile(re.escape(BEGIN) + r'.*?' + re.escape(END), re.S)
    if len(pattern.findall(content)) != 1:
        raise ValueError(f'{path!r} needs exactly one {BEGIN} ... {END} block for the study results')
    atomic_write_bytes(path, pattern.sub(lambda _: f'{BEGIN}\n{text}{END}', content).encode('utf-8'))


def write_docs(study_dir: str, targets: Sequence[str], image_dir: str) -> str:
    """Fill the marked study sections of ``targets`` (README.md, docs/compare.md) from a finished study: copies the
    figures to ``image_dir`` and writes the tables and claim lines; returns the text (for the README's folder)."""
    with open(os.path.join(study_dir, 'study.json')) as f:
        names = json.load(f)['settings']
    results = []
    for name in names:
        path = os.path.join(study_dir, name, 'results.json')
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path!r} is missing: the study has not finished {name!r}; run it again (it '
                                    f'continues where it stopped)')
        with open(path) as f:
            results.append(json.load(f))
    images: Dict[str, List[str]] = {}
    os.makedirs(image_dir, exist_ok=True)
    for name in names:
        for fig in ('results.png', 'curves.png'):
            src = os.path.join(study_dir, name, fig)
            if os.path.isfile(src):
                images.setdefault(name, []).append(os.path.join(image_dir, f'{name}--{fig}'))
                shutil.copyfile(src, images[name][-1])
    for target in targets:
        update_marked_section(target, study_markdown(results, images, os.path.dirname(os.path.abspath(target))))
    return study_markdown(results, images, '.')
