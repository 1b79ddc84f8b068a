"""The ``visadapt-compare`` command: ``conv``, ``attention``, ``study`` and ``docs`` sub-commands."""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

from visadapt.core import atomic_write_bytes

from .engine import Protocol, Setting, run_setting

__all__ = ['main', 'build_parser', 'run_one', 'run_study']


def _add_protocol(p: argparse.ArgumentParser, seeds: Sequence[int] = (1, 2, 3, 4, 5)) -> None:
    g = p.add_argument_group('protocol (per method: rate sweep on the validation split, then seeds)')
    g.add_argument('--points', type=int, default=3, help='learning rates swept per method')
    g.add_argument('--factor', type=float, default=3.0, help='ratio of neighbouring rates')
    g.add_argument('--extend', type=int, default=1, help='rates added past a winning end of the grid (at most)')
    g.add_argument('--sweep-seed', type=int, default=0, help='seed of the sweep runs (not a reported seed)')
    g.add_argument('--seeds', type=int, nargs='+', default=list(seeds), help='seeds of the reported runs')
    g.add_argument('--jobs', type=int, default=2, help='runs at a time (one forked process each)')
    g.add_argument('--threads', type=int, default=1, help='torch threads per run')
    g.add_argument('--output-dir', required=True, help='results folder; finished runs in it are reused')
    g.add_argument('--plan-only', action='store_true', help='print the budget-matched configs and exit')


def _add_conv(p: argparse.ArgumentParser) -> None:
    from .conv import CONV_VARIANTS, ConvSettings
    d = ConvSettings()
    p.add_argument('--model', default=d.model, help='timm model name')
    p.add_argument('--pretrained', default=d.pretrained, choices=('packaged', 'none'),
                   help="'packaged': ImageNet weights shipped in pip packages (offline)")
    p.add_argument('--data', default=d.data, help="'fashion-mnist' or 'digits' (held in memory)")
    p.add_argument('--image-size', type=int, default=d.image_size)
    size = p.add_mutually_exclusive_group()
    size.add_argument('--train-size', type=int, help=f'training images (default {d.train_size})')
    size.add_argument('--shots', type=int, help='training images per class instead of --train-size')
    p.add_argument('--val-size', type=int, default=d.val_size, help='validation images, from the training set')
    p.add_argument('--test-size', type=int, default=d.test_size, help='test images, from the test set')
    p.add_argument('--data-seed', type=int, default=d.data_seed)
    p.add_argument('--batch-size', type=int, default=d.batch_size)
    p.add_argument('--epochs', type=int, default=d.epochs)
    p.add_argument('--ref-rank', type=int, default=d.ref_rank, help='budget: LoRA at this rank on every conv')
    p.add_argument('--budget', type=int, help='adapter parameters (instead of --ref-rank)')
    p.add_argument('--methods', nargs='+', help=f'labels to run (the reference always runs): '
                   f'{[v.label for v in CONV_VARIANTS]}')


