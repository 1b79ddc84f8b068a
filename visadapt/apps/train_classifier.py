"""Image classification with adapters, trained on timm's own machinery: the ``visadapt-train-classifier`` command.

The command line is timm's ``train.py`` (same flag names and meanings: ``--model``, ``--pretrained``,
``--initial-checkpoint``, ``--num-classes``, ``--img-size``, ``-b``, ``--epochs``, ``--lr``, ``--opt``, ``--sched``,
``--warmup-epochs``, ``--mixup``, ``--cutmix``, ``--smoothing``, ``--model-ema``, ``--amp``, ``--channels-last``,
``--output``, ``--resume``, ``-j``, ``--device``, ...) plus the adapter flags (``--adapter``, ``--rank`` or
``--budget``, ``--mlp``, ``--proj``, ``--no-preset``). Every part is timm's own:

* data: :func:`timm.data.create_dataset` (ImageFolder/ImageTar and timm's other readers) or the two offline sets
  below, fed through :func:`timm.data.create_loader` (DataLoader workers, :func:`~timm.data.create_transform` with
  timm's augmentation flags, the prefetcher, distributed samplers), :class:`timm.data.Mixup`/``FastCollateMixup``;
* loss :func:`timm.loss.create_classification_loss`, the step :class:`timm.task.ClassificationTask` (DDP, EMA and
  checkpoint state), evaluation :class:`timm.task.ClassificationEvaluator`;
* optimizer :func:`timm.optim.create_optimizer_v2` over the model (it skips frozen parameters), schedule
  :func:`timm.scheduler.create_scheduler_v2`, EMA :class:`timm.utils.ModelEmaV3`, checkpoints
  :class:`timm.utils.CheckpointSaver` (``last.pth.tar``, ``checkpoint-N.pth.tar``, ``model_best.pth.tar``,
  ``summary.csv``), ``torchrun`` through :func:`timm.utils.init_distributed_device` and
  :func:`~timm.utils.distribute_bn`.

visadapt adds the adapter (:func:`visadapt.integrations.timm_models.create_model` with the family preset; the
classifier trains fully), evaluation before the first step, and the outputs ``adapter/`` (``visadapt.save_adapter``;
``adapter_ema/`` with ``--model-ema``), ``model_merged.safetensors`` (adapters folded in: plain
``timm.create_model(name, num_classes=..., checkpoint_path=...)`` loads it), ``metrics.json``, ``history.json`` and
``curves.png``. Frozen normalization layers (BatchNorm with no trainable parameter) stay in eval mode, so their
running statistics remain the pretrained ones and the saved adapter reproduces the trained model on the original
weights. Epoch ``e`` draws its batch order and augmentation from a seed made of ``--seed``, the rank and ``e``, so
``--resume`` from an epoch checkpoint continues exactly as the uninterrupted run would.

Data besides timm's readers (``--dataset``): ``fashion-mnist`` (the Debian package ``dataset-fashion-mnist``, in
``/usr/share/datasets/fashion-mnist``, ``$FASHION_MNIST_DIR`` or ``--data-dir``) and ``digits`` (scikit-learn's 8×8
digits, 2/3 train by ``--data-seed``); ``--train-size``/``--eval-size`` take seeded random subsets of any source.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import math
import os
import resource
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..core import (
    atomic_write_bytes,
    check_state_dict,
    get_injection,
    inject,
    method_names,
    regularization_loss,
    save_adapter,
)
from ..core.budget import budget_field, match_budget
from ..integrations import timm_models as vtimm

__all__ = ['ArrayImageDataset', 'DatasetView', 'create_datasets', 'create_eval_loader', 'find_fashion_mnist',
           'fashion_mnist_arrays', 'build_parser', 'parse_args', 'create_classifier', 'Trainer', 'setup', 'train',
           'train_one_epoch', 'train_step', 'evaluate', 'finish', 'run', 'main', 'main_with_args', 'PRESETS',
           'SHORT_RECIPE', 'FASHION_MNIST_DIRS', 'FASHION_MNIST_CLASSES', 'MERGED_NAME', 'OWN_DATASETS']

FASHION_MNIST_DIRS = ('/usr/share/datasets/fashion-mnist',)
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')
MERGED_NAME = 'model_merged.safetensors'
OWN_DATASETS = ('fashion-mnist', 'digits')

#: ``--preset`` bundles (flags given explicitly win). ``short`` is a recipe for runs of a few epochs on small images,
#: as the demo and ``visadapt-compare`` use: AdamW without weight decay, a cosine schedule stepped per update with a
#: short warm-up, no label smoothing, a horizontal flip as the only augmentation (the random crop is the whole image:
#: timm's default crop down to 8% is made for long ImageNet schedules; measured on the demo, even a crop down to 70%
#: cost 6 points after 2 epochs, 67.5% against 73.7%), evaluation on the whole image (crop_pct 1).
#: ``demo`` is the README's main job: ``short`` + pretrained EfficientNet-Lite0 + FLoRA on all its convs on a
#: Fashion-MNIST subset, on CPU in a few minutes, with one intra-op thread and one loader worker (these small convs
#: gain little from a second thread, and on a shared 2-core machine a second thread mostly spins).
SHORT_RECIPE: Dict[str, Any] = dict(opt='adamw', weight_decay=0.0, sched='cosine', sched_on_updates=True,
                                    warmup_epochs=0.1, smoothing=0.0, scale=[1.0, 1.0], ratio=[1.0, 1.0],
                                    color_jitter=0.0, train_interpolation='bilinear', crop_pct=1.0)
PRESETS: Dict[str, Dict[str, Any]] = {
    'short': SHORT_RECIPE,
    'demo': dict(SHORT_RECIPE, model='efficientnet_lite0', pretrained='packaged', dataset='fashion-mnist',
                 adapter='{"method": "FLoRA", "r3": 2, "scale": 1.0}', adapter_rank=8, img_size=64, train_size=2000,
                 eval_size=1000, epochs=2, batch_size=32, validation_batch_size=128, lr=2e-3, workers=1, threads=1,
                 seed=0, output='runs', experiment='demo'),
}


# ---- data -----------------------------------------------------------------------------------------------------------
class ArrayImageDataset(torch.utils.data.Dataset):
    """Grey uint8 images held in memory, served as RGB PIL images through ``transform`` (timm's create_loader sets it).

    Args:
        images: uint8 ``(N, H, W)``.
        labels: int ``(N,)``.
        classes: class names, index = label.
        name: the data set's name for reports.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], name: str):
        self.images, self.labels, self.classes, self.name = images, labels, list(classes), name
        self.transform: Optional[Callable] = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        from PIL import Image
        image = Image.fromarray(self.images[index]).convert('RGB')
        return (self.transform(image) if self.transform is not None else image), int(self.labels[index])


class DatasetView(torch.utils.data.Dataset):
    """Items ``indices`` of ``dataset``. ``transform`` is the dataset's own, so timm's create_loader can set it."""

    def __init__(self, dataset: torch.utils.data.Dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    @property
    def transform(self) -> Optional[Callable]:
        return self.dataset.transform

    @transform.setter
    def transform(self, value: Optional[Callable]) -> None:
        self.dataset.transform = value

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]


def find_fashion_mnist() -> str:
    """The Fashion-MNIST directory: ``$FASHION_MNIST_DIR`` or the Debian package's."""
    candidates = [os.environ['FASHION_MNIST_DIR']] if os.environ.get('FASHION_MNIST_DIR') else []
    candidates += list(FASHION_MNIST_DIRS)
    for d in candidates:
        if os.path.isfile(os.path.join(d, 'train-images-idx3-ubyte.gz')):
            return d
    raise FileNotFoundError(f'Fashion-MNIST not found in {candidates}; install the Debian package: '
                            f'sudo apt-get install dataset-fashion-mnist (or set FASHION_MNIST_DIR or --data-dir to a '
                            f'directory holding train-images-idx3-ubyte.gz and friends)')


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, 'rb') as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
    if data[2] != 0x08 or len(data) != 4 + 4 * ndim + math.prod(dims):
        raise ValueError(f'{path!r} is not an uint8 IDX file (corrupt or truncated)')
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@lru_cache(maxsize=4)
def fashion_mnist_arrays(root: str, part: str) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of ``part`` ``'train'`` or ``'test'``; cached (read-only)."""
    prefix = {'train': 'train', 'test': 't10k'}[part]
    for suffix in ('images-idx3-ubyte.gz', 'labels-idx1-ubyte.gz'):
        if not os.path.isfile(os.path.join(root, f'{prefix}-{suffix}')):
            raise FileNotFoundError(f'{root!r} has no {prefix}-{suffix}: not a Fashion-MNIST directory')
    images = _read_idx(os.path.join(root, f'{prefix}-images-idx3-ubyte.gz'))
    labels = _read_idx(os.path.join(root, f'{prefix}-labels-idx1-ubyte.gz')).astype(np.int64)
    return images, labels


def _seeded_order(n: int, seed: int) -> List[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _subset(dataset: Any, size: Optional[int], seed: int) -> Any:
    """A seeded random subset of ``size`` items in their original order (the whole set if ``size`` is None)."""
    if size is None or size >= len(dataset):
        return dataset
    return DatasetView(dataset, sorted(_seeded_order(len(dataset), seed)[:size]))


def _own_datasets(args: argparse.Namespace) -> Tuple[Any, Any]:
    """The train and test sets of ``--dataset fashion-mnist`` or ``digits``."""
    if args.dataset == 'fashion-mnist':
        root = args.data_dir or find_fashion_mnist()
        return tuple(ArrayImageDataset(*fashion_mnist_arrays(root, part), FASHION_MNIST_CLASSES, 'Fashion-MNIST')
                     for part in ('train', 'test'))
    from sklearn.datasets import load_digits
    bunch = load_digits()
    images = (bunch.images * (255.0 / 16.0)).round().astype(np.uint8)
    order = _seeded_order(len(bunch.target), args.data_seed)
    cut = (2 * len(order)) // 3
    return tuple(ArrayImageDataset(images[sorted(part)], bunch.target[sorted(part)].astype(np.int64),
                                   [str(i) for i in range(10)], 'digits') for part in (order[:cut], order[cut:]))


def _timm_datasets(args: argparse.Namespace) -> Tuple[Any, Any]:
    """Train and eval sets from :func:`timm.data.create_dataset`; one folder with no split sub-folders is split
    80/20 by ``--data-seed`` (timm would read the same images for both)."""
    from timm.data import create_dataset
    if not args.data_dir:
        raise ValueError(f"--dataset {args.dataset!r} reads from --data-dir, which is not set; pass --data-dir DIR "
                         f"(e.g. an ImageFolder with train/ and validation/ sub-folders) or use --dataset "
                         f"{' or '.join(OWN_DATASETS)}")
    common = dict(root=args.data_dir, class_map=args.class_map, download=args.dataset_download,
                  batch_size=args.batch_size, seed=args.seed)
    train = create_dataset(args.dataset, split=args.train_split, is_training=True, **common)
    test = create_dataset(args.dataset, split=args.val_split, is_training=False, **common)
    if hasattr(train, 'filenames') and train.filenames() == test.filenames():
        order = _seeded_order(len(train), args.data_seed)
        cut = int(0.8 * len(order))
        train, test = DatasetView(train, sorted(order[:cut])), DatasetView(test, sorted(order[cut:]))
    return train, test


def _class_names(dataset: Any) -> Optional[List[str]]:
    while isinstance(dataset, DatasetView):
        dataset = dataset.dataset
    if getattr(dataset, 'classes', None) is not None:
        return list(dataset.classes)
    class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    return sorted(class_to_idx, key=class_to_idx.get) if class_to_idx else None


def create_datasets(args: argparse.Namespace) -> Tuple[Any, Any, Optional[List[str]], str]:
    """(train set, eval set, class names or None, data set name) for ``--dataset``/``--data-dir``, subsets applied."""
    if args.dataset in OWN_DATASETS:
        train, test = _own_datasets(args)
        name = train.name
    else:
        train, test = _timm_datasets(args)
        name = args.dataset or os.path.basename(os.path.normpath(args.data_dir))
    classes = _class_names(train)
    return _subset(train, args.train_size, args.data_seed), _subset(test, args.eval_size, args.data_seed), classes, name


def _loader_kwargs(args: argparse.Namespace, data_config: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return dict(input_size=data_config['input_size'], interpolation=data_config['interpolation'],
                mean=data_config['mean'], std=data_config['std'], num_workers=args.workers,
                distributed=args.distributed, pin_memory=args.pin_mem, device=device, use_prefetcher=args.prefetcher)


def create_eval_loader(dataset: Any, args: argparse.Namespace, data_config: Dict[str, Any],
                       device: torch.device) -> Any:
    """timm's evaluation loader (resize, centre crop by ``crop_pct``, normalize; ordered distributed sampler)."""
    from timm.data import create_loader
    return create_loader(dataset, batch_size=args.validation_batch_size or args.batch_size, is_training=False,
                         crop_pct=data_config['crop_pct'], **_loader_kwargs(args, data_config, device))


