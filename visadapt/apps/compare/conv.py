"""The conv setting: a pretrained timm CNN fine-tuned on an in-memory image set, every conv adapted.

Each run is the classification trainer (:mod:`visadapt.apps.train_classifier`) with its ``short`` recipe: its
:func:`~visadapt.apps.train_classifier.setup` builds the model, the adapter (family preset: every conv), timm's
optimizer, schedule and task, its :func:`~visadapt.apps.train_classifier.train_one_epoch` trains and its
:func:`~visadapt.apps.train_classifier.evaluate` scores. Only the data source differs: the images are read once in
the parent through timm's evaluation transform (:func:`~visadapt.apps.train_classifier.create_eval_loader`: resize,
normalize) and held as tensors, and the training batches come from those tensors (seeded order and horizontal flip,
the recipe's only augmentation), so a run spends its time in the model, not in PIL.

The new classifier starts at zero (``zero_head``, the default): timm's EfficientNet/MobileNet init draws it from
U(±1/√num_classes), which for 10 classes gives logits with a spread of about 5 on the pretrained features and a
first training loss of 12-20 (measured), a start that threw some seeds of the low-rank methods off for good.

Splits (all seeded by ``data_seed``, fixed for every method and seed): the validation split is carved from the
training set (``val_size`` images), the training images come from the rest (``train_size`` images, or ``shots``
images per class), and the test split is a subset of the data set's own test set. The rate sweep reads only the
validation split (:mod:`.engine`).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .engine import Row, Setting, Variant, binned_mean, plan_rows

__all__ = ['ConvSettings', 'ConvSetting', 'CONV_VARIANTS', 'TensorBatches', 'CURVE_POINTS']

#: the methods of the conv comparison: (label, adapter spec, centre of the rate grid; centres from pilot runs, see
#: docs/compare.md). The reference is LoRA in its chain form (a k×k conv to r channels, then a 1×1 conv), the form
#: PEFT uses for convs.
CONV_VARIANTS: List[Variant] = [
    Variant('LoRA (chain)', {'method': 'LoRA', 'conv_form': 'chain'}, 3e-3),
    Variant('head-only', {'method': 'HeadOnly'}, 3e-2),
    Variant('full fine-tuning', {'method': 'FullFinetune'}, 3e-3),
    Variant('BitFit', {'method': 'BitFit'}, 1e-2),
    Variant('LoRA (reshape)', {'method': 'LoRA', 'conv_form': 'reshape'}, 3e-3),
    Variant('DoRA', {'method': 'DoRA'}, 3e-3),
    Variant('FLoRA', {'method': 'FLoRA', 'r3': 2}, 3e-3),
    Variant('FLoRA + MPC_o', {'method': 'FLoRA', 'r3': 2, 'mpc': 'o'}, 3e-3),
    Variant('SVFT (banded, d=2)', {'method': 'SVFT', 'pattern': 'banded', 'off_diag': 2}, 1e-2),
]
#: evaluations of the validation split during a curve run (besides the one before training)
CURVE_POINTS = 8
#: rows whose seed runs record validation curves: the two whose convergence the schedule must show
CURVE_LABELS = ('head-only', 'full fine-tuning')


@dataclass
class ConvSettings:
    """Data, model and schedule of a conv comparison (everything but method, rate and seed)."""
    model: str = 'efficientnet_lite0'
    pretrained: str = 'packaged'
    data: str = 'fashion-mnist'
    image_size: int = 48
    train_size: Optional[int] = 500
    shots: Optional[int] = None
    val_size: int = 500
    test_size: int = 1000
    data_seed: int = 0
    batch_size: int = 32
    epochs: int = 6
    ref_rank: int = 8
    budget: Optional[int] = None
    methods: Optional[List[str]] = None
    zero_head: bool = True

    def __post_init__(self) -> None:
        from visadapt.apps.train_classifier import OWN_DATASETS
        if self.data not in OWN_DATASETS:
            raise ValueError(f'data {self.data!r} is not valid; the conv comparison holds its data in memory and '
                             f'reads {OWN_DATASETS}')
        if (self.train_size is None) == (self.shots is None):
            raise ValueError(f'pass exactly one of train_size and shots, got {self.train_size} and {self.shots}')
        sizes = dict(image_size=self.image_size, val_size=self.val_size, test_size=self.test_size,
                     batch_size=self.batch_size, epochs=self.epochs, ref_rank=self.ref_rank,
                     train_size=self.train_size or 1, shots=self.shots or 1, budget=self.budget or 1)
        bad = {k: v for k, v in sizes.items() if v <= 0}
        if bad:
            raise ValueError(f'conv settings must be positive: {bad}')
        _select(CONV_VARIANTS, self.methods)


def _select(variants: Sequence[Variant], labels: Optional[Sequence[str]]) -> List[Variant]:
    """The variants named by ``labels`` (all when None); the reference (first) always runs."""
    if not labels:
        return list(variants)
    known = {v.label.lower(): v for v in variants}
    unknown = [name for name in labels if name.lower() not in known]
    if unknown:
        raise ValueError(f'methods {unknown} are not in this comparison; valid: {[v.label for v in variants]}')
    wanted = {name.lower() for name in labels} | {variants[0].label.lower()}
    return [v for v in variants if v.label.lower() in wanted]


class TensorBatches:
    """Batches of in-memory images: a seeded shuffle per epoch and a random horizontal flip (training), or the images
    in order (evaluation). Yields ``(images, labels)`` like timm's loader; ``len`` is the number of batches."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, train: bool = False,
                 hflip: float = 0.0, seed: int = 0):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.train, self.hflip, self.seed, self.epoch = train, hflip, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        if not self.train:
            for i in range(0, n, self.batch_size):
                yield self.images[i:i + self.batch_size], self.labels[i:i + self.batch_size]
            return
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=gen)
        flip = torch.rand(n, generator=gen) < self.hflip
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx]
            x = torch.where(flip[idx, None, None, None], x.flip(-1), x)
            yield x, self.labels[idx]