def _add_attention(p: argparse.ArgumentParser) -> None:
    from .attention import ATTENTION_VARIANTS, DEFAULT_MODEL_CONFIG, PROJECTION_INITS, RetrievalSettings
    d = RetrievalSettings.__dataclass_fields__
    p.add_argument('--captions', required=True, help='caption file (tools/make_clipart_captions.py writes one)')
    p.add_argument('--captions-per-image', type=int, default=d['captions_per_image'].default,
                   help="each image's first N captions (1: the title alone); 0: all")
    p.add_argument('--model-config', default=DEFAULT_MODEL_CONFIG, help='open_clip model config JSON')
    p.add_argument('--image-size', type=int, help="image tower input size (default: the config's)")
    for name in ('train_images', 'val_images', 'test_images', 'split_seed', 'batch_size', 'epochs', 'warmup',
                 'ref_rank'):
        p.add_argument('--' + name.replace('_', '-'), type=int, default=d[name].default)
    p.add_argument('--margin', type=float, default=d['margin'].default, help='triplet loss margin')
    p.add_argument('--projection', choices=PROJECTION_INITS, default=d['projection'].default,
                   help="the image projection's start: 'fit' (one ridge fit to the frozen text tower, shared by "
                        "every run) or 'random' (its seeded default init)")
    p.add_argument('--budget', type=int, help='adapter parameters (instead of --ref-rank)')
    p.add_argument('--methods', nargs='+', help=f'labels to run (the reference always runs): '
                   f'{[v.label for v in ATTENTION_VARIANTS]}')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='visadapt-compare', formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description='Compare PEFT methods so that they can be told apart: per method a learning-rate sweep on a '
                    'validation split, then several seeds, mean and 95% CI, paired differences from LoRA at an '
                    'equal budget (docs/compare.md).')
    sub = p.add_subparsers(dest='command', required=True)
    conv = sub.add_parser('conv', help='a pretrained timm CNN on an in-memory image set, every conv adapted',
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_conv(conv)
    _add_protocol(conv)
    att = sub.add_parser('attention', help='two-tower image-text retrieval, adapters on the text q/v',
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_attention(att)
    _add_protocol(att)
    study = sub.add_parser('study', help='the whole study (docs/compare.md): every setting at its study size',
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    study.add_argument('--captions', required=True, help='caption file of the attention setting')
    study.add_argument('--output-dir', default='runs/study')
    study.add_argument('--only', nargs='+', help='run only these settings (names as in the study)')
    study.add_argument('--jobs', type=int, default=2)
    study.add_argument('--plan-only', action='store_true')
    docs = sub.add_parser('docs', help="write a finished study's tables and claim lines into the README and docs",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    docs.add_argument('study_dir')
    docs.add_argument('--targets', nargs='+', default=['README.md', 'docs/compare.md'])
    docs.add_argument('--image-dir', default='docs/img/compare')
    return p


def _protocol(args: argparse.Namespace) -> Protocol:
    return Protocol(points=args.points, factor=args.factor, extend=args.extend, sweep_seed=args.sweep_seed,
                    seeds=tuple(args.seeds), jobs=args.jobs, threads=args.threads)


def _conv_setting(args: argparse.Namespace) -> Setting:
    from .conv import ConvSetting, ConvSettings
    return ConvSetting(ConvSettings(
        model=args.model, pretrained=args.pretrained, data=args.data, image_size=args.image_size,
        train_size=None if args.shots else (args.train_size or ConvSettings.train_size), shots=args.shots,
        val_size=args.val_size, test_size=args.test_size, data_seed=args.data_seed, batch_size=args.batch_size,
        epochs=args.epochs, ref_rank=args.ref_rank, budget=args.budget, methods=args.methods))


def _attention_setting(args: argparse.Namespace) -> Setting:
    from .attention import RetrievalSetting, RetrievalSettings
    return RetrievalSetting(RetrievalSettings(
        captions=args.captions, captions_per_image=args.captions_per_image or None, model_config=args.model_config,
        image_size=args.image_size,
        train_images=args.train_images, val_images=args.val_images, test_images=args.test_images,
        split_seed=args.split_seed, batch_size=args.batch_size, epochs=args.epochs, warmup=args.warmup,
        margin=args.margin, projection=args.projection, ref_rank=args.ref_rank, budget=args.budget,
        methods=args.methods))


def _print_plan(result: Dict[str, Any]) -> None:
    print(f"{result['setting']}: budget {result['budget']:,} adapter parameters", flush=True)
    for row in result['rows']:
        spec = ', '.join(f'{k}={v}' for k, v in row['spec'].items() if k != 'method') or 'defaults'
        what = f"skipped: {row['skip']}" if row['skip'] else f"{row['spec']['method']} ({spec}): " \
                                                            f"{row['adapter_params']:,} adapter parameters"
        print(f"  {row['label']:<22} {what}", flush=True)


def run_one(setting: Setting, protocol: Protocol, out_dir: str, plan_only: bool = False) -> Dict[str, Any]:
    """Plan (printed), run or reuse every job, write ``results.{json,md,png}`` (+ ``curves.png``); returns the result
    with ``'markdown'`` and ``'summary'`` added (the plan alone with ``plan_only``)."""
    import torch

    from .report import write_setting
    torch.set_num_threads(1)  # the parent only prepares data; forked runs set their own threads
    result = run_setting(setting, protocol, out_dir, plan_only=plan_only, announce=_print_plan)
    if plan_only:
        return result
    written = write_setting(result, out_dir)
    cpu = sum(s['cpu_seconds'] for s in written['summary'])
    print(f"\n{written['markdown']}\n{result['reused_runs']} runs reused; {cpu / 60:.1f} CPU-minutes in all runs, "
          f"{result['wall_seconds'] / 60:.1f} min wall time now; results in {out_dir}", flush=True)
    return {**result, **written}


def run_study(args: argparse.Namespace) -> int:
    """Every setting of :func:`.study.study_settings` in turn (each resumable), then ``study.json`` and ``study.md``
    (all tables and the claim lines); returns the exit status (1 when a run failed)."""
    from .report import study_markdown
    from .study import STUDY_PROTOCOL, study_settings
    settings = study_settings(args.captions, args.only)
    protocol = Protocol(**{**STUDY_PROTOCOL, 'jobs': args.jobs})
    start = time.time()
    results, failed = [], 0
    for setting in settings:
        result = run_one(setting, protocol, os.path.join(args.output_dir, setting.name), args.plan_only)
        if not args.plan_only:
            results.append(result)
            failed += sum(len(s['failed']) for s in result['summary'])
    if args.plan_only:
        return 0
    atomic_write_bytes(os.path.join(args.output_dir, 'study.json'), json.dumps(
        {'settings': [s.name for s in settings], 'wall_seconds_last_invocation': time.time() - start}).encode())
    text = study_markdown(results, {}, args.output_dir)
    atomic_write_bytes(os.path.join(args.output_dir, 'study.md'), text.encode())
    print(f'\n{text}\nstudy: {(time.time() - start) / 60:.1f} min wall time; results in {args.output_dir}; '
          f'to put them in the README and docs: visadapt-compare docs {args.output_dir}', flush=True)
    return 1 if failed else 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == 'study':
        return run_study(args)
    if args.command == 'docs':
        from .report import write_docs
        write_docs(args.study_dir, args.targets, args.image_dir)
        print(f'wrote the study results of {args.study_dir} into {", ".join(args.targets)} (figures in '
              f'{args.image_dir})')
        return 0
    setting = _conv_setting(args) if args.command == 'conv' else _attention_setting(args)
    result = run_one(setting, _protocol(args), args.output_dir, args.plan_only)
    return 1 if any(s['failed'] for s in result.get('summary', [])) else 0


def main(argv: Optional[List[str]] = None) -> int:
    """The ``visadapt-compare`` command; returns the exit status (2 with one error line for bad input, 1 when a run
    failed, 130 when interrupted: run the same command again to continue)."""
    from .._command import exit_status
    args = build_parser().parse_args(argv)
    return exit_status('visadapt-compare', lambda: _dispatch(args),
                       resume_hint='run the same command again to continue (finished runs are reused)')