def _create_train_loader(dataset: Any, args: argparse.Namespace, data_config: Dict[str, Any], device: torch.device,
                         collate_fn: Optional[Callable]) -> Any:
    """timm's training loader with its augmentation flags. Workers are started per epoch (not persistent) so that
    their seeds come from the epoch's seed: a resumed run draws the same augmentations as an uninterrupted one."""
    from timm.data import create_loader
    interpolation = data_config['interpolation'] if args.no_aug or not args.train_interpolation \
        else args.train_interpolation
    kwargs = dict(_loader_kwargs(args, data_config, device), interpolation=interpolation)
    return create_loader(
        dataset, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
        re_mode=args.remode, re_count=args.recount, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa, collate_fn=collate_fn,
        persistent_workers=False, **kwargs)


def _mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def _create_mixup(args: argparse.Namespace, num_classes: int) -> Tuple[Optional[Callable], Optional[Callable]]:
    """(collate_fn for the prefetcher, or batch Mixup for the loop): timm's Mixup/CutMix, or (None, None)."""
    if not _mixup_active(args):
        return None, None
    from timm.data import FastCollateMixup, Mixup
    mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=num_classes)
    return (FastCollateMixup(**mixup_args), None) if args.prefetcher else (None, Mixup(**mixup_args))


# ---- model ----------------------------------------------------------------------------------------------------------
def _weights_source(args: argparse.Namespace) -> Any:
    """``create_model``'s ``pretrained``: a file, 'packaged', True (timm's weights) or False."""
    if args.pretrained_path:
        if args.pretrained not in (False, True):
            raise ValueError(f'--pretrained {args.pretrained} and --pretrained-path both name the weights; pass one')
        return args.pretrained_path
    return args.pretrained


def _adapter_spec(text: str) -> Any:
    """``--adapter``: a method name or a JSON dict of config fields with ``method``."""
    if not text.lstrip().startswith('{'):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f'--adapter {text!r} is not valid JSON ({err}); pass a method name or a JSON dict such as '
                         f'\'{{"method": "FLoRA", "r": 8}}\'') from None


