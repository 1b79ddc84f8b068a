"""Train adapters on an open_clip model with open_clip's own trainer, ``open_clip_train``, for image–text retrieval.

An open_clip user's command runs unchanged: every flag of ``python -m open_clip_train.main`` is accepted and means
what it means there (``--train-data``, ``--val-data``, ``--csv-img-key``, ``--csv-caption-key``, ``--csv-separator``,
``--batch-size``, ``--precision amp|amp_bf16|bf16|fp32``, ``--device``, ``--accum-freq``, ``--grad-checkpointing``,
``--warmup``, ``--lr``, ``--wd``, ``--lr-scheduler``, ``--epochs``, ``--workers``, ``--logs``, ``--name``,
``--resume [latest]``, ``--save-frequency``, ``--save-most-recent``, ``--seed``, ``--siglip``, ...). Added:

* ``--adapter`` (default SeRA) on the query/value projections of both towers, ``--conv-adapter`` (default FLoRA) on
  conv towers, ``--train-modules`` trained fully (:func:`visadapt.integrations.open_clip_models.retrieval_configs`:
  the SeRA paper's retrieval setting, section 4.2);
* ``--loss contrastive`` (default: open_clip's CLIP loss, or SigLIP's with ``--siglip``, with the model's learned
  ``logit_scale``) or ``--loss triplet --margin 0.2`` (both directions, hardest in-batch negative, VSE++ form; over
  the global batch with several processes, like open_clip's ``--gather-with-grad`` contrastive loss);
* the SeRA paper's recall on the validation CSV (R@1/5/10 image→text and text→image and their sum, rows grouped by
  image file, so several captions per image count as in the paper) next to open_clip's own validation metrics;
* ``--model`` also takes a model config JSON (``clip_configs/``); ``--pretrained-image-weights packaged|FILE`` loads
  a timm image tower's weights offline; ``--load-adapters DIR`` evaluates saved adapters (no ``--train-data``).

Reused from open_clip_train, called and never copied: ``params.parse_args``, ``distributed.init_distributed_device``
(CUDA when there, ``--device`` to choose, CPU otherwise; ``torchrun`` multi-process), ``logger.setup_logging``,
``data.get_data`` (CSV/TSV through ``CsvDataset``, webdataset, synthetic: images are read by DataLoader workers, never
held in memory), ``train.train_one_epoch`` (autocast per ``--precision``, grad scaler, ``--accum-freq``,
``--grad-clip-norm``, logit-scale clamp, logging), ``train.evaluate`` (val metrics, zero-shot, ``results.jsonl``),
``scheduler.cosine_lr`` / ``const_lr`` / ``const_lr_cooldown``, ``open_clip.create_loss``, ``main.random_seed`` and
``main.get_latest_checkpoint``. visadapt adds the offline model build, the adapters (their tensors stay float32 under
autocast and under ``--precision bf16``), frozen BatchNorm statistics of the frozen towers, the optimizer over the
trained tensors only, and slim checkpoints.

Outputs in ``{--logs}/{--name}/`` (rank 0): ``out.log`` and ``params.txt``; ``checkpoints/epoch_N.pt`` (open_clip's
layout: ``epoch``, ``name``, ``state_dict``, ``optimizer``, ``scaler``, but ``state_dict`` holds only the trained
tensors under the model's own keys: adapters, train modules, the temperature), ``epoch_latest.pt`` with
``--save-most-recent``, ``results.jsonl`` (open_clip's evaluate); ``adapters/<name>/`` (``visadapt.save_adapter``
directories, loaded by ``visadapt.load_adapter``); ``metrics.json`` (before/after and every epoch).

Example (docs/clip.md)::

    visadapt-train-clip --model clip_configs/EffNetLite0-MiniLM-L6.json --pretrained-image-weights packaged \\
        --train-data runs/clipart/train.csv --val-data runs/clipart/val.csv --csv-img-key filepath \\
        --csv-caption-key title --csv-separator , --batch-size 20 --epochs 3 --lr 2e-3 --warmup 10 --workers 2 \\
        --precision fp32 --train-modules visual.head.proj --adapter '{"method": "SeRA", "r": 8}' --loss triplet \\
        --logs runs/logs --name clip-sera
    torchrun --nproc_per_node 2 -m visadapt.apps.train_clip ...    # several processes (gloo on CPU, nccl on CUDA)
"""
from __future__ import annotations

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')        # before transformers / huggingface_hub are imported
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence, Tuple  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from visadapt.apps import retrieval  # noqa: E402
from visadapt.core import (  # noqa: E402
    adapter_state_keys,
    atomic_write_bytes,
    check_state_dict,
    count_parameters,
    get_injection,
    inject,
    is_adapter_key,
    load_adapter,
    parse_adapter_spec,
    save_adapter,
)
from visadapt.integrations import open_clip_models as vclip  # noqa: E402

