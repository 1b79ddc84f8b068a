"""The bench's outputs: run facts (``meta``), the markdown tables (``bench.md``) and the plot (``bench.png``)."""
from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
from typing import Any, Dict, List, Optional, Sequence

import torch

from visadapt.core import atomic_write_bytes

from .breakdown import CATEGORIES
from .configurations import BASELINE_NAMES
from .paths import PATH_TOLERANCE

__all__ = ['meta', 'markdown', 'plot', 'load_average', 'TARGET_METHODS']

TARGET_METHODS = ('FLoRA', 'SeRA', 'SVFT')


def _device_name(device: str) -> str:
    if device.startswith('cuda'):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            name = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), name)
    except OSError:
        pass
    return f'{name}, {os.cpu_count()} CPUs'


def meta(args: argparse.Namespace, argv: Sequence[str]) -> Dict[str, Any]:
    """What the run was: command, device, versions and every setting that changes the numbers."""
    import importlib.metadata as md
    versions = {}
    for pkg in ('torch', 'timm', 'diffusers', 'peft', 'lycoris-lora'):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {'command': 'visadapt-bench ' + ' '.join(argv), 'device': args.device,
            'device_name': _device_name(args.device), 'threads': torch.get_num_threads(), 'dtype': args.dtype,
            'amp': args.amp, 'optimizer': args.optimizer, 'grad_checkpointing': args.checkpointed,
            'compile': args.compile_backend if args.compile else None, 'versions': versions,
            'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
            'steps': args.steps, 'warmup': args.warmup, 'clock': args.clock, 'batch_size': args.batch_size,
            'image_size': args.image_size, 'rank': args.rank, 'quick': args.quick,
            'profile': args.profile_list, 'profile_steps': args.profile_steps if args.profile_list else None,
            'memory_method': ('torch.cuda.max_memory_allocated' if args.device.startswith('cuda')
                              else 'torch.profiler allocation events'), 'load_average': {'start': load_average()}}


def load_average() -> Optional[float]:
    """The host's 1-minute load average (how busy a shared machine was), None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _load_verdict(meta: Dict[str, Any]) -> str:
    """Whether the host's load average says other processes shared the cores during the run."""
    loads = [v for v in (meta['load_average']['start'], meta['load_average'].get('end')) if v is not None]
    if not loads:
        return 'not known'
    busy = max(loads) > (os.cpu_count() or 1) + 0.5
    return 'above the CPU count, other processes shared the cores' if busy else 'no more than the run itself puts on the cores'


def _fmt(value: Optional[float], spec: str, suffix: str = '') -> str:
    return '–' if value is None else format(value, spec) + suffix


def _yes(value: Optional[bool], detail: Optional[float] = None) -> str:
    if value is None:
        return '–'
    return 'yes' if value else '**NO**' + (f' ({detail:.2e})' if detail is not None else '')


def _target_lines(model: Dict[str, Any]) -> List[str]:
    """Issue 8's targets for FLoRA, SeRA and SVFT on this model, each marked met (yes) or missed (no)."""
    rows = {r['name']: r for r in model['configs']}
    limit = rows.get(BASELINE_NAMES['limit'])
    picked = [r for r in model['configs'] if r['kind'] == 'visadapt' and r.get('method') in TARGET_METHODS]
    if not picked:
        return []

    def mark(value: Optional[float], ok: bool) -> str:
        return '–' if value is None else f"{value:.2f}× {'yes' if ok else '**no**'}"

    lines = ['', f"Targets (issue 8) on {model['model']}:", '',
             '| method | step ≤ 1.00× PEFT | step ≤ 1.10× base | step < weight-grad limit | peak ≤ PEFT '
             '| merged infer 1.00× base (±5%) | merged = unmerged |', '|---|---|---|---|---|---|---|']
    for r in picked:
        vs_limit = r['step_ms'] / limit['step_ms'] if limit else None
        infer = r['infer_vs_base']
        lines.append('| ' + ' | '.join([
            r['name'], mark(r['step_vs_peft'], (r['step_vs_peft'] or 0) <= 1.0),
            mark(r['step_vs_base'], r['step_vs_base'] <= 1.10),
            mark(vs_limit, vs_limit is not None and vs_limit < 1.0),
            mark(r['peak_vs_peft'], (r['peak_vs_peft'] or 0) <= 1.0),
            mark(infer, infer is not None and abs(infer - 1.0) <= 0.05),
            _yes(r.get('merged_equals_unmerged')).replace('**NO**', '**no**')]) + ' |')
    return lines