class ConvSetting(Setting):
    """A conv comparison on one model and data set (see the module docstring); ``name`` names its results folder."""
    metric = 'accuracy'

    def __init__(self, settings: ConvSettings, name: Optional[str] = None):
        self.s = settings
        size = f'{settings.shots}-shot' if settings.shots else f'{settings.train_size}-images'
        self.name = name or f'conv-{settings.model}-{settings.data}-{size}'
        self.variants = _select(CONV_VARIANTS, settings.methods)
        self.reference = self.variants[0].label
        self.tensors: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.probe: Any = None
        self.data_config: Dict[str, Any] = {}

    def settings(self) -> Dict[str, Any]:
        return {'kind': 'conv', **asdict(self.s), 'variants': [asdict(v) for v in self.variants]}

    def run_args(self, spec: Dict[str, Any], lr: float, seed: int, folder: str, scale: float = 1.0
                 ) -> argparse.Namespace:
        """The classification trainer's arguments for one run (its ``short`` recipe, this setting's sizes, the
        schedule ``scale`` times as long)."""
        import os

        from visadapt.apps import train_classifier as classify
        s = self.s
        train_size = len(self.tensors['train'][1]) if self.tensors else s.train_size or s.batch_size
        weights = ['--pretrained', 'packaged'] if s.pretrained == 'packaged' else []
        return classify.parse_args([
            '--preset', 'short', '--model', s.model, *weights, '--dataset', s.data, '--img-size', str(s.image_size),
            '--batch-size', str(s.batch_size), '--lr', repr(lr), '--epochs', str(round(s.epochs * scale)), '--adapter',
            json.dumps(spec), '--seed', str(seed), '--data-seed', str(s.data_seed), '--workers', '0',
            '--train-size', str(train_size), '--eval-size', str(s.batch_size), '--log-interval', '1000000',
            '--channels-last', '--output', os.path.dirname(folder), '--experiment', os.path.basename(folder)])

    def _split(self, labels: torch.Tensor, test_count: int) -> Dict[str, List[int]]:
        """Indices of the validation, training and test images (validation and training from the training set)."""
        s = self.s
        gen = torch.Generator().manual_seed(s.data_seed)
        order = torch.randperm(len(labels), generator=gen).tolist()
        if s.val_size >= len(order):
            raise ValueError(f'val_size {s.val_size} leaves no training images of the {len(order)}')
        val, pool = order[:s.val_size], order[s.val_size:]
        if s.shots:
            per_class: Dict[int, List[int]] = {}
            for i in pool:
                per_class.setdefault(int(labels[i]), []).append(i)
            short = {c: len(v) for c, v in per_class.items() if len(v) < s.shots}
            if short:
                raise ValueError(f'{s.shots} shots: classes {short} have fewer images outside the validation split')
            train = sorted(i for c in sorted(per_class) for i in per_class[c][:s.shots])
        else:
            if s.train_size > len(pool):
                raise ValueError(f'train_size {s.train_size} is more than the {len(pool)} images outside validation')
            train = sorted(pool[:s.train_size])
        test = sorted(torch.randperm(test_count, generator=gen)[:s.test_size].tolist())
        return {'train': train, 'val': sorted(val), 'test': test}

    def prepare(self, cache: Optional[str] = None) -> None:
        """Read the data set once, carve the splits, turn them into tensors with timm's evaluation transform."""
        from timm.data import resolve_data_config

        from visadapt.apps import train_classifier as classify
        from visadapt.integrations import timm_models as vtimm
        args = self.run_args({'method': 'HeadOnly'}, 1e-3, 0, 'unused')
        args.train_size = args.eval_size = None
        args.validation_batch_size = 256
        train_set, test_set, classes, _ = classify.create_datasets(args)
        self.probe = vtimm.create_model(self.s.model, pretrained='packaged' if self.s.pretrained == 'packaged'
                                        else False, num_classes=len(classes))
        self.data_config = resolve_data_config(vars(args), model=self.probe)
        splits = self._split(torch.as_tensor(train_set.labels), len(test_set))
        for split, indices in splits.items():
            view = classify.DatasetView(test_set if split == 'test' else train_set, indices)
            loader = classify.create_eval_loader(view, args, self.data_config, torch.device('cpu'))
            batches = list(loader)
            self.tensors[split] = (torch.cat([x for x, _ in batches]).contiguous(memory_format=torch.channels_last),
                                   torch.cat([y for _, y in batches]))

    def plan(self) -> Tuple[int, List[Row]]:
        from visadapt.core.budget import count_adapter_params
        from visadapt.integrations import timm_models as vtimm

        def make_config(spec: Dict[str, Any]) -> Any:
            return vtimm.make_config(self.probe, spec)

        budget = self.s.budget or count_adapter_params(self.probe, make_config({'method': 'LoRA',
                                                                                'r': self.s.ref_rank}))
        return budget, plan_rows(self.probe, self.variants, make_config, budget)

    def wants_curve(self, row: Row) -> bool:
        return row.label in CURVE_LABELS

    def withhold(self, split: str) -> None:
        self.tensors.pop(split, None)

    def _score(self, tr: Any, split: str) -> Dict[str, float]:
        from visadapt.apps import train_classifier as classify
        images, labels = self.tensors[split]
        metrics = classify.evaluate(tr.model, TensorBatches(images, labels, 256), tr.device, prefetcher=False,
                                    channels_last=tr.args.channels_last)
        return {'accuracy': float(metrics['top1']), 'loss': float(metrics['loss'])}

    def train(self, row: Row, lr: float, seed: int, splits: Sequence[str], curve: bool, folder: str,
              scale: float = 1.0) -> Dict[str, Any]:
        from visadapt.apps import train_classifier as classify
        tr = classify.setup(self.run_args(row.spec, lr, seed, folder, scale))
        if self.s.zero_head:
            with torch.no_grad():
                for tensor in tr.model.get_classifier().parameters():
                    tensor.zero_()
        if tr.data_config != self.data_config:
            raise RuntimeError(f'the run expects data config {tr.data_config}, the tensors were made with '
                               f'{self.data_config}')
        images, labels = self.tensors['train']
        loader = TensorBatches(images, labels, tr.args.batch_size, train=True, hflip=tr.args.hflip, seed=seed)
        if len(loader) != tr.updates_per_epoch:
            raise RuntimeError(f'{len(loader)} batches per epoch, but the schedule was made for {tr.updates_per_epoch}')
        tr.loader_train = loader
        every = -(-tr.num_epochs // CURVE_POINTS)
        history = [{'step': 0, 'val': self._score(tr, 'val')}] if curve else []
        for epoch in range(tr.num_epochs):
            loader.set_epoch(epoch)
            classify.train_one_epoch(tr, epoch)
            if tr.scheduler is not None:
                tr.scheduler.step(epoch + 1)
            if curve and ((epoch + 1) % every == 0 or epoch + 1 == tr.num_epochs):
                history.append({'step': (epoch + 1) * tr.updates_per_epoch, 'val': self._score(tr, 'val')})
        result: Dict[str, Any] = {split: self._score(tr, split) for split in splits}
        return {**result, 'curve': history, 'train_loss': binned_mean(tr.history['train_loss']),
                'adapter_params': tr.report.adapter_params, 'steps': len(tr.step_times),
                'trainable_params': sum(p.numel() for p in tr.model.parameters() if p.requires_grad)}