__all__ = ['main', 'run', 'parse_args', 'TripletLoss', 'ADAPTER_ORDER', 'trained_keys']

#: the order adapters are injected in (and reloaded by --load-adapters): the names retrieval_configs returns
ADAPTER_ORDER = ('head', 'qv', 'conv')

#: open_clip_train flags this trainer refuses, and why (each would be ignored or break with adapters)
UNSUPPORTED = {
    'distill_model': 'distillation is not supported with adapters',
    'torchscript': 'TorchScript cannot script adapted layers',
    'trace': 'a traced model cannot be trained',
    'use_bnb_linear': 'bitsandbytes layers cannot be adapted',
    'horovod': 'use torchrun (torch.distributed) for several processes',
    'lock_image': 'adapters freeze every base tensor already; use --train-modules to train modules fully',
    'lock_text': 'adapters freeze every base tensor already; use --train-modules to train modules fully',
    'use_bn_sync': 'BatchNorms of the frozen towers keep their statistics; SyncBatchNorm would drop that',
    'remote_sync': 'remote sync is not supported',
    'copy_codebase': 'copying the code base is not supported',
    'pretrained_image': "it loads timm's hub weights; use --pretrained-image-weights packaged|FILE (offline)",
}


# ---- arguments -------------------------------------------------------------------------------------------------------
def _visadapt_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='visadapt-train-clip', add_help=False, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__.split('\n\n')[0],
        epilog="Every flag of open_clip_train (python -m open_clip_train.main --help) is accepted too, with its "
               "meaning; its help follows when open_clip_torch[training] is installed. --model also takes a model "
               "config JSON (e.g. clip_configs/EffNetLite0-MiniLM-L6.json). Several processes: torchrun "
               "--nproc_per_node N -m visadapt.apps.train_clip -- FLAGS.")
    g = p.add_argument_group('adapters (visadapt)')
    g.add_argument('--adapter', default='{"method": "SeRA", "r": 8}',
                   help='method for the q/v projections of both towers: JSON (inline or a .json file) or a method '
                        'name (default: %(default)s); an "include" in it replaces the q/v targeting')
    g.add_argument('--conv-adapter', default='{"method": "FLoRA", "r": 8, "r3": 2, "scale": 1.0}',
                   help="method for the convs of conv towers (JSON or method name), or 'none' (default: %(default)s)")
    g.add_argument('--train-modules', nargs='*', default=[],
                   help='modules trained fully and saved with the adapter, e.g. a fresh projection visual.head.proj')
    g.add_argument('--load-adapters', metavar='DIR',
                   help='evaluate the adapters saved in DIR/<name>/ (e.g. LOGS/NAME/adapters); needs --val-data and '
                        'no --train-data')
    g = p.add_argument_group('loss and model (visadapt)')
    g.add_argument('--loss', choices=('contrastive', 'triplet'), default='contrastive',
                   help="'contrastive': open_clip's loss (CLIP, or SigLIP with --siglip) with the learned "
                        "logit_scale; 'triplet': bidirectional hardest-negative triplet loss on cosines")
    g.add_argument('--margin', type=float, default=0.2, help='triplet margin (default: %(default)s)')
    g.add_argument('--pretrained-image-weights', metavar='packaged|FILE',
                   help="timm image tower weights: 'packaged' (ImageNet weights shipped in pip packages) or a local "
                        'timm checkpoint; never downloads')
    return p