def _config_table(model: Dict[str, Any], compiled: bool) -> List[str]:
    head = '| configuration | trainable | step ms | × base | × PEFT |'
    rule = '|---|---:|---:|---:|---:|'
    if compiled:
        head += ' compiled ms | compiled × base | compiled ÷ eager | compile s | graph breaks | compiled = eager |'
        rule += '---:|---:|---:|---:|---:|:---:|'
    head += ' peak MB | mem × PEFT | merged infer ms | × base | merged = unmerged | top op (share) |'
    rule += '---:|---:|---:|---:|:---:|---|'
    lines = [head, rule]
    for r in model['configs']:
        top = r['top_ops'][0] if r.get('top_ops') else None
        cells = [r['name'], f"{r['trainable']:,}", _fmt(r['step_ms'], '.1f'), _fmt(r['step_vs_base'], '.2f', '×'),
                 _fmt(r['step_vs_peft'], '.2f', '×')]
        if compiled:
            cells += ([f"failed: {r['compile_error']}", '–', '–', '–', '–', '–'] if r.get('compile_error') else [
                _fmt(r.get('compiled_step_ms'), '.1f'), _fmt(r.get('compiled_vs_base'), '.2f', '×'),
                _fmt(r.get('compiled_vs_eager'), '.2f', '×'), _fmt(r.get('compile_s'), '.1f'), str(r.get('compiled_graph_breaks', '–')),
                _yes(r.get('compiled_equals_eager'), r.get('compiled_max_rel_diff'))])
        cells += [_fmt(r['peak_mb'], '.0f'), _fmt(r['peak_vs_peft'], '.2f', '×'), _fmt(r['infer_ms'], '.1f'),
                  _fmt(r['infer_vs_base'], '.2f', '×'), _yes(r.get('merged_equals_unmerged'), r.get('merge_max_abs_diff')),
                  f"{top['op']} ({100 * top['share']:.0f}%)" if top else '–']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


def _notes(model: Dict[str, Any]) -> List[str]:
    lines = []
    hypers = [(r['name'], r['hyper']) for r in model['configs'] if r['kind'] == 'visadapt']
    if hypers:
        lines += ['', 'Matched hyper-parameters: ' + '; '.join(
            f"{n} " + ', '.join(f'{k}={v}' for k, v in h.items() if k not in ('method', 'adapter_dtype'))
            for n, h in hypers) + '.']
    notes = [(r['name'], n) for r in model['configs'] for n in r.get('notes', [])]
    if notes:
        lines += [''] + [f'- {n}: {text}' for n, text in notes]
    return lines


