#!/usr/bin/env python
"""Analyse one or two saved adapters: ΔW spectra, norms, feature amplification and subspace similarity.

Writes to ``--out``:

* ``analysis.json``: per adapter and layer the singular values of ΔW, ‖ΔW‖_F, the rank used and the feature
  amplification factor; with two adapters also φ(ΔW_1, ΔW_2, i, j) for every common layer (SeRA paper eq. 4);
* ``spectra.png``: normalized singular values σ_i / σ_1 of every layer, one panel per adapter;
* ``norms.png``: ‖ΔW‖_F and the amplification factor per layer, one bar per adapter;
* ``similarity.png`` (two adapters, or one given twice): for the layers with the largest ‖ΔW‖_F in the first
  adapter, the two spectra and the φ heatmap side by side, as in the SeRA paper's Figure 3.

The base model must be the one the adapters were trained on. Build it either from timm
(``--model efficientnet_lite0 --pretrained packaged --num-classes 10``; with ``--pretrained none`` the random init
is seeded by ``--seed``) or from any Python callable (``--factory my_pkg.models:build`` or
``--factory path/to/file.py:build``). Example::

    visadapt-analyze runs/lora_r4/adapter runs/lora_r8/adapter \\
        --model efficientnet_lite0 --pretrained packaged --num-classes 10 --out runs/analysis
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import json
import math
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

import visadapt
from visadapt.core import atomic_write_bytes
from visadapt.core.analysis import LayerAnalysis, analyze, compare

__all__ = ['main', 'run', 'parse_args', 'load_and_analyze']


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('adapters', nargs='+', help='one or two adapter directories (written by visadapt.save_adapter)')
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument('--model', help='timm architecture of the base model, e.g. efficientnet_lite0')
    base.add_argument('--factory', help="'module:function' or 'file.py:function' returning the base model")
    p.add_argument('--pretrained', default='none',
                   help="timm base weights: 'none' (seeded random init), 'packaged' or a checkpoint path")
    p.add_argument('--num-classes', type=int, default=None, help='timm classifier size used in training')
    p.add_argument('--seed', type=int, default=0, help='torch seed set before building the base model')
    p.add_argument('--rank', type=int, default=None,
                   help='r for the amplification factor and the φ heatmaps (default: numerical rank of each ΔW)')
    p.add_argument('--layers', nargs='*', default=None, help='glob patterns of layers to analyse (default: all)')
    p.add_argument('--max-heatmaps', type=int, default=4, help='layers shown in similarity.png')
    p.add_argument('--out', required=True, help='output directory')
    args = p.parse_args(argv)
    if len(args.adapters) > 2:
        p.error(f'give one or two adapter directories, got {len(args.adapters)}')
    if args.max_heatmaps < 1:
        p.error(f'--max-heatmaps must be >= 1, got {args.max_heatmaps}')
    return args


def model_builder(args: argparse.Namespace) -> Callable[[], nn.Module]:
    """A function building a fresh, identical base model each call."""
    if args.factory:
        target, sep, attr = args.factory.rpartition(':')
        if not sep or not target or not attr:
            raise SystemExit(f"--factory must look like 'module:function' or 'file.py:function', got {args.factory!r}")
        if target.endswith('.py'):
            spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(target))[0], target)
            if spec is None or not os.path.isfile(target):
                raise SystemExit(f'--factory file {target!r} not found')
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise SystemExit(f'--factory: {target!r} has no callable {attr!r}')
        build = fn
    else:
        from visadapt.integrations.timm_models import create_model
        pretrained = False if args.pretrained == 'none' else args.pretrained

        def build() -> nn.Module:
            return create_model(args.model, pretrained=pretrained, num_classes=args.num_classes)

    def seeded() -> nn.Module:
        torch.manual_seed(args.seed)
        return build().eval()
    return seeded


def load_and_analyze(path: str, build: Callable[[], nn.Module], args: argparse.Namespace) -> List[LayerAnalysis]:
    model = build()
    visadapt.load_adapter(model, path)
    name = visadapt.adapter_names(model)[0]
    return analyze(model, name, rank=args.rank, layers=args.layers)


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110, bbox_inches='tight')
    atomic_write_bytes(path, buf.getvalue())


def _label(path: str, analyses: List[LayerAnalysis]) -> str:
    return f'{os.path.basename(os.path.normpath(path))} ({analyses[0].method})'


def plot_spectra(results: Dict[str, List[LayerAnalysis]], out: str) -> None:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (label, analyses) in zip(axes[0], results.items()):
        for a in analyses:
            s = a.singular_values
            if s.numel() and s[0] > 0:
                shown = s[:max(a.numerical_rank, 1) + 8]
                ax.semilogy(range(1, shown.numel() + 1), (shown / s[0]).clamp_min(1e-12).numpy(), lw=1, alpha=0.7)
        ax.set(title=f'singular values of ΔW per layer\n{label}', xlabel='i', ylabel='σ_i / σ_1')
    _save(fig, os.path.join(out, 'spectra.png'))
    plt.close(fig)


def plot_norms(results: Dict[str, List[LayerAnalysis]], out: str) -> None:
    import matplotlib.pyplot as plt
    layers = list(dict.fromkeys(a.layer for analyses in results.values() for a in analyses))
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.35 * len(layers) + 2), 7), sharex=True)
    width = 0.8 / len(results)
    for k, (label, analyses) in enumerate(results.items()):
        by = {a.layer: a for a in analyses}
        xs = [i + k * width for i, n in enumerate(layers) if n in by]
        axes[0].bar(xs, [by[n].frobenius_norm for n in layers if n in by], width, label=label)
        axes[1].bar(xs, [by[n].amplification_factor for n in layers if n in by], width, label=label)
    axes[0].set(ylabel='‖ΔW‖_F')
    axes[1].set(ylabel='‖ΔW‖_F / ‖UᵀWV‖_F')
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(len(layers))], layers, rotation=90, fontsize=7)
    axes[0].legend(fontsize=8)
    _save(fig, os.path.join(out, 'norms.png'))
    plt.close(fig)


def plot_similarity(first: List[LayerAnalysis], second: List[LayerAnalysis], phi: Dict[str, torch.Tensor],
                    labels: Sequence[str], out: str, max_rows: int) -> List[str]:
    import matplotlib.pyplot as plt
    ranked = sorted((a for a in first if a.layer in phi), key=lambda a: -a.frobenius_norm)[:max_rows]
    other = {a.layer: a for a in second}
    fig, axes = plt.subplots(len(ranked), 2, figsize=(11, 4 * len(ranked)), squeeze=False)
    for row, a in zip(axes, ranked):
        b = other[a.layer]
        for analysis, label in ((a, labels[0]), (b, labels[1])):
            s = analysis.singular_values[:max(analysis.rank, 1)]
            row[0].plot(range(1, s.numel() + 1), s.numpy(), 'o-', ms=3, label=label)
        row[0].set(title=f'{a.layer}: singular values', xlabel='i', ylabel='σ_i')
        row[0].legend(fontsize=8)
        image = row[1].imshow(phi[a.layer].numpy(), vmin=0, vmax=1, cmap='viridis', origin='lower', aspect='auto',
                              extent=(0.5, phi[a.layer].shape[1] + 0.5, 0.5, phi[a.layer].shape[0] + 0.5))
        row[1].set(title=f'{a.layer}: φ(ΔW₁, ΔW₂, i, j)', xlabel=f'j ({labels[1]})', ylabel=f'i ({labels[0]})')
        fig.colorbar(image, ax=row[1])
    fig.tight_layout()
    _save(fig, os.path.join(out, 'similarity.png'))
    plt.close(fig)
    return [a.layer for a in ranked]


def _finite(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def run(argv: Optional[Sequence[str]] = None) -> Dict:
    """The command's work: returns the report written to ``analysis.json``; raises ValueError on a bad adapter."""
    args = parse_args(argv)
    import matplotlib
    matplotlib.use('Agg')
    build = model_builder(args)
    os.makedirs(args.out, exist_ok=True)
    analyses = [load_and_analyze(path, build, args) for path in args.adapters]
    labels = [_label(path, a) for path, a in zip(args.adapters, analyses)]
    if len(set(labels)) < len(labels):
        labels = [f'{label} #{i + 1}' for i, label in enumerate(labels)]
    results = dict(zip(labels, analyses))
    report = {'adapters': [{'path': os.path.abspath(path), 'label': label,
                            'layers': [dict(a.to_dict(), amplification_factor=_finite(a.amplification_factor))
                                       for a in analysis]}
                           for path, label, analysis in zip(args.adapters, labels, analyses)]}
    plot_spectra(results, args.out)
    plot_norms(results, args.out)
    if len(analyses) == 2:
        phi = compare(analyses[0], analyses[1])
        report['similarity'] = {layer: m.tolist() for layer, m in phi.items()}
        if phi:
            report['similarity_plotted'] = plot_similarity(analyses[0], analyses[1], phi, labels, args.out,
                                                           args.max_heatmaps)
    atomic_write_bytes(os.path.join(args.out, 'analysis.json'), json.dumps(report, indent=1).encode())
    for label, analysis in results.items():
        norms = [a.frobenius_norm for a in analysis]
        amps = [a.amplification_factor for a in analysis if math.isfinite(a.amplification_factor)]
        print(f'{label}: {len(analysis)} layers, mean ‖ΔW‖_F {sum(norms) / len(norms):.4g}, mean amplification '
              f'{(sum(amps) / len(amps)) if amps else float("nan"):.4g}')
    if 'similarity' in report:
        print(f'φ computed for {len(report["similarity"])} common layers; plots and analysis.json in {args.out}')
    else:
        print(f'plots and analysis.json in {args.out}')
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``visadapt-analyze``: exit status 0, or 2 with one ``error:`` line for a bad adapter or model."""
    from ._command import exit_status
    return exit_status('visadapt-analyze', lambda: run(argv))


if __name__ == '__main__':
    sys.exit(main())