def _adapter_config(args: argparse.Namespace, model: nn.Module) -> Tuple[Any, Any]:
    """The config to inject (family preset, then ``--rank`` or ``--budget``) and the budget match (or None)."""
    spec = _adapter_spec(args.adapter)
    config = vtimm.make_config(model, spec, preset=None if args.no_preset else 'auto', mlp=args.mlp, proj=args.proj)
    knob = budget_field(config)
    if args.adapter_rank is not None or args.budget is not None:
        flag = '--rank' if args.adapter_rank is not None else '--budget'
        if knob is None:
            raise ValueError(f'{flag} is set but {config.method} has no rank to set; drop {flag}')
        if isinstance(spec, dict) and knob in spec:
            raise ValueError(f'--adapter sets {knob}={spec[knob]} and {flag} sets it too; pass one of them')
    if args.adapter_rank is not None:
        return dataclasses.replace(config, **{knob: args.adapter_rank}), None
    if args.budget is not None:
        match = match_budget(model, config, args.budget)
        return match.config, match
    return config, None


def create_classifier(args: argparse.Namespace, num_classes: int) -> Tuple[nn.Module, Any, Any]:
    """The timm model with its adapter: (model, injection report, budget match or None).

    Seeded with ``--seed`` alone, so every rank (and the EMA copy) starts from the same weights.
    """
    torch.manual_seed(args.seed)
    kwargs = dict(drop_rate=args.drop, drop_path_rate=args.drop_path, global_pool=args.gp,
                  bn_momentum=args.bn_momentum, bn_eps=args.bn_eps, **args.model_kwargs)
    try:
        model = vtimm.create_model(args.model, pretrained=_weights_source(args), num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError) as err:  # timm's hub download (huggingface_hub raises OSError subclasses)
        if args.pretrained is not True or args.pretrained_path:
            raise
        raise ValueError(f"--pretrained: timm could not get its weights for {args.model!r} ({type(err).__name__}: "
                         f"{str(err)[:200]}); offline, use --pretrained packaged (for {sorted(vtimm.PACKAGED_WEIGHTS)})"
                         f" or --pretrained-path FILE") from None
    if args.initial_checkpoint:
        skipped = vtimm.load_pretrained(model, args.initial_checkpoint)
        if skipped:
            raise ValueError(f'--initial-checkpoint {args.initial_checkpoint!r} holds a classifier of another size '
                             f'({skipped[0]}); set --num-classes to match it, or use --pretrained-path to re-size')
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    config, match = _adapter_config(args, model)
    return model, inject(model, config), match