def _profile_lines(model: Dict[str, Any]) -> List[str]:
    """The ``--profile`` tables: ms (calls) per step by category, then the layers that cost the most."""
    profiles = model.get('profile') or []
    if not profiles:
        return []
    names = [p['config'] for p in profiles]
    lines = ['', f"### {model['model']}: where a training step's time goes (torch.profiler, "
                 f"{profiles[0]['steps']} steps, {profiles[0]['threads']} threads; ms per step (outermost op calls))",
             '', '| category | ' + ' | '.join(names) + ' |', '|---|' + '---:|' * len(names)]
    for cat in CATEGORIES:
        lines.append(f'| {cat} | ' + ' | '.join(
            f"{p['categories'][cat]['ms']:.2f} ({p['categories'][cat]['calls']:.0f})" for p in profiles) + ' |')
    for label, key, calls in (('Σ op self time', 'op_ms', True), ('Python/dispatch overhead (wall − Σ ops)',
                                                                   'overhead_ms', False),
                              ('step wall, profiled', 'step_ms_profiled', False),
                              ('step, unprofiled median', 'step_ms_unprofiled', False)):
        lines.append(f'| {label} | ' + ' | '.join(
            _fmt(p[key], '.2f') + (f" ({p['calls']:.0f})" if calls else '') for p in profiles) + ' |')
    lines.append('| optimizer step range (ops + Python) | ' + ' | '.join(
        _fmt(p['optimizer_ranges_ms'].get('Optimizer.step'), '.2f') for p in profiles) + ' |')
    lines += _layer_lines(profiles)
    return lines


def _layer_lines(profiles: List[Dict[str, Any]], top: int = 10) -> List[str]:
    by_layer = [{r['layer']: r for r in p['layers']} for p in profiles]
    first = sorted(profiles[0]['layers'], key=lambda r: -(r['forward_ms'] + r['forward_python_ms'] + r['backward_ms']))
    if not first:
        return []
    lines = ['', f'Per adapted layer (the {min(top, len(first))} costliest in {profiles[0]["config"]}; ms per step: '
                 'forward ops / forward Python / backward ops (calls)):', '',
             '| layer | ' + ' | '.join(p['config'] for p in profiles) + ' |', '|---|' + '---:|' * len(profiles)]
    for row in first[:top]:
        cells = []
        for layers in by_layer:
            r = layers.get(row['layer'])
            cells.append('–' if r is None else f"{r['forward_ms']:.2f} / {r['forward_python_ms']:.2f} / "
                                               f"{r['backward_ms']:.2f} ({r['calls']:.0f})")
        lines.append(f"| {row['layer']} | " + ' | '.join(cells) + ' |')
    return lines


def _path_lines(model: Dict[str, Any]) -> List[str]:
    if not model['path_choice']:
        return []
    ok = sum(p['ok'] for p in model['path_choice'])
    lines = ['', f"### {model['model']}: forward-path choice per layer (one training step of the layer)", '',
             f"`auto` picked a path within {100 * (PATH_TOLERANCE - 1):.0f}% of the faster forced path on "
             f"{ok} of {len(model['path_choice'])} layers (ok: the chosen path's time ≤ "
             f"{PATH_TOLERANCE:.2f}× the faster one).", '',
             '| method | layer (×n) | weight | groups | input | weight ms | bypass ms | auto → '
             '| chosen / best | ok |', '|---|---|---|---:|---|---:|---:|---|---:|:---:|']
    for p in model['path_choice']:
        lines.append('| ' + ' | '.join([
            p['method'], f"{p['layer']} (×{p['n_layers']})", 'x'.join(map(str, p['weight_shape'])),
            str(p['groups']), 'x'.join(map(str, p['input_shape'])), f"{p['weight_ms']:.2f}",
            f"{p['bypass_ms']:.2f}", p['auto_path'], f"{p['chosen_vs_best']:.2f}",
            'yes' if p['ok'] else '**no**']) + ' |')
    return lines


def _refit_lines(refit: Optional[Dict[str, Any]]) -> List[str]:
    if not refit:
        return []
    lines = ['## Path-cost refit', '',
             f"Device type `{refit['device_type']}`, {refit['layers']} layer timings of this run"
             + (f" and of {refit['from_files']}" if refit.get('from_files') else '') + ". Current constants: "
             f"chosen path within {100 * (PATH_TOLERANCE - 1):.0f}% on {refit['current_ok']} of {refit['layers']} "
             f"(the cost terms reproduce auto's choice on {refit['current_terms_agree']})."]
    if 'error' in refit:
        return lines + ['', f"No refit: {refit['error']}.", '']
    return lines + [
        f"Refit constants (non-negative least squares on relative time errors, in-sample): within 10% on "
        f"{refit['refit_ok']} of {refit['layers']}, {refit['refit_changes']} choices changed; median time error "
        f"{100 * refit['median_rel_error']:.0f}% (current constants at their best scale: "
        f"{100 * refit['current_median_rel_error']:.0f}%); {refit['seconds_per_mac'] * 1e12:.3g} ps per MAC.", '',
        '```python', refit['refit_repr'], '```', '']