def _print_help(parser: argparse.ArgumentParser) -> None:
    print(parser.format_help())
    sys.stdout.flush()
    if not vclip.has_open_clip():
        raise SystemExit(0)
    try:
        from open_clip_train.params import parse_args as open_clip_parse_args
    except ImportError:
        print("(open_clip_train's data modules are missing: pip install 'visadapt[clip]')")
        raise SystemExit(0) from None
    print("open_clip_train's own flags:\n")
    open_clip_parse_args(['--help'])  # prints its help and exits 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """open_clip_train's arguments plus visadapt's (see the module docstring); refuses what cannot work."""
    parser = _visadapt_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if '-h' in argv or '--help' in argv:
        _print_help(parser)
    ours, rest = parser.parse_known_args(argv)
    vclip.has_open_clip(necessary=True)
    from open_clip_train.params import parse_args as open_clip_parse_args
    args = open_clip_parse_args(rest)
    for key, value in vars(ours).items():
        setattr(args, key, value)
    problems = [f'--{k.replace("_", "-")}: {why}' for k, why in UNSUPPORTED.items() if getattr(args, k)]
    if 'wandb' in args.report_to or 'all' in args.report_to:
        problems.append('--report-to wandb: not supported here; use tensorboard')
    if args.loss == 'triplet' and (args.siglip or args.local_loss):
        problems.append('--loss triplet: --siglip and --local-loss belong to the contrastive loss')
    if not args.margin >= 0:
        problems.append(f'--margin must be >= 0, got {args.margin}')
    if args.load_adapters and args.train_data:
        problems.append('--load-adapters evaluates saved adapters; drop --train-data (or continue a run with --resume)')
    if args.train_data and args.batch_size < 2:
        problems.append(f'--batch-size must be >= 2 to have in-batch negatives, got {args.batch_size}')
    for flag in ('train_data', 'val_data'):
        path = getattr(args, flag)
        if path and args.dataset_type in ('auto', 'csv') and path.endswith(('.csv', '.tsv')) and not os.path.isfile(path):
            problems.append(f'--{flag.replace("_", "-")} {path!r}: no such file')
    for flag in ('adapter', 'conv_adapter'):  # checked before any folder is made or model built
        try:
            spec = _adapter_spec(getattr(args, flag), f'--{flag.replace("_", "-")}')
            setattr(args, f'{flag}_spec', spec)
            if spec is not None:
                parse_adapter_spec(spec)
        except (ValueError, TypeError, OSError) as err:
            problems.append(str(err))
    if problems:
        parser.error('; '.join(problems))
    args.distill = False
    if isinstance(args.force_image_size, (tuple, list)) and len(args.force_image_size) == 1:
        args.force_image_size = args.force_image_size[0]
    return args


def _adapter_spec(text: str, flag: str) -> Optional[Any]:
    """A method name, inline JSON or a .json file; 'none' → None."""
    if text.strip().lower() == 'none':
        return None
    if text.strip().startswith('{'):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f'{flag} is not valid JSON ({err}): {text!r}') from None
    if text.endswith('.json'):
        with open(text, encoding='utf-8') as f:
            return json.load(f)
    return text


# ---- run directory, logging, resume path ----------------------------------------------------------------------------
def _start_run(args: argparse.Namespace) -> List[logging.Handler]:
    """Name the run, make its folders, start open_clip's logging; returns the logging handlers added."""
    from open_clip_train.distributed import broadcast_object, is_master
    from open_clip_train.logger import setup_logging
    if args.name is None:
        stamp = datetime.now().strftime('%Y_%m_%d-%H_%M_%S')
        stem = os.path.splitext(os.path.basename(args.model))[0]
        args.name = f'{broadcast_object(args, stamp) if args.distributed else stamp}-visadapt-{stem}'
    base = os.path.join(args.logs, args.name)
    resume_latest = args.resume == 'latest'
    args.save_logs = bool(args.logs) and args.logs.lower() != 'none' and is_master(args)
    # read on every rank before rank 0 writes anything (params.txt: written by every run that keeps logs)
    exists = any(os.path.exists(os.path.join(base, f)) for f in ('out.log', 'params.txt'))
    if args.distributed:
        torch.distributed.barrier()
    if exists and not resume_latest:
        raise ValueError(f'experiment {base!r} exists already; pass another --name, or --resume latest to continue it')
    args.log_path = None
    if args.logs and args.logs.lower() != 'none' and is_master(args, local=args.log_local):
        os.makedirs(base, exist_ok=True)
        args.log_path = os.path.join(base, f'out-{args.rank}' if args.log_local else 'out.log')
    before = list(logging.root.handlers)
    levels = {name: logging.getLogger(name).level for name in list(logging.root.manager.loggerDict)}
    setup_logging(args.log_path, logging.DEBUG if args.debug else logging.INFO)
    for name, level in levels.items():  # open_clip logs through the root logger; other libraries keep their levels
        logging.getLogger(name).setLevel(level)
    args.checkpoint_path = os.path.join(base, 'checkpoints')
    args.wandb = False
    args.tensorboard = args.save_logs and ('tensorboard' in args.report_to or 'all' in args.report_to)
    args.tensorboard_path = os.path.join(base, 'tensorboard') if args.tensorboard else ''
    if args.save_logs:
        for folder in (args.checkpoint_path, args.tensorboard_path):
            if folder:
                os.makedirs(folder, exist_ok=True)
        atomic_write_bytes(os.path.join(base, 'params.txt'),
                           ''.join(f'{k}: {getattr(args, k)}\n' for k in sorted(vars(args))).encode())
    if resume_latest:
        args.resume = _latest_checkpoint(args)
    return [h for h in logging.root.handlers if h not in before]