def _freeze_norm_stats(model: nn.Module) -> None:
    """Eval mode for normalization layers none of whose parameters train (keeps the pretrained statistics)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def _trains_norm_stats(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._NormBase) and any(p.requires_grad for p in m.parameters())
               for m in model.modules())


class RegularizedLoss(nn.Module):
    """timm's criterion plus the adapters' MPC regularizer (:func:`visadapt.core.regularization_loss`), in fp32."""

    def __init__(self, criterion: nn.Module, model: nn.Module):
        super().__init__()
        self.criterion = criterion
        self._model = [model]  # not a submodule: the task already owns the model

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(output, target)
        with torch.autocast(output.device.type, enabled=False):
            return loss + regularization_loss(self._model[0])


# ---- the run ---------------------------------------------------------------------------------------------------------
@dataclass
class Trainer:
    """Everything one run holds; :func:`setup` builds it, :func:`train` runs it, :func:`finish` writes the outputs."""
    args: argparse.Namespace
    device: torch.device
    model: nn.Module                      # the adapted timm model (unwrapped)
    task: Any                             # timm.task.ClassificationTask (DDP inside when distributed)
    report: Any                           # visadapt InjectReport
    match: Any                            # budget match or None
    optimizer: Any
    scheduler: Any
    loss_scaler: Any                      # timm NativeScaler (CUDA fp16) or None
    autocast: Callable[[], Any]
    mixup_fn: Optional[Callable]
    loader_train: Any
    loader_eval: Any
    data_name: str
    num_classes: int
    data_config: Dict[str, Any]
    output_dir: Optional[str]            # primary rank only
    saver: Any = None
    num_epochs: int = 0
    start_epoch: int = 0
    updates_per_epoch: int = 0
    history: Dict[str, Any] = field(default_factory=lambda: {'train_steps': [], 'train_loss': [], 'eval': []})
    step_times: List[float] = field(default_factory=list)
    train_seconds: float = 0.0
    rss_before: float = 0.0

    @property
    def primary(self) -> bool:
        return self.args.rank == 0

    @property
    def ema(self) -> Optional[nn.Module]:
        return self.task.get_trainable_module(ema=True)


def _amp(args: argparse.Namespace, device: torch.device) -> Tuple[Callable[[], Any], Any]:
    """(autocast context factory, loss scaler or None): ``--amp`` is bf16 on CPU, ``--amp-dtype`` (fp16) on CUDA."""
    if not args.amp:
        return nullcontext, None
    name = args.amp_dtype or ('float16' if device.type == 'cuda' else 'bfloat16')
    if name not in ('float16', 'bfloat16'):
        raise ValueError(f"--amp-dtype {name!r} is not valid; use 'float16' or 'bfloat16'")
    if name == 'float16' and device.type != 'cuda':
        raise ValueError(f'--amp-dtype float16 needs CUDA (loss scaling); on {device.type} use --amp-dtype bfloat16')
    dtype = getattr(torch, name)
    scaler = None
    if dtype == torch.float16:
        from timm.utils import NativeScaler
        scaler = NativeScaler(device=device.type)
    return partial(torch.autocast, device_type=device.type, dtype=dtype), scaler


def _create_task(args: argparse.Namespace, model: nn.Module, device: torch.device) -> Any:
    """timm's ClassificationTask with timm's criterion (+ the MPC regularizer when the adapter asks for one)."""
    from timm.loss import create_classification_loss
    from timm.task import ClassificationTask
    criterion = create_classification_loss(loss_type='bce' if args.bce_loss else None, smoothing=args.smoothing,
                                           soft_targets=_mixup_active(args), bce_target_thresh=args.bce_target_thresh)
    if getattr(get_injection(model, 'default').config, 'mpc', None) in ('o', 'd'):
        criterion = RegularizedLoss(criterion, model)
    return ClassificationTask(model, criterion=criterion, device=device, verbose=False)


def _read_resume_checkpoint(args: argparse.Namespace, model: nn.Module) -> Dict[str, Any]:
    """The ``--resume`` checkpoint, checked before anything is loaded: made with the same model/adapter/data settings,
    and its ``state_dict`` (and ``state_dict_ema``) match the model key by key (the core's validator)."""
    from timm.utils.checkpoint_saver import load_checkpoint_metadata
    if not os.path.isfile(args.resume):
        raise FileNotFoundError(f'--resume {args.resume!r}: no such checkpoint (timm writes OUTPUT/EXPERIMENT/'
                                f'last.pth.tar)')
    checkpoint = load_checkpoint_metadata(args.resume)
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint:
        raise ValueError(f'--resume {args.resume!r} is not a timm training checkpoint (no state_dict entry)')
    saved = vars(checkpoint.get('args') or argparse.Namespace())
    diff = [k for k in _RESUME_KEYS if k in saved and saved[k] != getattr(args, k)]
    if diff:
        raise ValueError(f'--resume: {args.resume!r} was made with other settings: '
                         + ', '.join(f'--{k.replace("_", "-")} {saved[k]!r} (now {getattr(args, k)!r})' for k in diff))
    expected = model.state_dict()
    for key in ('state_dict', 'state_dict_ema'):
        if checkpoint.get(key) is not None:
            check_state_dict(expected, checkpoint[key], f'{args.resume!r} ({key})')
    return checkpoint


#: settings a resumed run must share with the checkpoint's (the model, its adapter and the data)
_RESUME_KEYS = ('model', 'pretrained', 'pretrained_path', 'initial_checkpoint', 'adapter', 'adapter_rank', 'budget',
                'mlp', 'proj', 'no_preset', 'model_kwargs', 'num_classes', 'dataset', 'data_dir', 'train_split',
                'img_size', 'train_size', 'eval_size', 'data_seed')


def _resume(tr: Trainer) -> int:
    """Load ``--resume`` (model, optimizer, loss scaler, EMA, checkpoint history) and return the epoch to start at."""
    from timm.task import load_task_ema_checkpoint, resume_task_checkpoint
    args = tr.args
    checkpoint = _read_resume_checkpoint(args, tr.model)
    resume_epoch = resume_task_checkpoint(tr.task, args.resume, optimizer=None if args.no_resume_opt else tr.optimizer,
                                          loss_scaler=None if args.no_resume_opt else tr.loss_scaler,
                                          log_info=False)
    _setup_ema(tr)  # after the model state, as timm's train.py: a checkpoint without EMA starts it from there
    if tr.ema is not None and checkpoint.get('state_dict_ema') is not None:
        load_task_ema_checkpoint(tr.task, args.resume)
    if tr.saver is not None and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(tr.output_dir):
        tr.saver.load_state_dict_from_checkpoint(args.resume)
    tr.history = _load_history(tr.output_dir, resume_epoch) if tr.output_dir else tr.history
    if tr.primary:
        print(f'resumed from {args.resume} (epoch {checkpoint.get("epoch")}): continuing at epoch {resume_epoch}',
              flush=True)
    return resume_epoch or 0


def _load_history(output_dir: str, start_epoch: int) -> Dict[str, Any]:
    """``history.json`` of the run being resumed, cut back to what happened before ``start_epoch``."""
    path = os.path.join(output_dir, 'history.json')
    history: Dict[str, Any] = {'train_steps': [], 'train_loss': [], 'eval': []}
    if not os.path.isfile(path):
        return history
    with open(path) as f:
        saved = json.load(f)
    evals = [e for e in saved['eval'] if e['epoch'] <= start_epoch]
    last_step = evals[-1]['step'] if evals else 0
    keep = [i for i, s in enumerate(saved['train_steps']) if s <= last_step]
    history.update(eval=evals, train_steps=[saved['train_steps'][i] for i in keep],
                   train_loss=[saved['train_loss'][i] for i in keep])
    return history


def _create_loaders(args, train_set, eval_set, model, device, num_classes) -> Tuple[Any, Any, Any, Any]:
    """(data config, train loader, eval loader, batch mixup fn or None) from timm's data factories."""
    from timm.data import resolve_data_config
    data_config = resolve_data_config(vars(args), model=model, verbose=False)
    collate_fn, mixup_fn = _create_mixup(args, num_classes)
    loader_train = _create_train_loader(train_set, args, data_config, device, collate_fn)
    loader_eval = create_eval_loader(eval_set, args, data_config, device)
    if len(loader_train) == 0:
        raise ValueError(f'{len(train_set)} training images make no full batch of {args.batch_size} per process; '
                         f'lower -b/--batch-size or use more images')
    return data_config, loader_train, loader_eval, mixup_fn


def _num_classes(args: argparse.Namespace, classes: Optional[List[str]]) -> int:
    if classes is None and args.num_classes is None:
        raise ValueError(f'the class count of --dataset {args.dataset!r} is unknown; pass --num-classes')
    if args.num_classes is not None and classes is not None and args.num_classes < len(classes):
        raise ValueError(f'--num-classes {args.num_classes} is fewer than the {len(classes)} classes of the data')
    return args.num_classes or len(classes)


def setup(args: argparse.Namespace) -> Trainer:
    """Devices and processes, data, model + adapter, optimizer, AMP, task, EMA, DDP, schedule, checkpoints, resume."""
    vtimm.has_timm(necessary=True)
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.utils import init_distributed_device, random_seed

    from ._optim import fused_adam_kwargs
    if args.threads:
        torch.set_num_threads(args.threads)
    device = init_distributed_device(args)
    train_set, eval_set, classes, data_name = create_datasets(args)
    num_classes = _num_classes(args, classes)
    model, report, match = create_classifier(args, num_classes)
    model.to(device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    random_seed(args.seed, args.rank)
    data_config, loader_train, loader_eval, mixup_fn = _create_loaders(args, train_set, eval_set, model, device,
                                                                       num_classes)
    opt_kwargs = {**optimizer_kwargs(cfg=args), **args.opt_kwargs}
    if str(args.opt).lower() in ('adam', 'adamw'):  # torch's own Adam(W): its fused kernel (visadapt/apps/_optim.py)
        opt_kwargs.update(fused_adam_kwargs((p for p in model.parameters() if p.requires_grad), opt_kwargs))
    optimizer = create_optimizer_v2(model, **opt_kwargs)
    autocast, loss_scaler = _amp(args, device)
    tr = Trainer(args=args, device=device, model=model, task=_create_task(args, model, device), report=report,
                 match=match, optimizer=optimizer, scheduler=None, loss_scaler=loss_scaler, autocast=autocast,
                 mixup_fn=mixup_fn, loader_train=loader_train, loader_eval=loader_eval, data_name=data_name,
                 num_classes=num_classes, data_config=data_config, output_dir=_output_dir(args, data_config))
    _setup_schedule_and_saver(tr)
    return tr


def _output_dir(args: argparse.Namespace, data_config: Dict[str, Any]) -> Optional[str]:
    """timm's layout: ``--output``/``--experiment`` (default: date-model-size), made by the primary rank only."""
    if args.rank != 0:
        return None
    from timm.models import safe_model_name
    from timm.utils import get_outdir
    name = args.experiment or '-'.join([time.strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model),
                                        str(data_config['input_size'][-1])])
    return get_outdir(args.output or './output/train', name)


def _setup_schedule_and_saver(tr: Trainer) -> None:
    """timm's scheduler and CheckpointSaver (primary rank), then ``--resume``, the EMA, ``--torchcompile`` and DDP, as
    timm orders them."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm.utils import CheckpointSaver
    args = tr.args
    tr.updates_per_epoch = len(tr.loader_train)
    tr.scheduler, tr.num_epochs = create_scheduler_v2(tr.optimizer, **scheduler_kwargs(args),
                                                      updates_per_epoch=tr.updates_per_epoch)
    if tr.primary:
        tr.saver = CheckpointSaver(tr.model, tr.optimizer, args=args, amp_scaler=tr.loss_scaler,
                                   checkpoint_dir=tr.output_dir, recovery_dir=tr.output_dir,
                                   decreasing=args.eval_metric == 'loss', max_history=args.checkpoint_hist,
                                   task=tr.task)
        import yaml
        atomic_write_bytes(os.path.join(tr.output_dir, 'args.yaml'),  # as timm's train.py
                           yaml.safe_dump(_args_dict(args), default_flow_style=False).encode())
    if args.resume:
        tr.start_epoch = _resume(tr)
    else:
        _setup_ema(tr)
    if tr.scheduler is not None and tr.start_epoch > 0:
        if args.sched_on_updates:
            tr.scheduler.step_update(tr.start_epoch * tr.updates_per_epoch)
        else:
            tr.scheduler.step(tr.start_epoch)
    if args.torchcompile:  # timm's task compiles before the DDP wrap; tr.model stays the eager module (saving)
        tr.task.compile(backend=args.torchcompile, mode=args.torchcompile_mode)
    if args.distributed:
        tr.task.prepare_distributed(device_ids=[tr.device] if tr.device.type == 'cuda' else None,
                                    **({'broadcast_buffers': False} if args.no_ddp_bb else {}))


def _setup_ema(tr: Trainer) -> None:
    """``--model-ema``: timm's ModelEmaV3 copy of the adapted model (adapter tensors are ordinary model state)."""
    args = tr.args
    if args.model_ema:
        tr.task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                          device=torch.device('cpu') if args.model_ema_force_cpu else None)


