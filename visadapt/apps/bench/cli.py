"""The ``visadapt-bench`` command line: arguments, their validation, the run over the models and the outputs.

Usage::

    visadapt-bench --quick --out out/bench_quick
    visadapt-bench --models convnext_atto,convnext_tiny,efficientnet_lite0,vit_small,unet_down \\
        --batch-size 8 --image-size 128 --rank 8 --steps 10 --out out/bench
    visadapt-bench --models convnext_atto@8x96 --methods base,limit,peft,FLoRA --compile --out out/bench_compile
    visadapt-bench --quick --profile FLoRA,limit --refit --out out/bench_profile
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

import visadapt
from visadapt.core import atomic_write_bytes

from .compiled import BACKENDS
from .configurations import BASELINE_NAMES, BASELINES, OPTIMIZERS, check_optimizer, selected
from .measure import CLOCKS
from .refit import earlier_rows, refit
from .report import load_average, markdown, meta, plot
from .runner import bench_model
from .workloads import AMP, DTYPES, MODELS

__all__ = ['parse_args', 'run', 'main', 'DESCRIPTION']

DESCRIPTION = ('Benchmark every registered visadapt method against the frozen base, the weight-gradient limit, PEFT '
               'and LyCORIS: training step (eager and compiled), peak memory, merged inference, per-layer path choice '
               'and a per-step profile (docs/bench.md).')
QUICK = {'models': 'convnext_atto', 'batch_size': 2, 'image_size': 32, 'steps': 3, 'warmup': 1, 'layer_steps': 3,
         'layer_time': 0.0, 'path_layers': 4}
PEFT_LAYERS = ' (PEFT layers)'


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--models', default='convnext_atto,convnext_tiny,efficientnet_lite0,vit_small,unet_down@2x64',
                   help=f'comma-separated NAME or NAME@BATCHxSIZE (overrides --batch-size/--image-size for that '
                        f'model), NAME from {sorted(MODELS)}')
    p.add_argument('--methods', default='all',
                   help=f'the configurations to run: comma-separated visadapt methods and baselines {list(BASELINES)}, '
                        f'or all (base is always run: every ratio is to it)')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--image-size', type=int, default=128, help='input side (UNets get size/8 latents)')
    p.add_argument('--rank', type=int, default=8, help='rank of PEFT LoRA, LyCORIS and the visadapt LoRA budget')
    p.add_argument('--budget', type=int, default=None, help='trainable-parameter budget (default: visadapt LoRA r)')
    p.add_argument('--max-rank', type=int, default=128, help='largest rank the budget matcher may choose')
    p.add_argument('--on-peft-layers', default='FLoRA',
                   help='methods also run on exactly the layers PEFT LoRA accepts, at its trainable count '
                        '(when PEFT refuses some, e.g. depthwise convs); empty to skip')
    p.add_argument('--device', default='cpu')
    p.add_argument('--dtype', default='float32', choices=sorted(DTYPES), help='dtype of the models and inputs')
    p.add_argument('--amp', default='none', choices=sorted(AMP), help='autocast every forward to this dtype')
    p.add_argument('--grad-checkpointing', nargs='?', const='all', default=None, metavar='MODELS',
                   help="gradient checkpointing in these models (comma-separated --models names; 'all' when given "
                        "without a value)")
    p.add_argument('--optimizer', default='fused', choices=sorted(OPTIMIZERS),
                   help='AdamW implementation for every configuration that steps one: fused (default), foreach or '
                        'loop (per tensor)')
    p.add_argument('--seed', type=int, default=0)


def _add_timing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--steps', type=int, default=10, help='timed steps per configuration (median)')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch default)')
    p.add_argument('--clock', default='wall', choices=sorted(CLOCKS),
                   help="'wall' (default) or 'cpu': process CPU time, robust to other processes on a shared machine "
                        "when used with --threads 1 (with more threads it also counts their spin-waits)")
    p.add_argument('--layer-steps', type=int, default=10, help='minimum timed steps per layer in the path choice')
    p.add_argument('--layer-time', type=float, default=0.5, help='seconds aimed at per layer and path')
    p.add_argument('--path-methods', default='FLoRA,SVFT',
                   help='methods whose per-layer forward-path choice is timed (those with both paths), or all')
    p.add_argument('--path-layers', type=int, default=None, help='time at most this many distinct layers per model')
    p.add_argument('--no-path-choice', action='store_true', help='skip the per-layer forward-path benchmark')
    p.add_argument('--refit', action='store_true',
                   help="fit the device type's path-cost constants to this run's per-layer path timings and print them")
    p.add_argument('--refit-from', default='', metavar='JSONS',
                   help='with --refit: also fit to the path timings in these earlier bench.json files (comma-separated, '
                        'same device type)')
    p.add_argument('--compile', action='store_true',
                   help='also compile every configuration with torch.compile and time it (compile time separately)')
    p.add_argument('--compile-backend', default='inductor', choices=BACKENDS,
                   help='torch.compile backend (aot_eager/eager: fast checks of the plumbing, not timings)')
    p.add_argument('--profile', nargs='?', const='FLoRA,limit', default=None, metavar='CONFIGS',
                   help='per-step profile of these configurations (--methods keys or table labels; default when given '
                        'without a value: FLoRA,limit)')
    p.add_argument('--profile-steps', type=int, default=3, help='profiled training steps per configuration')
    p.add_argument('--out', default='out/bench')
    p.add_argument('--quick', action='store_true',
                   help='smoke test: convnext_atto, batch 2, 32², 3 steps, 1 warm-up, 4 layers in the path choice '
                        '(flags given explicitly win)')


def _apply_quick(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """``--quick`` sizes, except for flags given explicitly."""
    for name, value in QUICK.items():
        flag = '--' + name.replace('_', '-')
        if not any(a == flag or a.startswith(flag + '=') for a in argv):
            setattr(args, name, value)


def _model_list(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.model_list = []
    for item in (m.strip() for m in args.models.split(',') if m.strip()):
        hit = re.fullmatch(r'([a-z0-9_]+)(?:@(\d+)x(\d+))?', item)
        if not hit or hit.group(1) not in MODELS:
            p.error(f'--models entry {item!r} is not valid; use NAME or NAME@BATCHxSIZE with NAME in {sorted(MODELS)}')
        batch = int(hit.group(2)) if hit.group(2) else args.batch_size
        size = int(hit.group(3)) if hit.group(3) else args.image_size
        if batch < 1 or size < 32 or size % 32:
            p.error(f'--models entry {item!r}: batch must be ≥ 1 and size a positive multiple of 32 '
                    f'(ConvNeXt/ViT/UNet strides), got batch {batch}, size {size}')
        args.model_list.append((hit.group(1), batch, size))
    if not args.model_list:
        p.error('--models is empty')
    names = [n.strip() for n in (args.grad_checkpointing or '').split(',') if n.strip()]
    bad = [n for n in names if n != 'all' and n not in {m for m, _, _ in args.model_list}]
    if bad:
        p.error(f'--grad-checkpointing {bad}: not in --models {[m for m, _, _ in args.model_list]} (or use all)')
    args.checkpointed = [m for m, _, _ in args.model_list if 'all' in names or m in names]


def _check_numbers(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ('batch_size', 'rank', 'steps', 'max_rank', 'layer_steps', 'profile_steps'):
        if getattr(args, name) < 1:
            p.error(f'--{name.replace("_", "-")} must be ≥ 1, got {getattr(args, name)}')
    if args.path_layers is not None and args.path_layers < 1:
        p.error(f'--path-layers must be ≥ 1, got {args.path_layers}')
    if args.warmup < 0:
        p.error(f'--warmup must be ≥ 0, got {args.warmup}')
    if args.image_size < 32 or args.image_size % 32:
        p.error(f'--image-size must be a positive multiple of 32 (ConvNeXt/ViT/UNet strides), got {args.image_size}')
    if args.budget is not None and args.budget < 1:
        p.error(f'--budget must be ≥ 1, got {args.budget}')


def _check_device(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f'--device {args.device!r} is not a valid torch device')
    if args.clock == 'cpu' and device.type != 'cpu':
        p.error(f'--clock cpu measures host CPU time; use --clock wall with --device {args.device}')
    if device.type == 'cuda' and not torch.cuda.is_available():
        p.error(f'--device {args.device} requested but CUDA is not available')
    try:
        check_optimizer(args.optimizer, args.device)
    except ValueError as err:
        p.error(str(err))


def _check_names(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        baselines, methods = selected(args)
    except ValueError as err:
        p.error(str(err))
    known = sorted(c.method for c in visadapt.METHODS.values())
    for flag, value, extra in (('--on-peft-layers', args.on_peft_layers, ()),
                               ('--path-methods', args.path_methods, ('all',))):
        bad = [m for m in (v.strip() for v in value.split(',')) if m and m.lower() not in visadapt.METHODS
               and m not in extra]
        if bad:
            p.error(f'{flag} {bad} unknown; valid: {list(extra) + known}')
    args.profile_list = [n.strip() for n in (args.profile or '').split(',') if n.strip()]
    bad = [n for n in args.profile_list if not _builds(n, args, baselines, methods)]
    if bad:
        p.error(f'--profile {bad}: not among the configurations this run builds: baselines {baselines} (or their '
                f'labels), methods {[visadapt.METHODS[m].method for m in methods]}, "<method>{PEFT_LAYERS}" for the '
                f'--on-peft-layers methods {args.on_peft_layers!r} when PEFT runs; choose them with --methods')


def _builds(name: str, args: argparse.Namespace, baselines: List[str], methods: List[str]) -> bool:
    """Whether the run builds the configuration ``name`` (a --methods key or a table label, any case)."""
    low = name.lower()
    if low.endswith(PEFT_LAYERS.lower()):
        on_peft = [m.strip().lower() for m in args.on_peft_layers.split(',') if m.strip()]
        return 'peft' in baselines and low[:-len(PEFT_LAYERS)] in on_peft
    labels = {label.lower(): key for key, label in BASELINE_NAMES.items()}
    return low in baselines or labels.get(low) in baselines or low in methods


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='visadapt-bench', description=DESCRIPTION, epilog=__doc__.split('\n\n', 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_workload_args(p)
    _add_timing_args(p)
    args = p.parse_args(argv)
    if args.quick:
        _apply_quick(args, argv)
    _model_list(p, args)
    _check_numbers(p, args)
    _check_device(p, args)
    _check_names(p, args)
    _check_refit(p, args)
    return args


def _check_refit(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    files = [f.strip() for f in args.refit_from.split(',') if f.strip()]
    if files and not args.refit:
        p.error('--refit-from adds earlier path timings to the refit: add --refit')
    if args.refit and args.no_path_choice and not files:
        p.error('--refit fits the path-cost constants to the per-layer path timings; drop --no-path-choice or give '
                '--refit-from')
    try:
        args.earlier_rows = earlier_rows(files, torch.device(args.device).type)
    except ValueError as err:
        p.error(str(err))


def _write(result: Dict[str, Any], out: str) -> str:
    result['meta']['load_average']['end'] = load_average()
    atomic_write_bytes(os.path.join(out, 'bench.json'), json.dumps(result, indent=1).encode())
    text = markdown(result)
    atomic_write_bytes(os.path.join(out, 'bench.md'), text.encode())
    plot(result, os.path.join(out, 'bench.png'))
    return text


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the benchmark and write ``bench.json``, ``bench.md`` and ``bench.png`` to ``--out``; returns the JSON
    content (programmatic use; ``main`` is the console script)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f'[{time.perf_counter() - start:7.1f}s] {msg}', flush=True)

    result: Dict[str, Any] = {'meta': meta(args, argv), 'models': []}
    for key, batch, size in args.model_list:
        model_args = argparse.Namespace(**{**vars(args), 'batch_size': batch, 'image_size': size})
        result['models'].append(bench_model(key, model_args, log))
        gc.collect()
        # written after every model, so an interrupted run keeps what it measured
        result['meta']['wall_s'] = time.perf_counter() - start
        text = _write(result, args.out)
    if args.refit:
        rows = [r for m in result['models'] for r in m['path_choice']] + args.earlier_rows
        fit = result['refit'] = {**refit(rows, torch.device(args.device).type), 'from_files': args.refit_from}
        log(f"path-cost refit ({fit['device_type']}, {fit['layers']} layers): " + (
            f"{fit['refit_repr']}; chosen path within 10% on {fit['refit_ok']} layers (current constants: "
            f"{fit['current_ok']})" if 'refit_repr' in fit else fit['error']))
        result['meta']['wall_s'] = time.perf_counter() - start
        text = _write(result, args.out)
    print(text)
    log(f'wrote {args.out}/bench.json, bench.md, bench.png')
    return result


def failed_checks(result: Dict[str, Any]) -> List[str]:
    """The correctness checks the run recorded as failed: merged ≠ unmerged, compiled ≠ eager, a failed compile."""
    bad = []
    for model in result['models']:
        for row in model['configs']:
            for key, what in (('merged_equals_unmerged', 'merged ≠ unmerged'),
                              ('compiled_equals_eager', 'compiled ≠ eager')):
                if row.get(key) is False:
                    bad.append(f"{model['model']} / {row['name']}: {what}")
            if row.get('compile_error'):
                bad.append(f"{model['model']} / {row['name']}: compile failed ({row['compile_error']})")
    return bad


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console script: run, then exit 1 if a correctness check failed (listed on stderr), else 0."""
    bad = failed_checks(run(argv))
    for line in bad:
        print(f'visadapt-bench: check failed: {line}', file=sys.stderr)
    return 1 if bad else 0