def _latest_checkpoint(args: argparse.Namespace) -> Optional[str]:
    """``--resume latest``: open_clip_train's choice (``epoch_latest.pt`` with ``--save-most-recent``, else the
    newest ``epoch_N.pt``), made on rank 0 and sent to the others; None when there is none yet."""
    from open_clip_train.distributed import broadcast_object, is_master
    from open_clip_train.main import LATEST_CHECKPOINT_NAME, get_latest_checkpoint
    found = None
    if is_master(args):
        latest = os.path.join(args.checkpoint_path, LATEST_CHECKPOINT_NAME)
        found = ((latest if os.path.exists(latest) else None) if args.save_most_recent
                 else get_latest_checkpoint(args.checkpoint_path, remote=False))
        logging.info(f'--resume latest: {found or "no checkpoint yet, starting afresh"}')
    return broadcast_object(args, found) if args.distributed else found


# ---- model and adapters ----------------------------------------------------------------------------------------------
def _build(args: argparse.Namespace, device: torch.device) -> vclip.ClipBundle:
    """open_clip's model, tokenizer and transforms for these arguments (offline; see ``vclip.create_clip``)."""
    is_file = args.model.endswith('.json')
    kwargs: Dict[str, Any] = {}
    if args.siglip:  # SigLIP's initial temperature and bias, as open_clip_train sets them
        kwargs.update(init_logit_scale=math.log(10), init_logit_bias=-10)
    return vclip.create_clip(
        None if is_file else args.model, config_path=args.model if is_file else None,
        pretrained=args.pretrained or None, pretrained_image=args.pretrained_image_weights, device=device,
        precision=args.precision, image_mean=args.image_mean, image_std=args.image_std,
        image_interpolation=args.image_interpolation, image_resize_mode=args.image_resize_mode,
        aug_cfg=args.aug_cfg, context_length=args.force_context_length, force_quick_gelu=args.force_quick_gelu,
        force_custom_text=args.force_custom_text, force_patch_dropout=args.force_patch_dropout,
        force_image_size=args.force_image_size, force_context_length=args.force_context_length, output_dict=True,
        **kwargs)


def _saved_adapter_names(folder: str) -> List[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'--load-adapters {folder!r} is not a directory')
    names = [n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n))]
    if not names:
        raise ValueError(f'--load-adapters {folder!r} holds no adapter directory (expected e.g. {folder}/qv/)')
    return sorted(names, key=lambda n: (ADAPTER_ORDER.index(n) if n in ADAPTER_ORDER else len(ADAPTER_ORDER), n))