def _args_dict(args: argparse.Namespace) -> Dict[str, Any]:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}


# ---- training and evaluation -----------------------------------------------------------------------------------------
def _epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s batch order and augmentation (timm's random_seed adds the rank)."""
    return seed + 10_007 * (epoch + 1)


def _to_device(tr: Trainer, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs on the device (the prefetcher already did that), channels-last if asked."""
    if not tr.args.prefetcher:
        x, y = x.to(tr.device), y.to(tr.device)
    if tr.args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def train_step(tr: Trainer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One update: forward + loss (timm's task, under autocast), backward, clipping, optimizer step."""
    args = tr.args
    t0 = time.perf_counter()
    with tr.autocast():
        loss = tr.task(x, y)['loss']
    clip_params = tr.task.get_clip_parameters(exclude_head='agc' in args.clip_mode)
    if tr.loss_scaler is not None:
        tr.loss_scaler(loss, tr.optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode, parameters=clip_params)
    else:
        loss.backward()
        if args.clip_grad is not None:
            from timm.utils import dispatch_clip_grad
            dispatch_clip_grad(clip_params, value=args.clip_grad, mode=args.clip_mode)
        tr.optimizer.step()
    tr.optimizer.zero_grad(set_to_none=True)
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f'the training loss is {value} at update {len(tr.step_times) + 1}; lower --lr '
                                 f'(now {args.lr}) or use --clip-grad')
    if tr.device.type == 'cuda':
        torch.cuda.synchronize(tr.device)
    tr.step_times.append(time.perf_counter() - t0)
    return value


def train_one_epoch(tr: Trainer, epoch: int) -> Dict[str, float]:
    """One pass over the training loader (timm's loop: mixup, EMA update, per-update schedule, log lines)."""
    args = tr.args
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if tr.mixup_fn is not None:
            tr.mixup_fn.mixup_enabled = False
        elif hasattr(tr.loader_train, 'mixup_enabled'):
            tr.loader_train.mixup_enabled = False
    tr.task.train()
    _freeze_norm_stats(tr.model)
    num_updates, loss_sum = epoch * tr.updates_per_epoch, 0.0
    for batch_idx, (x, y) in enumerate(tr.loader_train):
        x, y = _to_device(tr, x, y)
        if tr.mixup_fn is not None:
            x, y = tr.mixup_fn(x, y)
        loss = train_step(tr, x, y)
        num_updates += 1
        loss_sum += loss
        tr.task.update_ema(step=num_updates)
        tr.history['train_steps'].append(num_updates)
        tr.history['train_loss'].append(loss)
        if tr.primary and (batch_idx % args.log_interval == 0 or batch_idx == tr.updates_per_epoch - 1):
            lr = sum(g['lr'] for g in tr.optimizer.param_groups) / len(tr.optimizer.param_groups)
            print(f'Train: {epoch} [{batch_idx:>4d}/{tr.updates_per_epoch}]  Loss: {loss:#.3g} '
                  f'({loss_sum / (batch_idx + 1):#.3g})  Time: {tr.step_times[-1]:.3f}s  LR: {lr:.3e}', flush=True)
        if tr.scheduler is not None:
            tr.scheduler.step_update(num_updates=num_updates, metric=loss_sum / (batch_idx + 1))
    return OrderedDict(loss=loss_sum / max(1, tr.updates_per_epoch))


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, *, autocast: Callable[[], Any] = nullcontext,
             prefetcher: bool = True, channels_last: bool = False, distributed: bool = False) -> Dict[str, float]:
    """timm's ClassificationEvaluator over ``loader``: ``{'loss', 'top1', 'top5'}`` (percentages), all ranks summed.
    Leaves ``model`` in eval mode."""
    from timm.task import ClassificationEvaluator, evaluation_sample_limit
    model.eval()
    evaluator = ClassificationEvaluator(device, max_samples=evaluation_sample_limit(loader))
    for x, y in loader:
        if not prefetcher:
            x, y = x.to(device), y.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            output = model(x)
        evaluator.update(output, y)
    return evaluator.compute(distributed=distributed)


def _validate(tr: Trainer, model: nn.Module) -> Dict[str, float]:
    return evaluate(model, tr.loader_eval, tr.device, autocast=tr.autocast, prefetcher=tr.args.prefetcher,
                    channels_last=tr.args.channels_last, distributed=tr.args.distributed)


def _record_eval(tr: Trainer, epoch: int, metrics: Dict[str, float], ema: Optional[Dict[str, float]],
                 seconds: float) -> None:
    entry = {'step': epoch * tr.updates_per_epoch, 'epoch': epoch, 'accuracy': metrics['top1'] / 100,
             'loss': metrics['loss'], 'top5': metrics['top5'] / 100, 'seconds': seconds}
    if ema is not None:
        entry.update(ema_accuracy=ema['top1'] / 100, ema_loss=ema['loss'])
    tr.history['eval'].append(entry)
    if tr.primary:
        text = f"epoch {epoch} (step {entry['step']}): test accuracy {metrics['top1']:.2f}%, loss {metrics['loss']:.4f}"
        print(text + (f"; EMA {ema['top1']:.2f}%, loss {ema['loss']:.4f}" if ema else ''), flush=True)
        atomic_write_bytes(os.path.join(tr.output_dir, 'history.json'), json.dumps(tr.history).encode())


def _end_of_epoch(tr: Trainer, epoch: int, train_metrics: Dict[str, float]) -> None:
    """Distribute BN statistics, evaluate (model and EMA), write summary.csv and the checkpoints, step the schedule."""
    from timm.utils import distribute_bn, update_summary
    args = tr.args
    if args.distributed and args.dist_bn in ('broadcast', 'reduce') and _trains_norm_stats(tr.model):
        distribute_bn(tr.model, args.world_size, args.dist_bn == 'reduce')
    t0 = time.time()
    metrics = _validate(tr, tr.model)
    ema = None
    if tr.ema is not None and not args.model_ema_force_cpu:
        if args.distributed and args.dist_bn in ('broadcast', 'reduce') and _trains_norm_stats(tr.model):
            distribute_bn(tr.ema, args.world_size, args.dist_bn == 'reduce')
        ema = _validate(tr, tr.ema.module)
    _record_eval(tr, epoch + 1, metrics, ema, time.time() - t0)
    ranked = ema or metrics
    if tr.saver is not None:
        lrs = [g['lr'] for g in tr.optimizer.param_groups]
        update_summary(epoch, train_metrics, ranked, filename=os.path.join(tr.output_dir, 'summary.csv'),
                       lr=sum(lrs) / len(lrs))
        tr.saver.save_checkpoint(epoch, metric=ranked[args.eval_metric])
    if tr.scheduler is not None:
        tr.scheduler.step(epoch + 1, ranked[args.eval_metric])


def train(args: argparse.Namespace) -> Trainer:
    """Set up and train; returns the trainer (its model holds the trained adapter on every rank)."""
    from timm.utils import random_seed, trim_summary
    tr = setup(args)
    if tr.primary:
        print(tr.report, flush=True)
        if tr.match is not None:
            print(f'budget: {tr.match}', flush=True)
        _print_plan(tr)
        trim_summary(os.path.join(tr.output_dir, 'summary.csv'), tr.start_epoch)
    if tr.start_epoch == 0 and not tr.history['eval']:
        t0 = time.time()
        before = _validate(tr, tr.model)
        if not math.isfinite(before['loss']):
            raise FloatingPointError(f"the test loss is {before['loss']} before any training step: the adapted "
                                     f'{args.model} gives non-finite outputs (NaN/Inf weights or a method bug)')
        _record_eval(tr, 0, before, None, time.time() - t0)
    tr.rss_before = _rss_mb()
    t_train = time.time()
    for epoch in range(tr.start_epoch, tr.num_epochs):
        random_seed(_epoch_seed(args.seed, epoch), args.rank)
        if args.distributed and hasattr(tr.loader_train.sampler, 'set_epoch'):
            tr.loader_train.sampler.set_epoch(epoch)
        train_metrics = train_one_epoch(tr, epoch)
        _end_of_epoch(tr, epoch, train_metrics)
    tr.train_seconds = time.time() - t_train
    return tr


