#!/usr/bin/env python
"""Compare PEFT methods on one timm model at an equal trainable budget: same data, same schedule, several seeds.

Runs head-only training, full fine-tuning, LoRA (conv-chain and reshape forms), FLoRA, and every other registered
method that applies to the model (its family preset selects layers it can adapt). Methods with a rank get the rank
whose adapter size is closest to ``--budget`` (:func:`visadapt.core.budget.match_budget`); methods without one (BitFit,
(IA)³, SSL, SSB, SVFT's plain pattern, ...) run at their own fixed size, which the table shows. The classifier head
trains fully in every run (head-only trains nothing else).

Each run is one :func:`visadapt.apps.train_classifier.run` (timm's training machinery with the trainer's ``short``
recipe: AdamW, cosine per update, flip + mild crop) in a forked child process (imports and the data set are loaded
once, the memory high-water mark is per run); finished runs (``RUN_DIR/metrics.json``) are reused, so an interrupted
comparison continues where it stopped. Outputs in ``--output-dir``: ``results.md`` (the table), ``results.json``
and ``results.png`` (accuracy vs trainable parameters).

Example (the table in docs/timm.md)::

    visadapt-compare --model efficientnet_lite0 --pretrained packaged --data fashion-mnist \\
        --image-size 32 --train-size 1000 --eval-size 1000 --epochs 2 --seeds 0 1 2 --output-dir runs/compare
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

import visadapt
from visadapt.apps import train_classifier as classify
from visadapt.core import atomic_write_bytes
from visadapt.core.budget import BudgetCounter, budget_field, match_budget
from visadapt.integrations import timm_models as vtimm

__all__ = ['main', 'build_parser']

#: always compared first, in this order: (label, method, config fields)
BASELINES: List[Tuple[str, str, Dict[str, Any]]] = [
    ('head-only', 'HeadOnly', {}),
    ('full fine-tuning', 'FullFinetune', {}),
    ('LoRA (conv chain)', 'LoRA', {'conv_form': 'chain'}),
    ('LoRA (reshape)', 'LoRA', {'conv_form': 'reshape'}),
    ('FLoRA', 'FLoRA', {'r3': 2}),
]


def variants(selected: Optional[List[str]]) -> List[Tuple[str, str, Dict[str, Any]]]:
    """The baselines, then every other registered method with its default config (or only ``selected`` labels)."""
    done = {m.lower() for _, m, _ in BASELINES}
    out = list(BASELINES) + [(cls.method, cls.method, {}) for key, cls in sorted(visadapt.METHODS.items())
                             if key not in done]
    if selected:
        wanted = {s.lower() for s in selected}
        unknown = wanted - {label.lower() for label, _, _ in out} - {m.lower() for _, m, _ in out}
        if unknown:
            raise SystemExit(f'--methods: unknown {sorted(unknown)}; valid: {[label for label, _, _ in out]}')
        out = [v for v in out if v[0].lower() in wanted or v[1].lower() in wanted]
    return out


def plan(args: argparse.Namespace, model: torch.nn.Module) -> Tuple[int, List[Dict[str, Any]]]:
    """Budget and, per variant, the config fields (matched rank) it runs with, or why it does not apply."""
    counter = BudgetCounter(model)
    budget = args.budget
    if budget is None:  # default: the size of LoRA (conv chain) at rank --ref-rank on this model
        ref = vtimm.make_config(model, {'method': 'LoRA', 'r': args.ref_rank})
        budget = counter(ref)
    rows = []
    for label, method, fields in variants(args.methods):
        row: Dict[str, Any] = {'label': label, 'method': method, 'fields': dict(fields)}
        try:
            config = vtimm.make_config(model, {'method': method, **fields} if fields else method)
            knob = budget_field(config)
            if knob is not None:
                match = match_budget(model, config, budget, counter=counter)
                row['fields'][knob] = match.value
                row['adapter_params'] = match.achieved
            elif getattr(config, 'adapts_layers', True):
                row['adapter_params'] = counter(config)
            else:
                row['adapter_params'] = 0
        except (ValueError, TypeError) as err:
            row['skip'] = str(err)
        rows.append(row)
    return budget, rows


def _weights_flags(pretrained: str) -> List[str]:
    """This tool's ``--pretrained`` value as the trainer's (timm's) flags."""
    if pretrained.lower() in ('none', 'false', ''):
        return []
    if pretrained.lower() == 'true':
        return ['--pretrained']
    return ['--pretrained', 'packaged'] if pretrained == 'packaged' else ['--pretrained-path', pretrained]


def run_args(args: argparse.Namespace, row: Dict[str, Any], seed: int, out: str) -> argparse.Namespace:
    """The trainer's arguments for one run: the ``short`` recipe, this comparison's data and sizes, one method."""
    lr = args.full_lr if row['method'] == 'FullFinetune' else args.lr
    data = ['--dataset', args.data] if args.data in classify.OWN_DATASETS else ['--data-dir', args.data]
    argv = ['--preset', 'short', '--model', args.model, *_weights_flags(args.pretrained), *data,
            '--img-size', str(args.image_size), '--batch-size', str(args.batch_size), '--lr', str(lr),
            '--epochs', str(args.epochs), '--adapter', json.dumps({'method': row['method'], **row['fields']}),
            '--seed', str(seed), '--data-seed', str(args.data_seed), '--workers', '0', '--threads', str(args.threads),
            '--output', os.path.dirname(out), '--experiment', os.path.basename(out)]
    for flag, value in (('--train-size', args.train_size), ('--eval-size', args.eval_size)):
        if value:
            argv += [flag, str(value)]
    if args.model_kwargs:
        argv += ['--model-kwargs', *(f'{k}={v!r}' for k, v in json.loads(args.model_kwargs).items())]
    return classify.parse_args(argv)


def plan_row() -> Dict[str, Any]:
    """A row for building run arguments before the plan exists (data loading only)."""
    label, method, fields = BASELINES[0]
    return {'label': label, 'method': method, 'fields': dict(fields)}


def _child(run_ns: argparse.Namespace) -> None:
    sys.exit(classify.main_with_args(run_ns))


def summarize(rows: List[Dict[str, Any]], args: argparse.Namespace) -> List[Dict[str, Any]]:
    table = []
    for row in rows:
        if 'skip' in row:
            continue
        runs = []
        for seed in args.seeds:
            path = os.path.join(args.output_dir, 'runs', _slug(row['label']), f'seed{seed}', 'metrics.json')
            if os.path.isfile(path):
                with open(path) as f:
                    runs.append(json.load(f))
        if not runs:
            continue
        acc = np.array([100 * r['accuracy_after'] for r in runs])
        table.append({
            'label': row['label'], 'method': row['method'], 'fields': row['fields'], 'seeds': len(runs),
            'acc_mean': float(acc.mean()), 'acc_std': float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            'acc_runs': acc.tolist(), 'acc_before': float(np.mean([100 * r['accuracy_before'] for r in runs])),
            'adapter_params': runs[0]['adapter_params'], 'trainable_params': runs[0]['trainable_params'],
            'step_time_s': float(np.mean([r['step_time_s'] for r in runs])),
            'train_memory_mb': float(np.mean([r['train_memory_mb'] or 0.0 for r in runs]))
            if runs[0].get('train_memory_mb') is not None else None,
            'peak_memory_mb': float(np.mean([r['peak_memory_mb'] for r in runs])),
            'peak_memory_kind': runs[0]['peak_memory_kind'],
        })
    return table


def _slug(label: str) -> str:
    return ''.join(c if c.isalnum() else '-' for c in label.lower()).strip('-').replace('--', '-')


def _fields_text(fields: Dict[str, Any]) -> str:
    return ', '.join(f'{k}={v}' for k, v in fields.items()) or 'defaults'


def write_markdown(path: str, table: List[Dict[str, Any]], rows: List[Dict[str, Any]], budget: int,
                   args: argparse.Namespace, command: str, elapsed: float) -> None:
    cpu = table and table[0]['peak_memory_kind'] == 'process_peak_rss'
    mem_head = 'train memory (MB)' if cpu else 'peak CUDA memory (MB)'
    lines = [f'Budget: {budget:,} adapter parameters (plus the {args.model} classifier, trained fully in every run). '
             f'{len(args.seeds)} seeds; accuracy is the final test accuracy, mean ± sample std.', '',
             f'| method | config | adapter params | trainable params | accuracy (%) | step time (s) | {mem_head} |',
             '|---|---|---:|---:|---:|---:|---:|']
    for t in table:
        mem = t['train_memory_mb'] if cpu else t['peak_memory_mb']
        lines.append(f"| {t['label']} | {_fields_text(t['fields'])} | {t['adapter_params']:,} | "
                     f"{t['trainable_params']:,} | {t['acc_mean']:.2f} ± {t['acc_std']:.2f} | "
                     f"{t['step_time_s']:.3f} | {mem:.0f} |")
    skipped = [r for r in rows if 'skip' in r]
    if skipped:
        lines += ['', 'Not applicable to this model: ' + '; '.join(f"{r['label']} ({r['skip']})" for r in skipped)]
    if cpu:
        lines += ['', 'Train memory: growth of the process resident set size during training (the high-water mark '
                      'minus the size before the first step), per run in its own process.']
    lines += ['', f'Command ({elapsed / 60:.1f} min wall time):', '', '```', command, '```', '']
    atomic_write_bytes(path, '\n'.join(lines).encode())


def write_plot(path: str, table: List[Dict[str, Any]], title: str) -> None:
    import io

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, t in enumerate(table):
        ax.errorbar(t['trainable_params'], t['acc_mean'], yerr=t['acc_std'], fmt='o', capsize=3, color=f'C{i % 10}',
                    label=t['label'])
    ax.set_xscale('log')
    ax.set_xlabel('trainable parameters (adapter + classifier, log scale)')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', default='efficientnet_lite0')
    p.add_argument('--pretrained', default='packaged')
    p.add_argument('--model-kwargs', default='')
    p.add_argument('--data', default='fashion-mnist')
    p.add_argument('--image-size', type=int, default=32)
    p.add_argument('--train-size', type=int, default=1000)
    p.add_argument('--eval-size', type=int, default=1000)
    p.add_argument('--data-seed', type=int, default=0)
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=2e-3, help='learning rate of every method but full fine-tuning')
    p.add_argument('--full-lr', type=float, default=5e-4, help='learning rate of full fine-tuning')
    p.add_argument('--budget', type=int, help='adapter parameters (default: LoRA at --ref-rank on this model)')
    p.add_argument('--ref-rank', type=int, default=4)
    p.add_argument('--methods', nargs='+', help='labels or method names to run (default: all that apply)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--jobs', type=int, default=1, help='runs in parallel (each in its own process)')
    p.add_argument('--threads', type=int, default=1, help='torch threads per run')
    p.add_argument('--output-dir', default='runs/compare')
    p.add_argument('--plan-only', action='store_true', help='print the matched configs and exit')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.seeds) < 1:
        raise SystemExit('--seeds needs at least one seed')
    command = 'visadapt-compare ' + ' '.join(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    torch.set_num_threads(args.threads)
    # read once here: the forked runs inherit the data (Fashion-MNIST's arrays are cached in this process)
    _, _, classes, data_name = classify.create_datasets(run_args(args, plan_row(), args.seeds[0], args.output_dir))
    probe = vtimm.create_model(args.model, pretrained=False, num_classes=len(classes),
                               **(json.loads(args.model_kwargs) if args.model_kwargs else {}))
    budget, rows = plan(args, probe)
    del probe
    print(f'budget: {budget:,} adapter parameters', flush=True)
    for row in rows:
        print(f"  {row['label']:<20} " + (f"skipped: {row['skip']}" if 'skip' in row else
                                          f"{_fields_text(row['fields'])}: {row['adapter_params']:,} adapter params"))
    if args.plan_only:
        return 0

    jobs = []
    for row in rows:
        if 'skip' in row:
            continue
        for seed in args.seeds:
            out = os.path.join(args.output_dir, 'runs', _slug(row['label']), f'seed{seed}')
            if os.path.isfile(os.path.join(out, 'metrics.json')):
                continue
            jobs.append((row, seed, out))
    print(f'{len(jobs)} runs to do ({len(args.seeds)} seeds each), {args.jobs} at a time', flush=True)
    ctx = mp.get_context('fork')
    running: List[Tuple[Any, Dict[str, Any], int, float]] = []
    failed = []
    while jobs or running:
        while jobs and len(running) < args.jobs:
            row, seed, out = jobs.pop(0)
            os.makedirs(out, exist_ok=True)
            proc = ctx.Process(target=_child, args=(run_args(args, row, seed, out),))
            proc.start()
            running.append((proc, row, seed, time.time()))
        time.sleep(0.5)
        for item in list(running):
            proc, row, seed, started = item
            if proc.exitcode is None:
                continue
            running.remove(item)
            status = 'ok' if proc.exitcode == 0 else f'FAILED (exit {proc.exitcode})'
            if proc.exitcode != 0:
                failed.append((row['label'], seed))
            print(f"[{time.time() - t0:7.0f}s] {row['label']} seed {seed}: {status} in {time.time() - started:.0f}s",
                  flush=True)

    table = summarize(rows, args)
    os.makedirs(args.output_dir, exist_ok=True)
    elapsed = time.time() - t0
    write_markdown(os.path.join(args.output_dir, 'results.md'), table, rows, budget, args, command, elapsed)
    atomic_write_bytes(os.path.join(args.output_dir, 'results.json'),
                       json.dumps({'budget': budget, 'rows': rows, 'table': table, 'args': vars(args)},
                                  indent=2).encode())
    write_plot(os.path.join(args.output_dir, 'results.png'), table,
               f'{args.model} ({args.pretrained}) on {data_name}, {args.train_size} train images, '
               f'{args.image_size}px, budget {budget:,}')
    with open(os.path.join(args.output_dir, 'results.md')) as f:
        print(f.read())
    if failed:
        print(f'failed runs: {failed} (see their output above)', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