def _adapt(model: nn.Module, args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """Inject (or load) the adapters and freeze BatchNorm statistics outside the train modules. With the contrastive
    loss, open_clip's temperature (and SigLIP's bias) train as train modules, so the saved adapter carries them.
    Returns {name: config dict}."""
    if args.load_adapters:
        names = _saved_adapter_names(args.load_adapters)
        for name in names:
            load_adapter(model, os.path.join(args.load_adapters, name), name=name)
            logging.info(f'loaded adapter {name!r} from {os.path.join(args.load_adapters, name)}')
    else:
        train = list(args.train_modules)
        if args.loss == 'contrastive':
            train += [attr for attr in ('logit_scale', 'logit_bias')
                      if isinstance(getattr(model, attr, None), nn.Parameter) and attr not in train]
        configs = vclip.retrieval_configs(model, args.adapter_spec, args.conv_adapter_spec, train)
        for name, config in configs.items():
            logging.info(str(inject(model, config, name=name)))
        names = list(configs)
    train_modules = [m for n in names for m in get_injection(model, n).train_modules]
    vclip.freeze_norm_stats(model, train_modules)
    return {n: get_injection(model, n).config.to_dict() for n in names}


def trained_keys(model: nn.Module) -> List[str]:
    """The model's state_dict keys a checkpoint keeps: the adapters' and their train modules' (the temperature
    included, see :func:`_adapt`)."""
    return adapter_state_keys(model)


# ---- losses ----------------------------------------------------------------------------------------------------------
class TripletLoss(nn.Module):
    """:func:`visadapt.apps.retrieval.triplet_loss` behind open_clip_train's loss interface.

    Called as ``loss(image_features=..., text_features=..., logit_scale=..., output_dict=True)`` by
    ``train_one_epoch``; the temperature is not used (the hinge works on cosines). With several processes the
    negatives come from the global batch (open_clip's ``gather_features``, as its ClipLoss gathers them).
    """
    def __init__(self, margin: float = 0.2, gather_with_grad: bool = False, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.margin, self.gather_with_grad, self.rank, self.world_size = margin, gather_with_grad, rank, world_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: Any = None,
                logit_bias: Any = None, output_dict: bool = False) -> Any:
        if self.world_size > 1:
            from open_clip.loss import gather_features
            image_features, text_features = gather_features(
                image_features, text_features, local_loss=False, gather_with_grad=self.gather_with_grad,
                rank=self.rank, world_size=self.world_size)
        loss = retrieval.triplet_loss(image_features.float(), text_features.float(), self.margin)
        return {'triplet_loss': loss} if output_dict else loss


class _RecordedLoss(nn.Module):
    """Passes a loss through, keeping each step's total (detached, no device sync) and the features' device."""
    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss
        self.values: List[torch.Tensor] = []
        self.feature_device: Optional[torch.device] = None

    def forward(self, **kwargs: Any) -> Any:
        out = self.loss(**kwargs)
        self.values.append(sum(out.values()).detach() if isinstance(out, dict) else out.detach())
        self.feature_device = kwargs['image_features'].device
        return out

    def take(self) -> List[float]:
        """The totals recorded since the last call."""
        values, self.values = [float(v) for v in self.values], []
        return values


def _loss(args: argparse.Namespace) -> nn.Module:
    if args.loss == 'triplet':
        return TripletLoss(args.margin, args.gather_with_grad, args.rank, args.world_size)
    from open_clip import create_loss
    return create_loss(args)


# ---- optimizer, scheduler --------------------------------------------------------------------------------------------
def _optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW over the trainable tensors only (no weight decay on ≤1-D ones: gains, biases, scales, the temperature),
    or a timm optimizer with ``--opt timm/<name>`` (timm skips frozen tensors itself)."""
    if args.opt.lower().startswith('timm/'):
        from timm.optim import create_optimizer_v2
        extra: Dict[str, Any] = {}
        if args.beta1 is not None or args.beta2 is not None:
            extra['betas'] = (args.beta1, args.beta2)
        for key in ('eps', 'momentum'):  # unset: the optimizer's own default (open_clip leaves them None for timm)
            if getattr(args, key) is not None:
                extra[key] = getattr(args, key)
        return create_optimizer_v2(model, args.opt.split('timm/')[-1], lr=args.lr, weight_decay=args.wd, **extra)
    from ._optim import fused_adam_kwargs
    if args.opt.lower() != 'adamw':
        raise ValueError(f"--opt {args.opt!r} is not valid; use 'adamw' or 'timm/<optimizer name>'")
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in trainable if p.ndim <= 1], 'weight_decay': 0.0},
              {'params': [p for p in trainable if p.ndim > 1], 'weight_decay': args.wd}]
    return torch.optim.AdamW([g for g in groups if g['params']], lr=args.lr, betas=(args.beta1, args.beta2),
                             eps=args.eps, **fused_adam_kwargs(trainable))


def _scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    """open_clip_train's learning-rate schedules, chosen by ``--lr-scheduler`` as open_clip_train chooses them."""
    from open_clip_train.scheduler import const_lr, const_lr_cooldown, cosine_lr
    total = steps_per_epoch * args.epochs
    if args.warmup >= total:
        logging.warning(f'--warmup {args.warmup} is not below the {total} optimizer steps of this run: the learning '
                        f'rate never reaches --lr {args.lr}')
    if args.lr_scheduler == 'cosine':
        return cosine_lr(optimizer, args.lr, args.warmup, total)
    if args.lr_scheduler == 'const':
        return const_lr(optimizer, args.lr, args.warmup, total)
    if args.lr_scheduler == 'const-cooldown':
        if args.epochs_cooldown is None:
            raise ValueError('--lr-scheduler const-cooldown needs --epochs-cooldown')
        return const_lr_cooldown(optimizer, args.lr, args.warmup, total, steps_per_epoch * args.epochs_cooldown,
                                 args.lr_cooldown_power, args.lr_cooldown_end)
    raise ValueError(f"--lr-scheduler {args.lr_scheduler!r} is not valid; use 'cosine', 'const' or 'const-cooldown'")


# ---- checkpoints -----------------------------------------------------------------------------------------------------
def _save(args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, epoch: int,
          configs: Dict[str, Dict[str, Any]]) -> None:
    """open_clip_train's checkpoint files and schedule, holding only the trained tensors; the adapters as
    ``save_adapter`` directories. Every file is written atomically (rank 0)."""
    if not args.save_logs:
        return
    state = model.state_dict()
    blob = {'epoch': epoch, 'name': args.name, 'optimizer': optimizer.state_dict(),
            'state_dict': {k: state[k].detach().cpu() for k in trained_keys(model)},
            'visadapt': {'adapters': configs}, 'torch_rng_state': torch.get_rng_state()}
    if scaler is not None:
        blob['scaler'] = scaler.state_dict()
    buf = io.BytesIO()
    torch.save(blob, buf)
    folder = args.checkpoint_path
    if epoch == args.epochs or (args.save_frequency > 0 and epoch % args.save_frequency == 0):
        atomic_write_bytes(os.path.join(folder, f'epoch_{epoch}.pt'), buf.getvalue())
    previous = os.path.join(folder, f'epoch_{epoch - 1}.pt')
    if args.delete_previous_checkpoint and os.path.exists(previous):
        os.remove(previous)
    if args.save_most_recent:
        from open_clip_train.main import LATEST_CHECKPOINT_NAME
        atomic_write_bytes(os.path.join(folder, LATEST_CHECKPOINT_NAME), buf.getvalue())
    for name in configs:
        save_adapter(model, os.path.join(args.logs, args.name, 'adapters', name), name=name)


def _resume(args: argparse.Namespace, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], scaler: Any,
            configs: Dict[str, Dict[str, Any]]) -> int:
    """Load a checkpoint written by :func:`_save` after checking it all (configs, keys, shapes, values); returns
    its epoch."""
    path = args.resume
    try:
        blob = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # missing file, pickle/zip errors, weights_only refusals
        raise ValueError(f'--resume {path!r} cannot be read: {err}') from None
    if not isinstance(blob, dict) or not isinstance(blob.get('visadapt'), dict) or 'epoch' not in blob:
        raise ValueError(f'--resume {path!r} is not a visadapt-train-clip checkpoint; to start from full CLIP '
                         f'weights pass them as --pretrained')
    if blob['visadapt'].get('adapters') != configs:
        raise ValueError(f'--resume {path!r} was written with other adapters ({blob["visadapt"].get("adapters")}); '
                         f'pass the same --adapter/--conv-adapter/--train-modules/--loss, or another --name')
    state = model.state_dict()
    check_state_dict({k: state[k] for k in trained_keys(model)}, blob['state_dict'], f'checkpoint {path!r}')
    if optimizer is not None:
        optimizer.load_state_dict(blob['optimizer'])
    if scaler is not None and 'scaler' in blob:
        scaler.load_state_dict(blob['scaler'])
    model.load_state_dict(blob['state_dict'], strict=False)  # the keys were checked: the rest is the frozen base
    if not args.distributed:  # one process: the data order and augmentations continue as in an unbroken run
        torch.set_rng_state(blob['torch_rng_state'])
    logging.info(f'resumed {path} (epoch {blob["epoch"]})')
    return int(blob['epoch'])