def _print_plan(tr: Trainer) -> None:
    args = tr.args
    amp = f' with {tr.autocast.keywords["dtype"]} autocast' if isinstance(tr.autocast, partial) else ''
    size = 'x'.join(str(s) for s in tr.data_config['input_size'][1:])
    print(f'data: {tr.data_name}, {len(tr.loader_train.dataset):,} train / {len(tr.loader_eval.dataset):,} test '
          f'images at {size}, {tr.num_classes} classes; {tr.num_epochs} epochs of {tr.updates_per_epoch} updates '
          f'(batch {args.batch_size} x {args.world_size} process{"es" if args.world_size > 1 else ""}) on '
          f'{tr.device}{amp}; {args.workers} loader worker(s); output {tr.output_dir}', flush=True)


# ---- outputs ---------------------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    """Current resident set size in MB (Linux /proc; falls back to the peak)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20
    except OSError:
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _plain_timm_call(tr: Trainer, path: str) -> str:
    """The ``timm.create_model`` call that rebuilds the trained model from the merged checkpoint."""
    args = tr.args
    kwargs = dict(vtimm.PACKAGED_WEIGHTS[args.model].model_kwargs) if args.pretrained == 'packaged' else {}
    kwargs.update({k: v for k, v in (('bn_eps', args.bn_eps), ('global_pool', args.gp)) if v is not None})
    kwargs.update(args.model_kwargs)
    extra = ''.join(f', {k}={v!r}' for k, v in kwargs.items())
    return f'timm.create_model({args.model!r}, num_classes={tr.num_classes}{extra}, checkpoint_path={path!r})'


def _write_merged(tr: Trainer) -> Dict[str, Any]:
    path = os.path.join(tr.output_dir, MERGED_NAME)
    try:
        vtimm.save_merged_checkpoint(tr.model, path)
    except ValueError as err:  # an adapter with no weight form: the adapter/ files are the result then
        print(f'merged checkpoint: not written ({err})', flush=True)
        return {'path': None, 'why_not': str(err)}
    cfg = tr.data_config
    return {'path': path, 'load': _plain_timm_call(tr, path),
            'data_config': {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}}


def _metrics(tr: Trainer, merged: Dict[str, Any], t_start: float) -> Dict[str, Any]:
    args, history = tr.args, tr.history
    config = get_injection(tr.model, 'default').config
    trainable = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
    before, after = history['eval'][0], history['eval'][-1]
    timed = tr.step_times[2:] if len(tr.step_times) > 4 else tr.step_times  # the first steps include warm-up
    cuda = tr.device.type == 'cuda'
    return {
        'model': args.model, 'pretrained': _weights_source(args), 'data': tr.data_name, 'num_classes': tr.num_classes,
        'train_images': len(tr.loader_train.dataset), 'test_images': len(tr.loader_eval.dataset),
        'image_size': tr.data_config['input_size'][-1], 'method': config.method, 'config': config.to_dict(),
        'budget': None if tr.match is None else {'target': tr.match.target, 'achieved': tr.match.achieved,
                                                 'field': tr.match.field, 'value': tr.match.value},
        'adapted_layers': len(tr.report.layers), 'adapter_params': tr.report.adapter_params,
        'trainable_params': trainable, 'total_params': sum(p.numel() for p in tr.model.parameters()),
        'steps': after['step'], 'epochs': after['epoch'], 'batch_size': args.batch_size, 'world_size': args.world_size,
        'lr': args.lr, 'seed': args.seed, 'device': str(tr.device), 'amp': str(tr.autocast.keywords['dtype'])
        if isinstance(tr.autocast, partial) else 'none',
        'accuracy_before': before['accuracy'], 'accuracy_after': after['accuracy'],
        'ema_accuracy_after': after.get('ema_accuracy'), 'best_accuracy': max(e['accuracy'] for e in history['eval']),
        'step_time_s': float(np.mean(timed)) if timed else None, 'train_seconds': tr.train_seconds,
        'peak_memory_mb': torch.cuda.max_memory_allocated(tr.device) / 2 ** 20 if cuda else _peak_rss_mb(),
        'peak_memory_kind': 'cuda_max_allocated' if cuda else 'process_peak_rss',
        'train_memory_mb': None if cuda else max(0.0, _peak_rss_mb() - tr.rss_before),
        'merged_checkpoint': merged, 'eval': history['eval'], 'args': _args_dict(args),
        'total_seconds': time.time() - t_start,
    }


def finish(tr: Trainer, t_start: float) -> Optional[Dict[str, Any]]:
    """Primary rank: write ``adapter/`` (+ ``adapter_ema/``), the merged checkpoint, ``metrics.json``, ``curves.png``
    and print the summary; returns the metrics (None on other ranks)."""
    if not tr.primary:
        return None
    out = tr.output_dir
    save_adapter(tr.model, os.path.join(out, 'adapter'))
    if tr.ema is not None:
        save_adapter(tr.ema.module, os.path.join(out, 'adapter_ema'))
    metrics = _metrics(tr, _write_merged(tr), t_start)
    atomic_write_bytes(os.path.join(out, 'metrics.json'), json.dumps(metrics, indent=2).encode())
    _plot_curves(os.path.join(out, 'curves.png'), tr.history,
                 f"{metrics['model']} + {metrics['method']} on {metrics['data']} "
                 f"({metrics['trainable_params']:,} trainable parameters)")
    _print_summary(metrics, out)
    return metrics


