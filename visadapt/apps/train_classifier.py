"""Image classification with adapters on timm models: data, training loop and the ``visadapt-train-classifier`` CLI.

``visadapt-train-classifier`` and the ``visadapt-train-classifier`` console script run :func:`main`;
``visadapt-compare`` runs it once per method and seed. One run:

1. builds a timm model (:func:`visadapt.integrations.timm_models.create_model`: packaged ImageNet weights, a checkpoint file, or random
   init) with a fresh classifier for the data set's classes;
2. injects any registered method with the model family's preset targets, at a given rank (``--rank``) or at the
   rank whose trainable count is closest to ``--budget`` (:mod:`visadapt.core.budget`); the classifier trains fully;
3. trains with AdamW and a cosine schedule with linear warm-up, mixed precision where the device supports it
   (bf16, or fp16 with loss scaling, on CUDA; optional bf16 autocast on CPU), evaluating before training (step 0)
   and after every epoch;
4. writes ``adapter/`` (:func:`visadapt.save_adapter`), ``metrics.json``, ``curves.png`` and
   ``checkpoint_last.pt`` (atomic; ``--resume`` continues from it, mid-epoch included).

Frozen normalization layers (BatchNorm with no trainable parameter) stay in eval mode, so their running statistics
are the pretrained ones and the saved adapter reproduces the trained model exactly on the original weights; they
train normally under full fine-tuning.

Data (``--data``): ``fashion-mnist`` (the Debian package ``dataset-fashion-mnist``, found under
``/usr/share/datasets/fashion-mnist`` or ``$FASHION_MNIST_DIR``), ``digits`` (scikit-learn's 8×8 digits: seconds-fast
runs), or a path to an ImageFolder tree (``train/`` and ``val/`` or ``test/`` sub-folders, or one folder split
80/20 by ``--data-seed``).
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import visadapt

from ..core import atomic_write_bytes
from ..core.budget import budget_field, match_budget
from ..integrations import timm_models as vtimm

__all__ = ['ImageData', 'load_data', 'load_fashion_mnist', 'load_digits', 'load_image_folder', 'build_parser',
           'parse_args', 'run', 'main', 'main_with_args', 'evaluate', 'PRESETS', 'DATA_CACHE', 'FASHION_MNIST_DIRS', 'FASHION_MNIST_CLASSES']

FASHION_MNIST_DIRS = ('/usr/share/datasets/fashion-mnist',)
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')
CHECKPOINT_NAME = 'checkpoint_last.pt'

#: (data, image_size, train_size, eval_size, data_seed) → ImageData; callers that run many trainings in one process
#: (or in forked children, like visadapt-compare) fill it to load the data once.
DATA_CACHE: Dict[Tuple[Any, ...], 'ImageData'] = {}

#: ``--preset`` bundles. ``demo`` is the README's main job: pretrained EfficientNet-Lite0 + FLoRA on all its convs on
#: a Fashion-MNIST subset, on CPU in a few minutes. One intra-op thread: these small convs gain little from a second
#: thread, and on a shared or busy 2-core machine a second thread mostly spins (measured: 2.3 s/step with one thread
#: against over 5 s/step with two on this machine under load).
PRESETS: Dict[str, Dict[str, Any]] = {
    'demo': dict(model='efficientnet_lite0', pretrained='packaged', data='fashion-mnist', method='FLoRA', rank=8,
                 method_args='{"r3": 2, "scale": 1.0}', image_size=64, train_size=2000, eval_size=1000, epochs=2,
                 batch_size=32, lr=2e-3, threads=1, output_dir='runs/demo'),
}


# ---- data ----------------------------------------------------------------------------------------------------------
@dataclass
class ImageData:
    """A train/test split held as tensors, or as datasets for image folders.

    Attributes:
        name: data set name for reports.
        classes: class names.
        train, test: ``(images, labels)``: uint8 ``(N, C, H, W)`` at the target size and int64 ``(N,)``; or a
            ``torch.utils.data.Dataset`` yielding ``(float (C, H, W) in [0, 1], int)``.
    """
    name: str
    classes: List[str]
    train: Any
    test: Any

    def sizes(self) -> Tuple[int, int]:
        return _len(self.train), _len(self.test)


def _len(split: Any) -> int:
    return len(split[1]) if isinstance(split, tuple) else len(split)


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) uint8 → (N, C, size, size) uint8, bilinear with antialiasing, in chunks."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.contiguous()
    out = []
    for chunk in images.split(1024):
        x = F.interpolate(chunk.float(), size=(size, size), mode='bilinear', antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def _subset(images: torch.Tensor, labels: torch.Tensor, n: Optional[int], seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    if n is None or n >= len(labels):
        return images, labels
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return images[idx], labels[idx]


def _find_fashion_mnist() -> str:
    candidates = [os.environ['FASHION_MNIST_DIR']] if os.environ.get('FASHION_MNIST_DIR') else []
    candidates += list(FASHION_MNIST_DIRS)
    for d in candidates:
        if os.path.isfile(os.path.join(d, 'train-images-idx3-ubyte.gz')):
            return d
    raise FileNotFoundError(f'Fashion-MNIST not found in {candidates}; install the Debian package: '
                            f'sudo apt-get install dataset-fashion-mnist (or set FASHION_MNIST_DIR to a directory '
                            f'holding train-images-idx3-ubyte.gz and friends)')


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, 'rb') as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
    if data[2] != 0x08 or len(data) != 4 + 4 * ndim + math.prod(dims):
        raise ValueError(f'{path!r} is not an uint8 IDX file (corrupt or truncated)')
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(image_size: int, train_size: Optional[int] = None, eval_size: Optional[int] = None,
                       data_seed: int = 0) -> ImageData:
    """Fashion-MNIST from the Debian package: 60k/10k 28×28 grey images, resized, optional random subsets."""
    root = _find_fashion_mnist()
    split = {}
    for part, prefix, n in (('train', 'train', train_size), ('test', 't10k', eval_size)):
        images = torch.from_numpy(_read_idx(os.path.join(root, f'{prefix}-images-idx3-ubyte.gz')).copy())
        labels = torch.from_numpy(_read_idx(os.path.join(root, f'{prefix}-labels-idx1-ubyte.gz')).astype(np.int64))
        images, labels = _subset(images[:, None], labels, n, data_seed)
        split[part] = (_resize_uint8(images, image_size), labels)
    return ImageData('Fashion-MNIST', list(FASHION_MNIST_CLASSES), split['train'], split['test'])


def load_digits(image_size: int, train_size: Optional[int] = None, eval_size: Optional[int] = None,
                data_seed: int = 0) -> ImageData:
    """scikit-learn's 1,797 8×8 digits (values 0-16), split 2/3 train, 1/3 test by ``data_seed``."""
    from sklearn.datasets import load_digits as sk_digits
    bunch = sk_digits()
    images = torch.from_numpy((bunch.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(data_seed))
    n_train = (2 * len(labels)) // 3
    tr, te = perm[:n_train].sort().values, perm[n_train:].sort().values
    train = _subset(images[tr], labels[tr], train_size, data_seed)
    test = _subset(images[te], labels[te], eval_size, data_seed)
    return ImageData('digits', [str(i) for i in range(10)], (_resize_uint8(train[0], image_size), train[1]),
                     (_resize_uint8(test[0], image_size), test[1]))


def load_image_folder(root: str, image_size: int, train_size: Optional[int] = None, eval_size: Optional[int] = None,
                      data_seed: int = 0) -> ImageData:
    """An ImageFolder tree: ``root/train`` + ``root/val`` (or ``root/test``), or one folder split 80/20."""
    from torchvision import datasets, transforms
    tf_train = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    tf_eval = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                  transforms.ToTensor()])
    val_dir = next((os.path.join(root, d) for d in ('val', 'test') if os.path.isdir(os.path.join(root, d))), None)
    if os.path.isdir(os.path.join(root, 'train')) and val_dir:
        train = datasets.ImageFolder(os.path.join(root, 'train'), transform=tf_train)
        test = datasets.ImageFolder(val_dir, transform=tf_eval)
        if train.classes != test.classes:
            raise ValueError(f'{root!r}: train/ and {os.path.basename(val_dir)}/ have different classes '
                             f'({train.classes[:5]} vs {test.classes[:5]})')
    else:
        full_train = datasets.ImageFolder(root, transform=tf_train)
        full_test = datasets.ImageFolder(root, transform=tf_eval)
        perm = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(data_seed)).tolist()
        cut = int(0.8 * len(perm))
        train = torch.utils.data.Subset(full_train, perm[:cut])
        test = torch.utils.data.Subset(full_test, perm[cut:])
        train.classes = full_train.classes  # type: ignore[attr-defined]
    classes = list(train.classes)

    def cap(ds, n):
        if n is None or n >= len(ds):
            return ds
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(data_seed))[:n].sort().values.tolist()
        return torch.utils.data.Subset(ds, idx)
    return ImageData(os.path.basename(os.path.normpath(root)), classes, cap(train, train_size), cap(test, eval_size))