# ---- evaluation ------------------------------------------------------------------------------------------------------
def _recall(model: nn.Module, val: Any, args: argparse.Namespace) -> Dict[str, float]:
    """The SeRA paper's R@K on the validation loader, the rows grouped by image (CsvDataset's image paths)."""
    from open_clip import get_input_dtype
    from open_clip_train.precision import get_autocast
    device = torch.device(args.device)
    input_dtype = get_input_dtype(args.precision)
    keys = getattr(val.dataloader.dataset, 'images', None)  # CSV: one path per row; other datasets: a row each

    def prepare(images: torch.Tensor, texts: torch.Tensor):
        return images.to(device=device, dtype=input_dtype), texts.to(device=device)

    image_emb, text_emb, text_image = retrieval.embed_batches(
        model, val.dataloader, None if keys is None else [str(k) for k in keys], prepare,
        get_autocast(args.precision, device_type=device.type))
    recall = retrieval.retrieval_recall(image_emb @ text_emb.t(), text_image)
    return {**recall, 'val_images': image_emb.shape[0], 'val_captions': text_emb.shape[0]}


def _evaluate(model: nn.Module, data: Dict[str, Any], epoch: int, args: argparse.Namespace, tokenizer: Any,
              writer: Any) -> Dict[str, Any]:
    """open_clip_train's ``evaluate`` and, whenever it scored the validation set, the SeRA recall next to it."""
    from open_clip_train.train import evaluate, unwrap_model
    metrics = dict(evaluate(model, data, epoch, args, tb_writer=writer, tokenizer=tokenizer))
    if 'clip_val_loss' in metrics:
        recall = _recall(unwrap_model(model), data['val'], args)
        logging.info(f'Retrieval Epoch: {epoch} (SeRA R@K, {recall["val_images"]} images, {recall["val_captions"]} '
                     f'captions) ' + '  '.join(f'{k}: {recall[k]:.2f}' for k in retrieval.RECALL_KEYS))
        metrics.update(recall)
        if writer is not None:
            for key in retrieval.RECALL_KEYS:
                writer.add_scalar(f'val/{key}', recall[key], epoch)
    if args.distributed:
        torch.distributed.barrier()
    return metrics