def markdown(result: Dict[str, Any]) -> str:
    m = result['meta']
    extras = ', '.join(x for x in (f"autocast {m['amp']}" if m['amp'] != 'none' else '',
                                   'gradient checkpointing in ' + ', '.join(m['grad_checkpointing'])
                                   if m['grad_checkpointing'] else '',
                                   f"compiled with torch.compile({m['compile']})" if m['compile'] else '') if x)
    lines = ["# visadapt benchmark", '', f"`{m['command']}`", '',
             f"Device: {m['device_name']} ({m['device']}, {m['threads']} threads), dtype {m['dtype']}"
             f"{', ' + extras if extras else ''}, torch {m['versions']['torch']}, {m['clock']} clock, {m['date']}. "
             f"Step = forward + backward + AdamW step ({m['optimizer']}), median of {m['steps']} steps after "
             f"{m['warmup']} warm-up, all configurations of a model interleaved. Peak = memory held before the step "
             f"+ the step's allocation high-water mark ({m['memory_method']}). Host load average (1 min) "
             f"{_fmt(m['load_average']['start'], '.1f')} at the start, {_fmt(m['load_average'].get('end'), '.1f')} at "
             f"the last write ({os.cpu_count()} CPUs; the run's own threads count in it): {_load_verdict(m)}.", '']
    for model in result['models']:
        lines += [f"## {model['model']}", '',
                  f"Inputs {model['inputs']}; {model['targets']} adapted layers; budget {model['budget']:,} trainable "
                  f"({model['budget_from']})." + (f" Compiled: {model['compile']['backend']}, "
                                                   f"{model['compile']['wall_s']:.0f} s for all configurations, "
                                                   f"compiled = eager within {model['compile']['tolerance']:g} "
                                                   f"(relative)." if model.get('compile') else ''), '']
        lines += _config_table(model, bool(model.get('compile')))
        lines += _notes(model) + _target_lines(model) + _profile_lines(model) + _path_lines(model) + ['']
    lines += _refit_lines(result.get('refit'))
    return '\n'.join(lines) + '\n'


def plot(result: Dict[str, Any], path: str) -> None:
    """Step time and peak memory of every configuration relative to the frozen base, one row per model."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    models = result['models']
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 0.3 * max(len(m['configs']) for m in models) * len(models)
                                                     + 1.2 * len(models)), squeeze=False)
    colors = {'base': '#444444', 'limit': '#999999', 'peft': '#d62728', 'lycoris': '#ff7f0e', 'visadapt': '#1f77b4'}
    for row, model in zip(axes, models):
        names = [r['name'] for r in model['configs']][::-1]
        kinds = [r['kind'] for r in model['configs']][::-1]
        for ax, key, title in ((row[0], 'step_vs_base', 'training step × frozen base'),
                               (row[1], 'peak_vs_base', 'peak memory × frozen base')):
            values = [r[key] for r in model['configs']][::-1]
            ax.barh(names, values, color=[colors[k] for k in kinds])
            ax.axvline(1.0, color='black', lw=0.8)
            ax.set_title(f"{model['model']}: {title}", fontsize=9)
            ax.tick_params(labelsize=7)
            for y, v in enumerate(values):
                ax.text(v, y, f' {v:.2f}', va='center', fontsize=6)
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format='png', dpi=110)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, png.getvalue())
