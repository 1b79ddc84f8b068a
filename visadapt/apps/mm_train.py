#!/usr/bin/env python
"""Run the installed mmdet's or mmseg's own ``tools/train.py`` (or ``tools/test.py``) on a config: no repository needed.

Both wheels ship their tools (``<package>/.mim/tools/``); this command finds the one for the config's toolbox
(``default_scope``, or ``--toolbox``) and runs it unchanged in this process, passing every other option through::

    visadapt-mm-train mm_configs/mmdet/mask-rcnn_efficientnet-lite0_fpn_stardist_flora.py --work-dir work_dirs/det
    visadapt-mm-train CONFIG --resume                            # tools/train.py's own options
    visadapt-mm-train CONFIG --test-only work_dirs/det/iter_300.pth  # tools/test.py CONFIG CHECKPOINT
    torchrun --nproc_per_node 2 -m visadapt.apps.mm_train CONFIG --launcher pytorch

The adapter is part of the config's model (``model=dict(type='AdaptedModel', ...)``, see
:mod:`visadapt.integrations.openmmlab`), so the stock scripts need nothing else. The one check added here: a config
in the retired form (a top-level ``adapter`` key or ``runner_type='VisadaptRunner'``), which the stock runner would
train without its adapter, is refused with the form to use.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import runpy
import sys
from typing import List, Optional, Sequence, Tuple

__all__ = ['main', 'parse_args', 'stock_tool', 'check_config', 'TOOLBOXES']

TOOLBOXES = ('mmdet', 'mmseg')
_PROG = 'visadapt-mm-train'


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
    """This command's own options, and the rest (for the stock script)."""
    parser = argparse.ArgumentParser(
        prog=_PROG, description="Run the installed mmdet/mmseg tools/train.py (or tools/test.py) on a config.",
        epilog="Every other option goes to the stock script unchanged, e.g. --work-dir, --resume, --amp, "
               "--cfg-options, --launcher pytorch (train.py) or --out, --show-dir (test.py).")
    parser.add_argument('config', help='config file (a model of type AdaptedModel carries the adapter)')
    parser.add_argument('--toolbox', choices=TOOLBOXES,
                        help="whose tools to run (default: the config's default_scope)")
    parser.add_argument('--test-only', metavar='CHECKPOINT',
                        help='run tools/test.py CONFIG CHECKPOINT instead of training')
    return parser.parse_known_args(argv)


def stock_tool(toolbox: str, name: str) -> str:
    """Path of ``tools/<name>.py`` inside the installed ``toolbox`` package."""
    if toolbox not in TOOLBOXES:
        raise ValueError(f'the toolbox must be one of {list(TOOLBOXES)} (the config\'s default_scope, or --toolbox), '
                         f'got {toolbox!r}')
    spec = importlib.util.find_spec(toolbox)
    if spec is None or spec.origin is None:
        raise ImportError(f'{toolbox} is not installed: pip install "visadapt[mm]" (then bash tools/build_mmcv.sh)')
    path = os.path.join(os.path.dirname(spec.origin), '.mim', 'tools', f'{name}.py')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} not found: this {toolbox} installation does not ship its tools')
    return path


def check_config(path: str) -> Optional[str]:
    """Load the config with the integration imported, so a retired top-level ``adapter=`` is refused
    (:func:`visadapt.integrations.openmmlab.refuse_top_level_adapter`); returns its ``default_scope``."""
    from mmengine.config import Config

    import visadapt.integrations.openmmlab  # noqa: F401  (installs the config check)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'config {path!r} not found')
    try:
        cfg = Config.fromfile(path)
    except ValueError as err:
        raise ValueError(f'{path}: {err}') from None
    if cfg.get('runner_type') == 'VisadaptRunner':
        raise ValueError(f"{path}: runner_type='VisadaptRunner' was retired; the adapter is part of the model now: "
                         f"model = dict(type='AdaptedModel', model_type=<the model's type>, adapter=dict(...))")
    return cfg.get('default_scope')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``visadapt-mm-train`` command: exit status 2 with one ``error:`` line for a bad config or toolbox;
    otherwise whatever the stock script does (its own errors and exit status)."""
    args, rest = parse_args(argv)
    try:
        scope = check_config(args.config)
        script = stock_tool(args.toolbox or scope, 'test' if args.test_only else 'train')
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f'{_PROG}: error: {err}', file=sys.stderr)
        return 2
    saved_argv = sys.argv
    sys.argv = [script, args.config, *([args.test_only] if args.test_only else []), *rest]
    try:
        runpy.run_path(script, run_name='__main__')
    finally:
        sys.argv = saved_argv
    return 0


if __name__ == '__main__':
    sys.exit(main())