def _check_ranks_agree(model: nn.Module, args: argparse.Namespace) -> None:
    """Raise RuntimeError unless every process ends with the same adapters and trained tensors."""
    if not args.distributed:
        return
    state = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    keys = [k for k in trained_keys(model) if is_adapter_key(k) or k in trainable]
    flat = torch.cat([state[k].detach().float().flatten() for k in keys]).to(args.device)
    reference = flat.clone()
    torch.distributed.broadcast(reference, src=0)
    gap = (flat - reference).abs().max()
    torch.distributed.all_reduce(gap, op=torch.distributed.ReduceOp.MAX)
    if gap.item() != 0:
        raise RuntimeError(f'the {args.world_size} processes ended with different adapters (max difference '
                           f'{gap.item():.3g})')
    logging.info(f'adapters identical on all {args.world_size} processes ({flat.numel():,} values)')


# ---- the run ---------------------------------------------------------------------------------------------------------
def _setup(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """Model, adapters, DDP wrapper, optimizer, scaler, resume, data and schedule: everything the epochs need."""
    from open_clip_train.data import get_data
    from open_clip_train.main import random_seed
    random_seed(args.seed, 0)  # the same adapter initialization on every process
    bundle = _build(args, device)
    model = bundle.model
    configs = _adapt(model, args)
    random_seed(args.seed, args.rank)
    if args.grad_checkpointing:
        model.set_grad_checkpointing()
    trainable, total = count_parameters(model)
    logging.info(f'trainable {trainable:,} / {total:,} parameters ({100 * trainable / total:.3f}%) on {device}')
    net = model
    if args.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None,
                                                  **({'static_graph': True} if args.ddp_static_graph else {}))
    if args.torchcompile:  # as open_clip_train: the (DDP) model compiled; `model` stays eager for saving
        if args.grad_checkpointing and args.distributed:
            torch._dynamo.config.optimize_ddp = False  # open_clip_train's setting for that combination
        net = torch.compile(net)
    training = bool(args.train_data) or args.dataset_type == 'synthetic'
    optimizer = _optimizer(model, args) if training else None
    scaler = torch.amp.GradScaler(device=device.type) if training and args.precision == 'amp' else None
    start_epoch = _resume(args, model, optimizer, scaler, configs) if args.resume else 0
    data = get_data(args, (bundle.preprocess_train, bundle.preprocess_val), epoch=start_epoch,
                    tokenizer=bundle.tokenizer)
    if not data:
        raise ValueError('no data: pass --train-data and/or --val-data (CSV/TSV or webdataset shards)')
    scheduler = None
    if 'train' in data:
        scheduler = _scheduler(args, optimizer, data['train'].dataloader.num_batches // args.accum_freq)
    writer = None
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(args.tensorboard_path)
    return dict(bundle=bundle, model=model, net=net, configs=configs, optimizer=optimizer, scaler=scaler,
                start_epoch=start_epoch, data=data, scheduler=scheduler, writer=writer, trainable=trainable,
                total=total)


def _earlier_metrics(args: argparse.Namespace, start_epoch: int) -> Tuple[Optional[Dict[str, Any]], List[Dict]]:
    """(before, history up to ``start_epoch``) from the run's metrics.json when it is resumed, so that the file
    keeps the whole run."""
    path = os.path.join(args.logs, args.name, 'metrics.json')
    if not start_epoch or not args.save_logs or not os.path.isfile(path):
        return None, []
    with open(path, encoding='utf-8') as f:
        earlier = json.load(f)
    return earlier.get('before'), [h for h in earlier.get('history', []) if h['epoch'] <= start_epoch]


def _epochs(args: argparse.Namespace, s: Dict[str, Any]) -> Dict[str, Any]:
    """open_clip_train's epoch loop: train_one_epoch, evaluate (+ recall), checkpoint; returns the history."""
    from open_clip_train.train import train_one_epoch
    tokenizer, data, net = s['bundle'].tokenizer, s['data'], s['net']
    loss = _RecordedLoss(_loss(args))
    before, history = _earlier_metrics(args, s['start_epoch'])
    if s['start_epoch'] == 0 and 'val' in data:
        before = _evaluate(net, data, 0, args, tokenizer, s['writer'])
    step_losses: List[float] = []
    for epoch in range(s['start_epoch'], args.epochs):
        train_one_epoch(net, data, loss, epoch, s['optimizer'], s['scaler'], s['scheduler'], None, args,
                        tb_writer=s['writer'])
        losses = loss.take()
        step_losses += losses
        metrics = _evaluate(net, data, epoch + 1, args, tokenizer, s['writer'])
        history.append({'epoch': epoch + 1, 'train_loss': sum(losses) / max(len(losses), 1), **metrics})
        _save(args, s['model'], s['optimizer'], s['scaler'], epoch + 1, s['configs'])
        if args.distributed:
            torch.distributed.barrier()
    return {'before': before, 'history': history, 'step_losses': step_losses,
            'feature_device': None if loss.feature_device is None else str(loss.feature_device)}


def _summary(args: argparse.Namespace, s: Dict[str, Any], out: Dict[str, Any], seconds: float) -> Dict[str, Any]:
    """What metrics.json holds (and :func:`run` returns, with the model)."""
    model = s['model']
    train = s['data'].get('train')
    scale = getattr(model, 'logit_scale', None)
    return {'command': 'visadapt-train-clip ' + ' '.join(args.argv), 'name': args.name, 'model': s['bundle'].name,
            'adapters': s['configs'], 'trainable_parameters': s['trainable'], 'total_parameters': s['total'],
            'loss': args.loss, 'precision': args.precision, 'device': str(args.device),
            'world_size': args.world_size, 'epochs': args.epochs,
            'train_rows': None if train is None else train.dataloader.num_samples,
            'logit_scale': None if scale is None else float(scale.detach().float().exp()),
            'start_epoch': s['start_epoch'], **out, 'seconds': round(seconds, 1)}


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train (or, without ``--train-data``, evaluate) and return the summary written to ``metrics.json``, plus
    ``'model'`` (the adapted model, unwrapped) and ``'args'``."""
    t0 = time.time()
    args = parse_args(argv)  # answers --help without the clip extra; otherwise says to install it
    from open_clip_train.distributed import init_distributed_device, is_master
    args.argv = list(sys.argv[1:] if argv is None else argv)
    device = init_distributed_device(args)  # CUDA when there (--device), the CPU otherwise; torchrun's processes
    handlers = _start_run(args)
    try:
        s = _setup(args, device)
        if 'train' in s['data']:
            out = _epochs(args, s)
        else:
            out = {'metrics': _evaluate(s['net'], s['data'], s['start_epoch'], args, s['bundle'].tokenizer,
                                        s['writer'])}
        _check_ranks_agree(s['model'], args)
        summary = _summary(args, s, out, time.time() - t0)
        if args.save_logs:
            atomic_write_bytes(os.path.join(args.logs, args.name, 'metrics.json'),
                               (json.dumps(summary, indent=2) + '\n').encode())
        if is_master(args) and out.get('history'):
            last = out['history'][-1]
            logging.info(f'done: train loss {last["train_loss"]:.4f}' + ''.join(
                f'  {k} {last[k]:.2f}' for k in retrieval.RECALL_KEYS if k in last))
        return {**summary, 'model': s['model'], 'args': args}
    finally:
        if args.distributed:
            torch.distributed.destroy_process_group()
        for handler in handlers:
            logging.root.removeHandler(handler)
            handler.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``visadapt-train-clip``: exit status 0; 2 for a bad flag or input or a missing extra (one ``error:`` line)."""
    from ._command import INPUT_ERRORS, exit_status
    return exit_status('visadapt-train-clip', lambda: run(argv), errors=INPUT_ERRORS + (ImportError,))


if __name__ == '__main__':
    sys.exit(main())
