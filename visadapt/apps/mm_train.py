#!/usr/bin/env python
"""Train (or only evaluate) an mmdet / mmseg config with a visadapt adapter, without the mmdet/mmseg repositories.

The same as mmdet's / mmseg's ``tools/train.py``, plus: a config with an ``adapter`` key and no ``runner_type``
gets ``VisadaptRunner`` (so the adapter is never silently ignored), and ``--test-only CKPT`` evaluates a checkpoint
(an adapter checkpoint is completed with the config's pretrained base weights).

    visadapt-mm-train mm_configs/mmdet/mask-rcnn_efficientnet-lite0_fpn_stardist_flora.py --work-dir work_dirs/det
    visadapt-mm-train CONFIG --resume                  # continue from work_dir's last checkpoint
    visadapt-mm-train CONFIG --test-only work_dirs/det/iter_300.pth
    torchrun --nproc_per_node 2 visadapt-mm-train CONFIG --launcher pytorch     # DDP (gloo on CPU, nccl on GPUs)
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
from typing import List, Optional

__all__ = ['main', 'parse_args', 'build_cfg']


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='Train or evaluate an mmdet/mmseg config with a visadapt adapter')
    parser.add_argument('config', help='config file path')
    parser.add_argument('--work-dir', help='folder for logs and checkpoints (default ./work_dirs/<config name>)')
    parser.add_argument('--resume', nargs='?', type=str, const='auto',
                        help='resume from this checkpoint, or from the latest one in the work dir when no path '
                             'is given')
    parser.add_argument('--load-from', help='start from this checkpoint (full model, or an adapter checkpoint)')
    parser.add_argument('--test-only', metavar='CHECKPOINT',
                        help='do not train: evaluate this checkpoint on the test set of the config')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. train_cfg.max_iters=10 adapter.r=8')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher (use pytorch with torchrun)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def build_cfg(args: argparse.Namespace):
    from mmengine.config import Config
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    if args.amp:
        if cfg.optim_wrapper.get('type', 'OptimWrapper') == 'AmpOptimWrapper':
            print('AMP is already enabled in the config', file=sys.stderr)
        else:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.test_only is not None:
        cfg.load_from = args.test_only
        cfg.resume = False
    elif args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    elif args.load_from is not None:
        cfg.load_from = args.load_from
    if cfg.get('adapter') is not None and cfg.get('runner_type') is None:
        import visadapt.integrations.openmmlab  # noqa: F401  (registers VisadaptRunner)
        cfg.runner_type = 'VisadaptRunner'
    return cfg


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    cfg = build_cfg(args)
    runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
    if args.test_only is not None:
        metrics = runner.test()
        runner.logger.info(f'test metrics: {metrics}')
    else:
        runner.train()


if __name__ == '__main__':
    main()