def _plot_curves(path: str, history: Dict[str, Any], title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps, losses = history['train_steps'], history['train_loss']
    if losses:
        ax1.plot(steps, losses, lw=0.6, alpha=0.4, label='train loss (per step)')
        k = max(1, len(losses) // 25)
        ax1.plot(steps[k - 1:], np.convolve(losses, np.ones(k) / k, mode='valid'), lw=1.6,
                 label=f'train loss ({k}-step mean)')
    ev = history['eval']
    ax1.plot([e['step'] for e in ev], [e['loss'] for e in ev], 'o-', label='test loss')
    ax1.set_xlabel('step'), ax1.set_ylabel('loss'), ax1.legend(fontsize=8), ax1.grid(alpha=0.3)
    ax2.plot([e['step'] for e in ev], [100 * e['accuracy'] for e in ev], 'o-', color='C2', label='model')
    if any('ema_accuracy' in e for e in ev):
        ax2.plot([e['step'] for e in ev if 'ema_accuracy' in e],
                 [100 * e['ema_accuracy'] for e in ev if 'ema_accuracy' in e], 's--', color='C3', label='EMA')
        ax2.legend(fontsize=8)
    ax2.set_xlabel('step'), ax2.set_ylabel('test accuracy (%)'), ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _fmt_seconds(s: float) -> str:
    return f'{int(s // 60)}m{s % 60:04.1f}s' if s >= 60 else f'{s:.1f}s'


def _first_eval_text(m: Dict[str, Any]) -> str:
    """What the first evaluation of the run measured."""
    if m['eval'][0]['step']:
        return f"step {m['eval'][0]['step']}: the first evaluation after resuming"
    if m['args'].get('initial_checkpoint'):
        return 'step 0: the --initial-checkpoint model'
    backbone = 'random-init' if m['pretrained'] is False else 'pretrained'
    return f"step 0: {backbone} backbone, freshly initialized {m['num_classes']}-class head"


def _print_summary(m: Dict[str, Any], out: str) -> None:
    head = m['trainable_params'] - m['adapter_params']
    cfg = m['config']
    knobs = ', '.join(f'{k}={cfg[k]}' for k in ('r', 'r3', 'scale', 'alpha', 'split', 'conv_form', 'pattern')
                      if k in cfg and cfg[k] is not None)
    ema = f", EMA {100 * m['ema_accuracy_after']:.2f}%" if m['ema_accuracy_after'] is not None else ''
    merged = m['merged_checkpoint']
    lines = [
        '', '=== visadapt-train-classifier: summary ===',
        f"model       {m['model']} (pretrained: {m['pretrained']}), {m['total_params']:,} parameters",
        f"method      {m['method']}{f' ({knobs})' if knobs else ''} on {m['adapted_layers']} layers",
        f"trainable   {m['trainable_params']:,} = adapter {m['adapter_params']:,} + fully trained {head:,} "
        f"({100 * m['trainable_params'] / m['total_params']:.2f}% of the model)",
        f"data        {m['data']}: {m['train_images']:,} train / {m['test_images']:,} test images at "
        f"{m['image_size']}x{m['image_size']}, {m['num_classes']} classes",
        f"accuracy    before {100 * m['accuracy_before']:.2f}% ({_first_eval_text(m)})  ->  after "
        f"{100 * m['accuracy_after']:.2f}%{ema} ({m['epochs']} epoch{'s' if m['epochs'] != 1 else ''}, "
        f"{m['steps']} steps)",
        f"time        {_fmt_seconds(m['total_seconds'])} in total, training {_fmt_seconds(m['train_seconds'])} "
        f"({m['step_time_s']:.3f} s/step), on {m['device']}",
        f"memory      peak {m['peak_memory_mb']:.0f} MB ({m['peak_memory_kind'].replace('_', ' ')})",
        f'outputs     {out}/: adapter/, {MERGED_NAME if merged["path"] else "(no merged checkpoint)"}, '
        f'last.pth.tar, summary.csv, metrics.json, curves.png',
    ]
    if merged['path']:
        cfg = merged['data_config']
        lines += [f"plain timm  {merged['load']}",
                  f"  inputs    {cfg['input_size'][-1]}x{cfg['input_size'][-1]}, {cfg['interpolation']}, crop_pct "
                  f"{cfg['crop_pct']}, mean {tuple(cfg['mean'])}, std {tuple(cfg['std'])}"]
    print('\n'.join(lines), flush=True)


def run(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """One training run as configured by :func:`build_parser`'s arguments; returns the metrics (primary rank)."""
    t_start = time.time()
    tr = train(args)
    try:
        return finish(tr, t_start)
    finally:
        if args.distributed:
            torch.distributed.destroy_process_group()


# ---- command line ----------------------------------------------------------------------------------------------------
def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Dataset parameters')
    g.add_argument('--data-dir', metavar='DIR', help='path to the dataset root (timm); for fashion-mnist: its '
                   'directory (default: $FASHION_MNIST_DIR or the Debian package)')
    g.add_argument('--dataset', metavar='NAME', default='',
                   help="'fashion-mnist' or 'digits' (offline sets), or a timm dataset type + name "
                        "(default: ImageFolder/ImageTar in --data-dir)")
    g.add_argument('--train-split', metavar='NAME', default='train')
    g.add_argument('--val-split', metavar='NAME', default='validation')
    g.add_argument('--dataset-download', action='store_true', help='let timm download torch/ and tfds/ datasets')
    g.add_argument('--class-map', default='', metavar='FILENAME', help='class to index mapping file (timm)')
    g.add_argument('--train-size', type=int, help='visadapt: a random training subset of this size')
    g.add_argument('--eval-size', type=int, help='visadapt: a random evaluation subset of this size')
    g.add_argument('--data-seed', type=int, default=0, help='visadapt: seed of the subsets and splits')


def _kwargs_action() -> Any:
    """timm's key=value parser; without timm (``--help`` only: a run stops at ``has_timm``) a plain list."""
    try:
        from timm.utils import ParseKwargs
    except ImportError:
        return 'store'
    return ParseKwargs


def _pretrained_value(value: str) -> str:
    if value != 'packaged':
        raise argparse.ArgumentTypeError(f"{value!r} is not valid: --pretrained takes no value (timm's weights) or "
                                         f"'packaged'; a checkpoint file goes to --pretrained-path")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Model parameters')
    g.add_argument('--model', default='efficientnet_lite0', metavar='MODEL', help='timm architecture name')
    g.add_argument('--pretrained', nargs='?', const=True, default=False, type=_pretrained_value, metavar='packaged',
                   help="timm's pretrained weights (its hub/cache); '--pretrained packaged': ImageNet weights "
                        f'shipped in pip packages, offline ({", ".join(sorted(vtimm.PACKAGED_WEIGHTS))})')
    g.add_argument('--pretrained-path', metavar='PATH',
                   help='a local checkpoint loaded as the pretrained weights (a classifier of another size is '
                        're-initialized)')
    g.add_argument('--initial-checkpoint', default='', metavar='PATH', help='load this full model checkpoint')
    g.add_argument('--resume', default='', metavar='PATH', help='resume model, adapter, optimizer and EMA state '
                   'from a checkpoint (OUTPUT/EXPERIMENT/last.pth.tar)')
    g.add_argument('--no-resume-opt', action='store_true', help='do not resume the optimizer state')
    g.add_argument('--num-classes', type=int, metavar='N', help='classifier size (default: the data set\'s classes)')
    g.add_argument('--gp', metavar='POOL', help='global pool type (model default if not set)')
    g.add_argument('--img-size', type=int, metavar='N', help='image size (model default if not set)')
    g.add_argument('--crop-pct', type=float, metavar='N', help='evaluation centre crop fraction')
    g.add_argument('--mean', type=float, nargs='+', metavar='MEAN', help='override the normalization mean')
    g.add_argument('--std', type=float, nargs='+', metavar='STD', help='override the normalization std')
    g.add_argument('--interpolation', default='', metavar='NAME', help='resize interpolation (model default)')
    g.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='batch size per process')
    g.add_argument('-vb', '--validation-batch-size', type=int, metavar='N', help='evaluation batch size')
    g.add_argument('--channels-last', action='store_true', help='channels_last memory layout')
    g.add_argument('--grad-checkpointing', action='store_true', help='gradient checkpointing through blocks')
    g.add_argument('--torchcompile', nargs='?', const='inductor', metavar='BACKEND',
                   help='torch.compile the adapted model with this backend (inductor without a value), as timm')
    g.add_argument('--torchcompile-mode', metavar='MODE', help='torch.compile mode')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=_kwargs_action(), help='key=value pairs for '
                   'timm.create_model, e.g. img_size=32 patch_size=4')


def _add_adapter_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Adapter parameters (visadapt)')
    g.add_argument('--adapter', default='FLoRA',
                   help='a registered method name (its defaults) or a JSON dict of config fields, e.g. '
                        f'\'{{"method": "FLoRA", "r3": 2}}\'; methods: {method_names()}')
    size = g.add_mutually_exclusive_group()
    size.add_argument('--rank', type=int, dest='adapter_rank',  # args.rank is timm's process rank
                      help="the method's rank (its budget field, usually r)")
    size.add_argument('--budget', type=int, help='target adapter parameters: the rank is matched to it')
    g.add_argument('--mlp', action='store_true', help='family preset: also adapt MLP layers (ConvNeXt, ViT)')
    g.add_argument('--proj', action='store_true', help='family preset: also adapt attn.proj (ViT)')
    g.add_argument('--no-preset', action='store_true', help='use the adapter config as given (no family preset)')


def _add_optim_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Optimizer and learning rate schedule parameters')
    g.add_argument('--opt', default='adamw', metavar='OPTIMIZER', help='timm optimizer name (timm default: sgd)')
    g.add_argument('--opt-eps', type=float, metavar='EPSILON')
    g.add_argument('--opt-betas', type=float, nargs='+', metavar='BETA')
    g.add_argument('--momentum', type=float, default=0.9, metavar='M')
    g.add_argument('--weight-decay', type=float, default=2e-5)
    g.add_argument('--clip-grad', type=float, metavar='NORM', help='clip gradients (default: no clipping)')
    g.add_argument('--clip-mode', default='norm', help="'norm', 'value' or 'agc'")
    g.add_argument('--layer-decay', type=float, help='layer-wise learning rate decay')
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=_kwargs_action())
    g.add_argument('--sched', default='cosine', metavar='SCHEDULER', help="timm scheduler name, or 'none'")
    g.add_argument('--sched-on-updates', action='store_true', help='step the schedule every update, not every epoch')
    g.add_argument('--lr', type=float, default=2e-3, metavar='LR', help='learning rate (timm: derived from --lr-base)')
    g.add_argument('--min-lr', type=float, default=0.0, metavar='LR')
    g.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR')
    g.add_argument('--epochs', type=int, default=10, metavar='N', help='epochs to train (timm default: 300)')
    g.add_argument('--warmup-epochs', type=float, default=0, metavar='N',
                   help='linear warm-up epochs; fractions work with --sched-on-updates (timm default: 5)')
    g.add_argument('--warmup-prefix', action='store_true', help='exclude the warm-up from the decay schedule')
    g.add_argument('--cooldown-epochs', type=int, default=0, metavar='N')
    g.add_argument('--decay-epochs', type=float, default=90, metavar='N')
    g.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270], metavar='MILESTONES')
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE')