def load_data(spec: str, image_size: int, train_size: Optional[int] = None, eval_size: Optional[int] = None,
              data_seed: int = 0) -> ImageData:
    """``'fashion-mnist'``, ``'digits'`` or an ImageFolder path."""
    if spec in ('fashion-mnist', 'fashion_mnist', 'fmnist'):
        return load_fashion_mnist(image_size, train_size, eval_size, data_seed)
    if spec == 'digits':
        return load_digits(image_size, train_size, eval_size, data_seed)
    if os.path.isdir(spec):
        return load_image_folder(spec, image_size, train_size, eval_size, data_seed)
    raise ValueError(f"--data {spec!r} is not valid: use 'fashion-mnist', 'digits' or an ImageFolder directory")


def _fetch(split: Any, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A batch ``(float (B, C, H, W) in [0, 1], int64 (B,))`` from a tensor split or a dataset."""
    if isinstance(split, tuple):
        return split[0][idx].float().div_(255.0), split[1][idx]
    items = [split[i] for i in idx.tolist()]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)


class Normalize(nn.Module):
    """Grey → RGB (repeat) and (x - mean) / std with the model's ``pretrained_cfg`` statistics."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer('mean', torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.mean.shape[1] == 3:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std


# ---- model, config, training -----------------------------------------------------------------------------------------
def _pretrained_arg(value: str) -> Any:
    if value in ('none', 'false', 'False', ''):
        return False
    if value in ('true', 'True'):
        return True
    return value


def build_model_and_config(args: argparse.Namespace, num_classes: int):
    """The timm model and the injected config (rank or budget applied). Returns (model, report, budget match)."""
    model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    model = vtimm.create_model(args.model, pretrained=_pretrained_arg(args.pretrained), num_classes=num_classes,
                               **model_kwargs)
    spec: Any = args.method
    if args.method_args:
        spec = {'method': args.method, **json.loads(args.method_args)}
    config = vtimm.make_config(model, spec, preset=None if args.no_preset else 'auto', mlp=args.mlp, proj=args.proj)
    match = None
    knob = budget_field(config)
    if args.rank is not None:
        if knob is None:
            raise ValueError(f'--rank is set but {config.method} has no rank; drop --rank')
        config = dataclasses.replace(config, **{knob: args.rank})
    elif args.budget is not None:
        if knob is None:
            raise ValueError(f'--budget is set but {config.method} has no rank to tune; drop --budget')
        match = match_budget(model, config, args.budget)
        config = match.config
    report = visadapt.inject(model, config)
    return model, report, match


def _freeze_norm_stats(model: nn.Module) -> None:
    """Eval mode for normalization layers none of whose parameters train (keeps the pretrained statistics)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def _train_mode(model: nn.Module) -> None:
    model.train()
    _freeze_norm_stats(model)


def _mutable_state_keys(model: nn.Module) -> List[str]:
    """state_dict keys that training can change: trainable parameters, adapter tensors, train-mode norm buffers."""
    keys = {n for n, p in model.named_parameters() if p.requires_grad}
    keys |= {k for k in model.state_dict() if 'visadapt' in k.split('.')}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and any(p.requires_grad for p in m.parameters()):
            keys |= {f'{name}.{b}' if name else b for b, _ in m.named_buffers(recurse=False)}
    return sorted(keys)


def _amp_settings(device: torch.device, amp: str) -> Tuple[Optional[torch.dtype], bool]:
    """(autocast dtype or None, use a GradScaler)."""
    if amp == 'none':
        return None, False
    if device.type == 'cuda':
        if amp in ('auto', 'bf16') and torch.cuda.is_bf16_supported():
            return torch.bfloat16, False
        return torch.float16, True
    if amp == 'bf16':
        return torch.bfloat16, False
    if amp == 'fp16':
        raise ValueError('--amp fp16 needs a CUDA device; on CPU use --amp bf16 or none')
    return None, False  # auto on CPU: fp32 (bf16 autocast is often slower on CPUs without AMX)


@torch.no_grad()
def evaluate(model: nn.Module, norm: Normalize, split: Any, batch_size: int, device: torch.device,
             amp_dtype: Optional[torch.dtype]) -> Tuple[float, float]:
    """(accuracy, mean cross-entropy) on ``split``."""
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, _len(split)
    for start in range(0, n, batch_size):
        x, y = _fetch(split, torch.arange(start, min(start + batch_size, n)))
        x, y = norm(x.to(device)), y.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction='sum').item()
        correct += (logits.argmax(1) == y).sum().item()
    if was_training:
        _train_mode(model)
    return correct / max(n, 1), loss_sum / max(n, 1)


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def _rss_mb() -> float:
    """Current resident set size in MB (Linux /proc; falls back to the peak)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20
    except OSError:
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _save_checkpoint(path: str, payload: Dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


_RESUME_KEYS = ('model', 'pretrained', 'data', 'method', 'method_args', 'rank', 'budget', 'image_size', 'train_size',
                'eval_size', 'batch_size', 'epochs', 'steps', 'lr', 'seed', 'data_seed', 'mlp', 'proj', 'no_preset',
                'model_kwargs', 'weight_decay', 'warmup_steps')


def _args_dict(args: argparse.Namespace) -> Dict[str, Any]:
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


def _plot_curves(path: str, history: Dict[str, Any], title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps, losses = history['train_steps'], history['train_loss']
    if losses:
        ax1.plot(steps, losses, lw=0.6, alpha=0.4, label='train loss (per step)')
        k = max(1, len(losses) // 25)
        smooth = np.convolve(losses, np.ones(k) / k, mode='valid')
        ax1.plot(steps[k - 1:], smooth, lw=1.6, label=f'train loss ({k}-step mean)')
    ev = history['eval']
    ax1.plot([e['step'] for e in ev], [e['loss'] for e in ev], 'o-', label='test loss')
    ax1.set_xlabel('step'), ax1.set_ylabel('cross-entropy'), ax1.legend(fontsize=8), ax1.grid(alpha=0.3)
    ax2.plot([e['step'] for e in ev], [100 * e['accuracy'] for e in ev], 'o-', color='C2')
    ax2.set_xlabel('step'), ax2.set_ylabel('test accuracy (%)'), ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """One training run as configured by :func:`build_parser`'s arguments; returns the metrics written to JSON."""
    t_start = time.time()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu'))
    amp_dtype, use_scaler = _amp_settings(device, args.amp)
    out = args.output_dir
    os.makedirs(out, exist_ok=True)
    ckpt_path = os.path.join(out, CHECKPOINT_NAME)
    checkpoint = None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f'--resume: no checkpoint {ckpt_path!r}; run once without --resume first')
        checkpoint = torch.load(ckpt_path, map_location='cpu', weights_only=True)
        saved = checkpoint['args']
        diff = [k for k in _RESUME_KEYS if saved.get(k) != getattr(args, k, None)]
        if diff:
            raise ValueError(f'--resume: the checkpoint in {out!r} was made with other settings: '
                             + ', '.join(f'{k}={saved.get(k)!r} (now {getattr(args, k, None)!r})' for k in diff[:4]))

    key = (args.data, args.image_size, args.train_size, args.eval_size, args.data_seed)
    data = DATA_CACHE.get(key) or load_data(*key)
    model, report, match = build_model_and_config(args, len(data.classes))
    model.to(device)
    config = visadapt.core.tuner.get_injection(model, 'default').config
    cfg = model.pretrained_cfg
    norm = Normalize(cfg.get('mean', (0.485, 0.456, 0.406)), cfg.get('std', (0.229, 0.224, 0.225))).to(device)
    mpc = getattr(config, 'mpc', None) in ('o', 'd')

    n_train, n_test = data.sizes()
    steps_per_epoch = math.ceil(n_train / args.batch_size) if not args.drop_last else n_train // args.batch_size
    total_steps = args.steps if args.steps else args.epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(100, max(1, total_steps // 20))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    history: Dict[str, Any] = {'train_steps': [], 'train_loss': [], 'eval': []}
    step, step_times = 0, []
    if checkpoint is not None:
        state = checkpoint['model_state']
        model.load_state_dict(state, strict=False)
        optimizer.load_state_dict(checkpoint['optimizer'])
        scheduler.load_state_dict(checkpoint['scheduler'])
        scaler.load_state_dict(checkpoint['scaler'])
        history, step, step_times = checkpoint['history'], checkpoint['step'], checkpoint['step_times']
        torch.set_rng_state(checkpoint['rng_cpu'])
        print(f'resumed from {ckpt_path} at step {step}/{total_steps}', flush=True)

    print(report, flush=True)
    if match is not None:
        print(f'budget: {match}', flush=True)
    print(f'data: {data.name}, {n_train:,} train / {n_test:,} test images at {args.image_size}x{args.image_size}, '
          f'{len(data.classes)} classes; {total_steps} steps of batch {args.batch_size} on {device}'
          f'{f" with {amp_dtype} autocast" if amp_dtype else ""}', flush=True)

    if not history['eval']:
        t0 = time.time()
        acc, loss = evaluate(model, norm, data.test, args.eval_batch_size, device, amp_dtype)
        if not math.isfinite(loss):
            raise FloatingPointError(f'the test loss is {loss} before any training step: {config.method} on '
                                     f'{args.model} gives non-finite outputs (NaN/Inf weights or a method bug)')
        history['eval'].append({'step': 0, 'epoch': 0, 'accuracy': acc, 'loss': loss, 'seconds': time.time() - t0})
        print(f'step 0 (before training): test accuracy {100 * acc:.2f}%, loss {loss:.4f}', flush=True)

    rss_before = _rss_mb()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    _train_mode(model)
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=step, desc='train', unit='step', disable=args.no_progress,
               dynamic_ncols=True, mininterval=1.0)
    t_train = time.time()
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        for b in range(offset, steps_per_epoch):
            if step >= total_steps:
                break
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            x, y = _fetch(data.train, idx)
            x, y = norm(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
                if mpc:
                    loss = loss + visadapt.regularization_loss(model)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if device.type == 'cuda':
                torch.cuda.synchronize(device)
            step_times.append(time.perf_counter() - t0)
            step += 1
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f'loss is {value} at step {step}; lower --lr (now {args.lr})')
            history['train_steps'].append(step)
            history['train_loss'].append(value)
            bar.update(1)
            bar.set_postfix(loss=f'{value:.3f}', lr=f'{scheduler.get_last_lr()[0]:.2e}', refresh=False)
            if args.ckpt_every and step % args.ckpt_every == 0 and step % steps_per_epoch:
                _write_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, history, step, step_times, args)
        if step % steps_per_epoch == 0 or step >= total_steps:
            t0 = time.time()
            acc, loss_val = evaluate(model, norm, data.test, args.eval_batch_size, device, amp_dtype)
            history['eval'].append({'step': step, 'epoch': step / steps_per_epoch, 'accuracy': acc, 'loss': loss_val,
                                    'seconds': time.time() - t0})
            bar.write(f'epoch {step / steps_per_epoch:.2f} (step {step}): test accuracy {100 * acc:.2f}%, '
                      f'loss {loss_val:.4f}')
            _write_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, history, step, step_times, args)
    bar.close()
    train_seconds = time.time() - t_train

    adapter_dir = os.path.join(out, 'adapter')
    visadapt.save_adapter(model, adapter_dir)
    timed = step_times[2:] if len(step_times) > 4 else step_times  # the first steps include warm-up allocations
    before, after = history['eval'][0], history['eval'][-1]
    metrics = {
        'model': args.model, 'pretrained': args.pretrained, 'data': data.name, 'num_classes': len(data.classes),
        'train_images': n_train, 'test_images': n_test, 'image_size': args.image_size,
        'method': config.method, 'config': config.to_dict(),
        'budget': None if match is None else {'target': match.target, 'achieved': match.achieved,
                                               'field': match.field, 'value': match.value},
        'adapted_layers': len(report.layers), 'adapter_params': report.adapter_params, 'trainable_params': trainable,
        'total_params': sum(p.numel() for p in model.parameters()),
        'steps': step, 'epochs': step / steps_per_epoch, 'batch_size': args.batch_size, 'lr': args.lr,
        'seed': args.seed, 'device': str(device), 'amp': str(amp_dtype) if amp_dtype else 'none',
        'accuracy_before': before['accuracy'], 'accuracy_after': after['accuracy'],
        'best_accuracy': max(e['accuracy'] for e in history['eval']),
        'step_time_s': float(np.mean(timed)) if timed else None,
        'train_seconds': train_seconds,
        'peak_memory_mb': (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == 'cuda'
                           else _peak_rss_mb()),
        'peak_memory_kind': 'cuda_max_allocated' if device.type == 'cuda' else 'process_peak_rss',
        'train_memory_mb': (None if device.type == 'cuda' else max(0.0, _peak_rss_mb() - rss_before)),
        'eval': history['eval'], 'args': _args_dict(args),
    }
    metrics['total_seconds'] = time.time() - t_start
    atomic_write_bytes(os.path.join(out, 'metrics.json'), json.dumps(metrics, indent=2).encode())
    _plot_curves(os.path.join(out, 'curves.png'), history,
                 f'{args.model} + {config.method} on {data.name} ({trainable:,} trainable parameters)')
    _print_summary(metrics, out)
    return metrics


def _write_checkpoint(path, model, optimizer, scheduler, scaler, history, step, step_times, args) -> None:
    state = model.state_dict()
    keys = _mutable_state_keys(model)
    _save_checkpoint(path, {
        'model_state': {k: state[k].detach().cpu() for k in keys if k in state},
        'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict(),
        'history': history, 'step': step, 'step_times': step_times, 'rng_cpu': torch.get_rng_state(),
        'args': _args_dict(args)})


def _fmt_seconds(s: float) -> str:
    return f'{int(s // 60)}m{s % 60:04.1f}s' if s >= 60 else f'{s:.1f}s'


def _print_summary(m: Dict[str, Any], out: str) -> None:
    head = m['trainable_params'] - m['adapter_params']
    cfg = m['config']
    backbone = 'random-init' if str(m['pretrained']).lower() in ('none', 'false', '') else 'pretrained'
    knobs = ', '.join(f'{k}={cfg[k]}' for k in ('r', 'r3', 'scale', 'alpha', 'split', 'conv_form', 'pattern')
                      if k in cfg and cfg[k] is not None)
    lines = [
        '',
        '=== visadapt train_classifier: summary ===',
        f"model       {m['model']} (pretrained: {m['pretrained']}), {m['total_params']:,} parameters",
        f"method      {m['method']}{f' ({knobs})' if knobs else ''} on {m['adapted_layers']} layers",
        f"trainable   {m['trainable_params']:,} = adapter {m['adapter_params']:,} + fully trained {head:,} "
        f"({100 * m['trainable_params'] / m['total_params']:.2f}% of the model)",
        f"data        {m['data']}: {m['train_images']:,} train / {m['test_images']:,} test images at "
        f"{m['image_size']}x{m['image_size']}, {m['num_classes']} classes",
        f"accuracy    before {100 * m['accuracy_before']:.2f}% (step 0: {backbone} backbone, freshly initialized "
        f"{m['num_classes']}-class head)  ->  after {100 * m['accuracy_after']:.2f}% "
        f"({m['epochs']:.2f} epochs, {m['steps']} steps)",
        f"time        {_fmt_seconds(m['total_seconds'])} in total, training {_fmt_seconds(m['train_seconds'])} "
        f"({m['step_time_s']:.3f} s/step), on {m['device']}",
        f"memory      peak {m['peak_memory_mb']:.0f} MB ({m['peak_memory_kind'].replace('_', ' ')})",
        f'outputs     {out}/adapter/, {out}/metrics.json, {out}/curves.png',
    ]
    print('\n'.join(lines), flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='visadapt-train-classifier',
        description='Fine-tune a timm model for image classification with any visadapt method.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--preset', choices=sorted(PRESETS), help='a bundle of settings (flags given explicitly win); '
                   "'demo': pretrained EfficientNet-Lite0 + FLoRA on Fashion-MNIST, a few minutes on CPU")
    g = p.add_argument_group('model and method')
    g.add_argument('--model', default='efficientnet_lite0', help='timm architecture name')
    g.add_argument('--pretrained', default='packaged',
                   help="'packaged' (weights from a pip package, see visadapt.integrations.timm_models.PACKAGED_WEIGHTS), a checkpoint "
                        "file path, or 'none' for random init")
    g.add_argument('--model-kwargs', default='', help='JSON dict passed to timm.create_model, e.g. \'{"img_size": 32}\'')
    g.add_argument('--method', default='FLoRA', help=f'any registered method: {sorted(c.method for c in visadapt.METHODS.values())}')
    g.add_argument('--method-args', default='', help='JSON dict of config fields, e.g. \'{"r3": 2, "scale": 4}\'')
    size = g.add_mutually_exclusive_group()
    size.add_argument('--rank', type=int, help="the method's rank (its budget field, usually r)")
    size.add_argument('--budget', type=int, help='target trainable adapter parameters: the rank is matched to it')
    g.add_argument('--mlp', action='store_true', help='preset option: also adapt MLP layers (ConvNeXt, ViT)')
    g.add_argument('--proj', action='store_true', help='preset option: also adapt attn.proj (ViT)')
    g.add_argument('--no-preset', action='store_true', help='use the method config as given (no family preset)')
    g = p.add_argument_group('data')
    g.add_argument('--data', default='fashion-mnist', help="'fashion-mnist', 'digits' or an ImageFolder directory")
    g.add_argument('--image-size', type=int, default=64)
    g.add_argument('--train-size', type=int, help='random training subset size (default: all)')
    g.add_argument('--eval-size', type=int, help='random test subset size (default: all)')
    g.add_argument('--data-seed', type=int, default=0, help='seed of the subsets/splits (kept fixed across --seed)')
    g = p.add_argument_group('optimization')
    g.add_argument('--epochs', type=int, default=2)
    g.add_argument('--steps', type=int, help='total optimizer steps (overrides --epochs)')
    g.add_argument('--batch-size', type=int, default=32)
    g.add_argument('--eval-batch-size', type=int, default=128)
    g.add_argument('--lr', type=float, default=2e-3)
    g.add_argument('--weight-decay', type=float, default=0.0)
    g.add_argument('--warmup-steps', type=int, help='linear warm-up steps (default: 5%% of the steps, at most 100)')
    g.add_argument('--label-smoothing', type=float, default=0.0)
    g.add_argument('--clip-grad', type=float, default=0.0, help='gradient-norm clipping (0: off)')
    g.add_argument('--drop-last', action='store_true', help='drop the last incomplete batch of each epoch')
    g.add_argument('--seed', type=int, default=0)
    g = p.add_argument_group('run')
    g.add_argument('--output-dir', default='runs/classifier')
    g.add_argument('--resume', action='store_true', help=f'continue from OUTPUT_DIR/{CHECKPOINT_NAME}')
    g.add_argument('--ckpt-every', type=int, default=0, help='also checkpoint every N steps inside an epoch')
    g.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    g.add_argument('--amp', choices=('auto', 'bf16', 'fp16', 'none'), default='auto',
                   help='mixed precision: auto = bf16 (or fp16 + loss scaling) on CUDA, fp32 on CPU')
    g.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    g.add_argument('--no-progress', action='store_true', help='no tqdm progress bar')
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset:
        explicit = _explicit_dests(parser, argv if argv is not None else sys.argv[1:])
        for key, value in PRESETS[args.preset].items():
            if key not in explicit and not (key in ('rank', 'budget') and explicit & {'rank', 'budget'}):
                setattr(args, key, value)
    for name in ('rank', 'budget', 'epochs', 'steps', 'batch_size', 'image_size', 'train_size', 'eval_size'):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f'--{name.replace("_", "-")} must be positive, got {value}')
    if args.lr <= 0:
        parser.error(f'--lr must be positive, got {args.lr}')
    return args


def _explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """Destinations of the options present on the command line (so a preset does not override them)."""
    flags = {a.split('=', 1)[0] for a in argv if a.startswith('--')}
    return {action.dest for action in parser._actions if flags & set(action.option_strings)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``visadapt-train-classifier`` command. Returns the exit status (2 with one line for bad input)."""
    return main_with_args(parse_args(argv))


def main_with_args(args: argparse.Namespace) -> int:
    """Run with parsed arguments, turning input errors into one ``error:`` line and exit status 2."""
    try:
        run(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError, FloatingPointError) as err:
        print(f'visadapt-train-classifier: error: {err}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