def _add_aug_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Augmentation and regularization parameters')
    g.add_argument('--no-aug', action='store_true', help='no training augmentation')
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT')
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO')
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.0)
    g.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT')
    g.add_argument('--aa', metavar='NAME', help='AutoAugment / RandAugment policy')
    g.add_argument('--reprob', type=float, default=0.0, metavar='PCT', help='random erase probability')
    g.add_argument('--remode', default='pixel')
    g.add_argument('--recount', type=int, default=1)
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (on if > 0)')
    g.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (on if > 0)')
    g.add_argument('--cutmix-minmax', type=float, nargs='+')
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', default='batch', help="'batch', 'pair' or 'elem'")
    g.add_argument('--mixup-off-epoch', type=int, default=0, metavar='N')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--bce-loss', action='store_true', help='binary cross-entropy loss')
    g.add_argument('--bce-target-thresh', type=float)
    g.add_argument('--train-interpolation', default='random')
    g.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    g.add_argument('--drop-path', type=float, metavar='PCT', help='drop path rate')
    g.add_argument('--bn-momentum', type=float)
    g.add_argument('--bn-eps', type=float)
    g.add_argument('--dist-bn', default='reduce', help="distribute trained BatchNorm statistics after each epoch "
                   "('broadcast', 'reduce' or '')")
    g.add_argument('--model-ema', action='store_true', help='track an exponential moving average of the weights')
    g.add_argument('--model-ema-force-cpu', action='store_true')
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g.add_argument('--model-ema-warmup', action='store_true')


def _add_misc_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('Miscellaneous parameters')
    g.add_argument('--seed', type=int, default=42, metavar='S')
    g.add_argument('--log-interval', type=int, default=50, metavar='N')
    g.add_argument('--checkpoint-hist', type=int, default=10, metavar='N')
    g.add_argument('-j', '--workers', type=int, default=4, metavar='N', help='DataLoader worker processes')
    g.add_argument('--amp', action='store_true', help='mixed precision: bfloat16 on CPU, --amp-dtype on CUDA')
    g.add_argument('--amp-dtype', help="'float16' (CUDA default, with loss scaling) or 'bfloat16' (CPU default)")
    g.add_argument('--no-ddp-bb', action='store_true', help='no buffer broadcast in DistributedDataParallel')
    g.add_argument('--pin-mem', action='store_true')
    g.add_argument('--no-prefetcher', action='store_true', help="disable timm's prefetcher")
    g.add_argument('--output', default='', metavar='PATH', help='output folder (default: ./output/train)')
    g.add_argument('--experiment', default='', metavar='NAME', help='sub-folder of --output for this run')
    g.add_argument('--eval-metric', default='top1', choices=('top1', 'top5', 'loss'))
    g.add_argument('--device', help="'cuda', 'cuda:1', 'cpu', ... (default: cuda when available)")
    g.add_argument('--threads', type=int, default=0, help='visadapt: torch CPU threads (0: torch default)')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='visadapt-train-classifier',
        description="Fine-tune a timm classifier with a visadapt adapter, on timm's own training machinery "
                    "(flags as timm's train.py, plus the adapter flags).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--preset', choices=sorted(PRESETS), help='a bundle of settings (flags given explicitly win); '
                   "'short': a recipe for runs of a few epochs on small images; 'demo': that recipe with pretrained "
                   'EfficientNet-Lite0 + FLoRA on Fashion-MNIST, a few minutes on CPU')
    for add in (_add_data_args, _add_model_args, _add_adapter_args, _add_optim_args, _add_aug_args, _add_misc_args):
        add(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.preset:
        explicit = _explicit_dests(parser, argv)
        groups = ({'adapter_rank', 'budget'}, {'pretrained', 'pretrained_path', 'initial_checkpoint'})
        for key, value in PRESETS[args.preset].items():
            if key not in explicit and not any(key in g and explicit & g for g in groups):
                setattr(args, key, value)
    for name in ('adapter_rank', 'budget', 'epochs', 'batch_size', 'img_size', 'train_size', 'eval_size', 'num_classes',
                 'validation_batch_size', 'log_interval', 'checkpoint_hist'):
        value = getattr(args, name)
        if value is not None and value <= 0:
            flag = '--rank' if name == 'adapter_rank' else f'--{name.replace("_", "-")}'
            parser.error(f'{flag} must be positive, got {value}')
    if args.lr <= 0 or args.workers < 0:
        parser.error(f'--lr must be positive and -j/--workers at least 0, got {args.lr} and {args.workers}')
    if args.dist_bn not in ('broadcast', 'reduce', ''):
        parser.error(f"--dist-bn {args.dist_bn!r} is not valid; use 'broadcast', 'reduce' or ''")
    args.prefetcher = not args.no_prefetcher
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    args.distributed, args.world_size, args.rank = False, 1, 0  # init_distributed_device sets them for a run
    return args


def _explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """Destinations of the options present on the command line (so a preset does not override them)."""
    flags = {a.split('=', 1)[0] for a in argv if a.startswith('-')}
    return {action.dest for action in parser._actions if flags & set(action.option_strings)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``visadapt-train-classifier`` command. Returns the exit status (2 with one line for bad input)."""
    return main_with_args(parse_args(argv))


def main_with_args(args: argparse.Namespace) -> int:
    """Run with parsed arguments: input errors become one ``error:`` line and exit status 2, Ctrl-C status 130."""
    from ._command import INPUT_ERRORS, exit_status
    return exit_status('visadapt-train-classifier', lambda: run(args),
                       errors=INPUT_ERRORS + (TypeError, ImportError, FloatingPointError),
                       resume_hint='continue with --resume OUTPUT/EXPERIMENT/last.pth.tar')


if __name__ == '__main__':
    sys.exit(main())
