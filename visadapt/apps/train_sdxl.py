"""Style-tune Stable Diffusion XL with visadapt adapters, as diffusers' SDXL LoRA example does.

The command line is that of diffusers' ``examples/text_to_image/train_text_to_image_lora_sdxl.py``: every flag of
the example, with its meaning and default (docs/diffusers.md lists them, and the few that cannot work on a machine,
e.g. ``--push_to_hub`` offline, stop at start with an error saying why). visadapt adds two named adapters instead of
the example's one LoRA: ``conv`` (``--conv_method``, default FLoRA) on every UNet conv and ``attn``
(``--attn_method``, default LoRA) on ``to_q``/``to_k``/``to_v``/``to_out.0`` (and, with ``--train_text_encoder``,
on both CLIP encoders' ``q/k/v/out_proj``); ``--rank`` sets both ranks unless ``--conv_rank``/``--attn_rank`` do.

Outputs in ``--output_dir``, as the example's: ``pytorch_lora_weights.safetensors`` (what
``StableDiffusionXLPipeline.load_lora_weights(output_dir)`` reads; conv FLoRA is written exactly as its LoRA chain)
and ``checkpoint-<step>/`` (accelerate's state plus the same LoRA file), tensorboard logs in ``--logging_dir``;
and visadapt's: ``adapter/`` (visadapt's format, for resuming and merging), ``validation/``,
``loss_history.json``, ``loss_curve.png``, ``train_metrics.json`` and, per ``--export``, ``export/kohya.safetensors``
(sd-scripts' SDXL names, Tucker LoCon for conv FLoRA) and ``export/merged_unet/``. Run it as
``accelerate launch -m visadapt.apps.train_sdxl ...`` or ``visadapt-train-sdxl ...``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['main', 'run_training', 'parse_args', 'build_parser', 'EXPORTS', 'TRACKER_PROJECT']

logger = logging.getLogger('visadapt.train_sdxl')
EXPORTS = ('kohya', 'merged')
#: the tracker project name the example uses (tensorboard writes to <logging_dir>/<this>)
TRACKER_PROJECT = 'text2image-fine-tune'


# ---- flags -------------------------------------------------------------------------------------------------------
def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (diffusers' example)")
    g.add_argument('--pretrained_model_name_or_path', required=True, help='SDXL pipeline: local folder or Hub id')
    g.add_argument('--pretrained_vae_model_name_or_path', default=None,
                   help='a separate VAE (e.g. the fp16-fixed one); it then runs in the weight dtype')
    g.add_argument('--revision', default=None, help='Hub revision of the pretrained model')
    g.add_argument('--variant', default=None, help="weights variant of the model files, e.g. 'fp16'")
    g.add_argument('--prediction_type', default=None, choices=['epsilon', 'v_prediction'],
                   help="training target; default: the noise scheduler's own prediction_type")


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (diffusers' example)")
    g.add_argument('--dataset_name', default=None,
                   help='a datasets name or local folder (load_dataset), or a save_to_disk folder')
    g.add_argument('--dataset_config_name', default=None, help='the dataset config, if it has several')
    g.add_argument('--train_data_dir', default=None,
                   help="imagefolder with a metadata.jsonl of captions (with --dataset_name: its data_dir)")
    g.add_argument('--image_column', default='image', help='dataset column holding the image')
    g.add_argument('--caption_column', default='text', help='dataset column holding a caption or a list of them')
    g.add_argument('--max_train_samples', type=int, default=None, help='keep this many examples (shuffled by --seed)')
    g.add_argument('--cache_dir', default=None, help="datasets' cache folder")
    g.add_argument('--resolution', type=int, default=1024, help='images are resized and cropped to this square')
    g.add_argument('--center_crop', action='store_true', help='center crop (default: random crop)')
    g.add_argument('--random_flip', action='store_true', help='flip half of the images horizontally')
    g.add_argument('--dataloader_num_workers', type=int, default=0, help='data loading subprocesses (0: main)')


def _add_optimization_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimization (diffusers' example)")
    g.add_argument('--train_text_encoder', action='store_true', help='also adapt both text encoders')
    g.add_argument('--train_batch_size', type=int, default=16, help='batch size per device')
    g.add_argument('--num_train_epochs', type=int, default=100)
    g.add_argument('--max_train_steps', type=int, default=None, help='total optimizer steps; overrides the epochs')
    g.add_argument('--gradient_accumulation_steps', type=int, default=1)
    g.add_argument('--gradient_checkpointing', action='store_true')
    g.add_argument('--learning_rate', type=float, default=1e-4)
    g.add_argument('--scale_lr', action='store_true', help='multiply the lr by processes × accumulation × batch')
    g.add_argument('--lr_scheduler', default='constant', help="a diffusers scheduler: constant, constant_with_warmup, "
                   "linear, cosine, cosine_with_restarts, polynomial, ...")
    g.add_argument('--lr_warmup_steps', type=int, default=500, help='warmup length in optimizer steps')
    g.add_argument('--snr_gamma', type=float, default=None, help='Min-SNR loss weighting gamma (5.0 is usual)')
    g.add_argument('--noise_offset', type=float, default=0, help='scale of the per-channel noise offset')
    g.add_argument('--use_8bit_adam', action='store_true', help="bitsandbytes' AdamW8bit")
    g.add_argument('--adam_beta1', type=float, default=0.9)
    g.add_argument('--adam_beta2', type=float, default=0.999)
    g.add_argument('--adam_weight_decay', type=float, default=1e-2)
    g.add_argument('--adam_epsilon', type=float, default=1e-08)
    g.add_argument('--max_grad_norm', type=float, default=1.0)
    g.add_argument('--rank', type=int, default=4, help='adapter rank (--conv_rank/--attn_rank override it)')
    g.add_argument('--seed', type=int, default=None)


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime, checkpoints and logging (diffusers' example)")
    g.add_argument('--mixed_precision', default=None, choices=['no', 'fp16', 'bf16'],
                   help="dtype of the frozen weights (default: accelerate's config)")
    g.add_argument('--allow_tf32', action='store_true', help='allow TF32 matmuls on Ampere GPUs')
    g.add_argument('--enable_xformers_memory_efficient_attention', action='store_true')
    g.add_argument('--enable_npu_flash_attention', action='store_true')
    g.add_argument('--local_rank', type=int, default=-1, help='set by launchers; LOCAL_RANK wins')
    g.add_argument('--output_dir', default='sd-model-finetuned-lora')
    g.add_argument('--logging_dir', default='logs', help='tracker folder, relative to --output_dir')
    g.add_argument('--report_to', default='tensorboard', help='tensorboard, wandb, comet_ml, ..., all or none')
    g.add_argument('--checkpointing_steps', type=int, default=500, help='save the training state every N steps')
    g.add_argument('--checkpoints_total_limit', type=int, default=None, help='keep at most N checkpoints')
    g.add_argument('--resume_from_checkpoint', default=None,
                   help="a checkpoint-N folder name inside --output_dir, or 'latest'")
    g.add_argument('--validation_prompt', default=None)
    g.add_argument('--num_validation_images', type=int, default=4)
    g.add_argument('--validation_epochs', type=int, default=1, help='validate after every N-th epoch')
    g.add_argument('--debug_loss', action='store_true', help='log the loss per image file name')
    g.add_argument('--push_to_hub', action='store_true', help='upload --output_dir to the Hub at the end')
    g.add_argument('--hub_token', default=None)
    g.add_argument('--hub_model_id', default=None, help='Hub repository (default: the --output_dir name)')


def _add_visadapt_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group('visadapt')
    g.add_argument('--conv_method', default='FLoRA', help='method on every UNet conv, or "none"')
    g.add_argument('--conv_rank', type=int, default=None, help='its rank (default: --rank)')
    g.add_argument('--conv_budget', type=int, default=None, help='trainable-parameter budget: sets the conv rank')
    g.add_argument('--conv_options', type=json.loads, default=None,
                   help='JSON of its other config fields (default for FLoRA: {"r3": 2, "scale": 1.0})')
    g.add_argument('--attn_method', default='LoRA', help='method on to_q/to_k/to_v/to_out.0, or "none"')
    g.add_argument('--attn_rank', type=int, default=None, help='its rank (default: --rank)')
    g.add_argument('--attn_budget', type=int, default=None, help='trainable-parameter budget: sets the attn rank')
    g.add_argument('--attn_options', type=json.loads, default={}, help='JSON of its other config fields')
    g.add_argument('--num_inference_steps', type=int, default=None,
                   help="validation denoising steps (default: the pipeline's)")
    g.add_argument('--export', nargs='*', default=[], choices=EXPORTS, help='extra files written at the end')
    g.add_argument('--no_lora_weights', action='store_true', help='do not write pytorch_lora_weights.safetensors '
                   '(for methods without a LoRA form, e.g. IA3; use --export merged)')
    g.add_argument('--eval_fixed_batch', action='store_true',
                   help='loss of the first batch with fixed noise and timesteps, before and after training')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Style-tune SDXL with visadapt adapters; the flags of diffusers\' '
                                'train_text_to_image_lora_sdxl.py plus the visadapt group.')
    for add in (_add_model_flags, _add_data_flags, _add_optimization_flags, _add_runtime_flags, _add_visadapt_flags):
        add(p)
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    env_rank = int(os.environ.get('LOCAL_RANK', -1))
    if env_rank != -1:
        args.local_rank = env_rank
    if args.dataset_name is None and args.train_data_dir is None:
        p.error('give --dataset_name or --train_data_dir (the data to train on)')
    if args.conv_method.lower() == 'none' and args.attn_method.lower() == 'none':
        p.error('--conv_method and --attn_method are both "none": nothing to train')
    for flag in ('resolution', 'train_batch_size', 'num_train_epochs', 'gradient_accumulation_steps',
                 'checkpointing_steps', 'validation_epochs', 'rank'):
        if getattr(args, flag) <= 0:
            p.error(f'--{flag} must be positive, got {getattr(args, flag)}')
    for flag in ('max_train_steps', 'max_train_samples', 'checkpoints_total_limit', 'conv_rank', 'attn_rank',
                 'num_inference_steps'):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            p.error(f'--{flag} must be positive, got {getattr(args, flag)}')
    if args.num_validation_images < 0 or args.lr_warmup_steps < 0:
        p.error('--num_validation_images and --lr_warmup_steps cannot be negative')
    if args.report_to == 'wandb' and args.hub_token is not None:
        p.error('--report_to wandb with --hub_token would expose the token in the logs; log in with '
                '`huggingface-cli login` instead')
    args.conv_rank = args.conv_rank or args.rank
    args.attn_rank = args.attn_rank or args.rank
    return args


# ---- checks before anything is loaded -------------------------------------------------------------------------------
def check_environment(args: argparse.Namespace) -> Optional[str]:
    """Refuse, before loading anything, every flag this machine cannot honour; returns the checkpoint to resume."""
    from diffusers.optimization import SchedulerType
    from diffusers.utils.import_utils import is_torch_npu_available, is_xformers_available

    from visadapt.core import get_config_class
    if args.enable_xformers_memory_efficient_attention and not is_xformers_available():
        raise ValueError('--enable_xformers_memory_efficient_attention: xformers is not installed here (it needs a '
                         'CUDA GPU: pip install xformers); drop the flag (PyTorch SDPA is used)')
    if args.enable_npu_flash_attention and not is_torch_npu_available():
        raise ValueError('--enable_npu_flash_attention needs an Ascend NPU with torch_npu; none is available here')
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ImportError('--use_8bit_adam needs bitsandbytes: pip install bitsandbytes') from None
    try:
        SchedulerType(args.lr_scheduler)
    except ValueError:
        raise ValueError(f'--lr_scheduler {args.lr_scheduler!r} is not a diffusers scheduler; use one of '
                         f'{[s.value for s in SchedulerType]}') from None
    for flag in ('conv_method', 'attn_method'):
        if getattr(args, flag).lower() != 'none':
            get_config_class(getattr(args, flag))  # ValueError naming the registered methods
    _check_report_to(args.report_to)
    if args.push_to_hub:
        _check_hub_reachable(args)
    if args.dataset_name is None and not os.path.isdir(args.train_data_dir):
        raise ValueError(f'--train_data_dir {args.train_data_dir!r} is not a folder')
    return resolve_resume(args)


def _check_report_to(report_to: str) -> None:
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType
    if report_to in ('all', 'none'):
        return
    valid = [t for t in LoggerType.list() if t != 'all']
    if report_to not in valid:
        raise ValueError(f'--report_to {report_to!r} is not a tracker; use one of {valid}, "all" or "none"')
    available = [str(t) for t in get_available_trackers()]
    if report_to not in available:
        raise ImportError(f'--report_to {report_to}: the {report_to} package is not installed (pip install '
                          f'{report_to}); trackers available here: {available or "none"}')


def _check_hub_reachable(args: argparse.Namespace) -> None:
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        raise ValueError('--push_to_hub: the Hugging Face Hub is off (HF_HUB_OFFLINE is set, or no network); the '
                         f'outputs stay in {args.output_dir!r} (upload them later with `huggingface-cli upload`)')


def create_hub_repo(args: argparse.Namespace) -> str:
    """As the example, the Hub repository is created before training, so a run that cannot upload stops now."""
    from huggingface_hub import create_repo
    name = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    try:
        return create_repo(repo_id=name, exist_ok=True, token=args.hub_token).repo_id
    except Exception as err:  # network, authentication and name errors all mean: no upload possible
        raise ValueError(f'--push_to_hub: could not create the Hub repository {name!r} ({type(err).__name__}: '
                         f'{err}); drop --push_to_hub, the outputs stay in {args.output_dir!r}') from None


def resolve_resume(args: argparse.Namespace) -> Optional[str]:
    """The checkpoint folder to resume from, as the example: a ``checkpoint-N`` name inside ``--output_dir`` (a
    path's last part is taken) or ``latest``; ``latest`` with none starts a new run, saying so."""
    if not args.resume_from_checkpoint:
        return None
    found = sorted((d for d in os.listdir(args.output_dir) if d.startswith('checkpoint-')),
                   key=lambda d: int(d.split('-')[1])) if os.path.isdir(args.output_dir) else []
    if args.resume_from_checkpoint == 'latest':
        if not found:
            print(f"Checkpoint 'latest' does not exist in {args.output_dir!r}. Starting a new training run.")
            return None
        return os.path.join(args.output_dir, found[-1])
    name = os.path.basename(os.path.normpath(args.resume_from_checkpoint))
    if name not in found:
        raise ValueError(f'--resume_from_checkpoint {args.resume_from_checkpoint!r}: no checkpoint {name!r} in '
                         f'--output_dir {args.output_dir!r}; checkpoints there: {found}; or use "latest"')
    return os.path.join(args.output_dir, name)


# ---- models and adapters ------------------------------------------------------------------------------------------
@dataclass
class Models:
    """The pipeline pieces the training step uses (text encoders may be accelerate-wrapped once prepared)."""
    tokenizers: List[Any]
    text_encoders: List[Any]
    vae: Any
    unet: Any
    noise_scheduler: Any
    weight_dtype: torch.dtype


def load_models(args: argparse.Namespace, accelerator) -> Models:
    """Load the SDXL pieces as the example does: frozen, the UNet and text encoders in the weight dtype, the VAE in
    float32 unless a separate VAE is given."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    path, revision, variant = args.pretrained_model_name_or_path, args.revision, args.variant
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=s, revision=revision) for s in
                  ('tokenizer', 'tokenizer_2')]
    text_encoders = [CLIPTextModel.from_pretrained(path, subfolder='text_encoder', revision=revision,
                                                   variant=variant),
                     CLIPTextModelWithProjection.from_pretrained(path, subfolder='text_encoder_2', revision=revision,
                                                                 variant=variant)]
    vae_path = args.pretrained_vae_model_name_or_path or path
    vae = AutoencoderKL.from_pretrained(vae_path, subfolder=None if args.pretrained_vae_model_name_or_path else 'vae',
                                        revision=revision, variant=variant)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder='unet', revision=revision, variant=variant)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder='scheduler')
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    weight_dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for model in (unet, vae, *text_encoders):
        model.requires_grad_(False)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype if args.pretrained_vae_model_name_or_path else torch.float32)
    for encoder in text_encoders:
        encoder.to(accelerator.device, dtype=weight_dtype)
    if args.enable_npu_flash_attention:
        unet.enable_npu_flash_attention()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    return Models(tokenizers, text_encoders, vae, unet, noise_scheduler, weight_dtype)


def inject_adapters(args: argparse.Namespace, unet, text_encoders) -> List[Any]:
    """The ``conv`` and ``attn`` adapters (rank from --conv_rank/--attn_rank or --rank, or from a budget)."""
    import dataclasses

    import visadapt
    from visadapt.core import get_config_class
    from visadapt.core.budget import match_budget
    from visadapt.integrations import diffusers_pipelines as vd
    conv_options = args.conv_options
    if conv_options is None:
        conv_options = {'r3': 2, 'scale': 1.0} if args.conv_method.lower() == 'flora' else {}
    text_targets = [(te, 'text_attention') for te in text_encoders] if args.train_text_encoder else []
    plan = [('conv', args.conv_method, args.conv_rank, args.conv_budget, conv_options, [(unet, 'conv')]),
            ('attn', args.attn_method, args.attn_rank, args.attn_budget, args.attn_options,
             [(unet, 'attention')] + text_targets)]
    reports = []
    for name, method, rank, budget, options, targets in plan:
        if method.lower() == 'none':
            continue
        ranked = 'r' in {f.name for f in dataclasses.fields(get_config_class(method))}  # (IA)³, BitFit: no rank
        for model, preset in targets:
            config = vd.target_config(model, preset, method, **{**({'r': rank} if ranked else {}), **options})
            if budget is not None and model is unet:
                config = match_budget(model, config, budget, at_most=True).config
            reports.append(visadapt.inject(model, config, name=name))
    return reports


def adapted_components(models: Models, unwrap) -> Dict[str, Any]:
    """``{component: model}`` of the pipeline parts that hold adapters (unwrapped from accelerate)."""
    from visadapt.core import adapter_names
    parts = {'unet': models.unet, 'text_encoder': models.text_encoders[0], 'text_encoder_2': models.text_encoders[1]}
    return {k: unwrap(m) for k, m in parts.items() if adapter_names(unwrap(m))}


def make_optimizer(args: argparse.Namespace, params: List[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if args.use_8bit_adam:
        import bitsandbytes as bnb
        optimizer_class, extra = bnb.optim.AdamW8bit, {}
    else:
        from ._optim import fused_adam_kwargs
        optimizer_class, extra = torch.optim.AdamW, fused_adam_kwargs(params)
    return optimizer_class(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **extra)


# ---- data --------------------------------------------------------------------------------------------------------
def load_train_split(args: argparse.Namespace):
    """The training split, loaded as the example does (``load_dataset``), or a ``save_to_disk`` folder."""
    from datasets import Dataset, load_dataset, load_from_disk
    name = args.dataset_name
    if name is not None and any(os.path.isfile(os.path.join(name, f)) for f in ('dataset_dict.json', 'state.json')):
        dataset = load_from_disk(name)
        dataset = {'train': dataset} if isinstance(dataset, Dataset) else dataset
    elif name is not None:
        dataset = load_dataset(name, args.dataset_config_name, cache_dir=args.cache_dir, data_dir=args.train_data_dir)
    else:
        dataset = load_dataset('imagefolder', data_files={'train': os.path.join(args.train_data_dir, '**')},
                               cache_dir=args.cache_dir)
    if 'train' not in dataset:
        raise ValueError(f'the dataset has no "train" split; its splits: {list(dataset)}')
    split = dataset['train']
    for flag in ('image_column', 'caption_column'):
        if getattr(args, flag) not in split.column_names:
            raise ValueError(f"--{flag} value {getattr(args, flag)!r} needs to be one of: {split.column_names}")
    if args.max_train_samples is not None:
        split = split.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(split))))
    return split


class StyleDataset(torch.utils.data.Dataset):
    """The example's preprocessing of one example: resize, crop (center or random), optional flip, tokenize with
    both tokenizers, and SDXL's size/crop conditioning.

    The random draws (crop offset, flip, caption choice) come from a generator seeded by (seed, epoch, index), not
    from the global RNG, so a run resumed mid-epoch sees the same images and noise as the uninterrupted run (the data
    loader reads one batch ahead of the step it trains).
    """

    def __init__(self, split, args: argparse.Namespace, tokenizers, seed: int):
        from torchvision import transforms
        self.split, self.args, self.tokenizers, self.seed, self.epoch = split, args, tokenizers, seed, 0
        self.resize = transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR)
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        from torchvision.transforms import functional as TF
        args, rng = self.args, random.Random(f'{self.seed}/{self.epoch}/{index}')
        row = self.split[index]
        source = row[args.image_column]
        image = source.convert('RGB')
        original_size = (image.height, image.width)
        image = self.resize(image)
        if args.random_flip and rng.random() < 0.5:
            image = TF.hflip(image)
        size = args.resolution
        if args.center_crop:
            top, left = max(0, round((image.height - size) / 2.0)), max(0, round((image.width - size) / 2.0))
            image = TF.center_crop(image, [size, size])
        else:
            top, left = rng.randint(0, max(0, image.height - size)), rng.randint(0, max(0, image.width - size))
            image = TF.crop(image, top, left, size, size)
        caption = row[args.caption_column]
        if not isinstance(caption, str):
            if not isinstance(caption, (list, tuple)) or not caption:
                raise ValueError(f'caption column {args.caption_column!r} must hold strings or lists of strings, got '
                                 f'{type(caption).__name__} in row {index}')
            caption = rng.choice(caption)
        ids = [tok(caption, padding='max_length', max_length=tok.model_max_length, truncation=True,
                   return_tensors='pt').input_ids[0] for tok in self.tokenizers]
        return {'pixel_values': self.to_tensor(image), 'input_ids_one': ids[0], 'input_ids_two': ids[1],
                'original_size': original_size, 'crop_top_left': (top, left),
                'filename': os.path.basename(getattr(source, 'filename', '') or '')}


def collate(examples: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {'pixel_values': torch.stack([e['pixel_values'] for e in examples]).float(),
            'input_ids_one': torch.stack([e['input_ids_one'] for e in examples]),
            'input_ids_two': torch.stack([e['input_ids_two'] for e in examples]),
            'original_sizes': [e['original_size'] for e in examples],
            'crop_top_lefts': [e['crop_top_left'] for e in examples],
            'filenames': [e['filename'] for e in examples if e['filename']]}


# ---- the loss ------------------------------------------------------------------------------------------------------
def encode_prompt(text_encoders, input_ids: List[torch.Tensor], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning: both encoders' penultimate hidden states concatenated, and encoder 2's pooled output."""
    embeds, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids):  # (encoders may be DDP-wrapped: no .device)
        out = encoder(ids.to(device), output_hidden_states=True, return_dict=True)
        pooled = out[0]  # the last encoder's (projected) pooled output
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def add_time_ids(batch: Dict[str, Any], resolution: int, device, dtype) -> torch.Tensor:
    """SDXL's micro-conditioning: original size, crop top-left and target size per image."""
    rows = [list(o) + list(c) + [resolution, resolution] for o, c in zip(batch['original_sizes'],
                                                                         batch['crop_top_lefts'])]
    return torch.tensor(rows, device=device, dtype=dtype)


def diffusion_loss(args: argparse.Namespace, batch: Dict[str, Any], models: Models,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The example's SDXL loss of one batch: noise (plus ``--noise_offset``), the scheduler's target (epsilon or
    v), MSE, and with ``--snr_gamma`` diffusers' Min-SNR weights (``compute_snr``)."""
    from diffusers.training_utils import compute_snr
    scheduler, weight_dtype = models.noise_scheduler, models.weight_dtype
    pixels = batch['pixel_values'].to(models.vae.dtype)
    device = pixels.device
    with torch.no_grad():
        latents = models.vae.encode(pixels).latent_dist.sample(generator=generator)
        latents = (latents * models.vae.config.scaling_factor).to(weight_dtype)
    noise = torch.randn(latents.shape, generator=generator, device=device).to(weight_dtype)
    if args.noise_offset:  # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        noise = noise + args.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator,
                                                        device=device).to(weight_dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                              device=device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with torch.set_grad_enabled(args.train_text_encoder and torch.is_grad_enabled()):
        prompt_embeds, pooled = encode_prompt(models.text_encoders, [batch['input_ids_one'],
                                                                     batch['input_ids_two']], device)
    cond = {'time_ids': add_time_ids(batch, args.resolution, device, weight_dtype), 'text_embeds': pooled}
    pred = models.unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=cond, return_dict=False)[0]
    prediction_type = scheduler.config.prediction_type
    if prediction_type == 'epsilon':
        target = noise
    elif prediction_type == 'v_prediction':
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f'unknown prediction_type {prediction_type!r}; use epsilon or v_prediction')
    if args.snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction='mean')
    snr = compute_snr(scheduler, timesteps)  # Min-SNR weighting, arXiv:2303.09556 §3.4
    weights = torch.stack([snr, args.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    weights = weights / snr if prediction_type == 'epsilon' else weights / (snr + 1)
    loss = F.mse_loss(pred.float(), target.float(), reduction='none')
    return (loss.mean(dim=list(range(1, loss.dim()))) * weights).mean()


# ---- one run ---------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything one training run carries between its phases."""
    args: argparse.Namespace
    accelerator: Any
    models: Models
    reports: List[Any]
    params: List[torch.nn.Parameter] = field(default_factory=list)
    trainable: List[Any] = field(default_factory=list)
    dataset: Any = None
    loader: Any = None
    optimizer: Any = None
    lr_scheduler: Any = None
    steps_per_epoch: int = 0
    global_step: int = 0
    first_epoch: int = 0
    history: List[Tuple[int, float]] = field(default_factory=list)
    metrics: Dict[str, Any] = field(default_factory=dict)

    def unwrap(self, model):
        """The module itself: without accelerate's DDP/precision wrappers and torch.compile's (``accelerate launch
        --dynamo_backend``), so adapters are read and saved under their own names."""
        return self.accelerator.unwrap_model(model, keep_torch_compile=False)


def make_accelerator(args: argparse.Namespace):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == 'none' else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        # the first text encoder feeds its penultimate layer: its last layer's adapters get no gradient
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        # data order a function of (seed, epoch), so a resumed run draws the same batches
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))


def setup(args: argparse.Namespace) -> Run:
    """Accelerator, models, adapters, optimizer, data and scheduler, prepared; the checkpoint hooks registered."""
    from accelerate.utils import set_seed
    accelerator = make_accelerator(args)
    _configure_logging(accelerator)
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        args.hub_repo_id = create_hub_repo(args) if args.push_to_hub else None
    models = load_models(args, accelerator)
    run = Run(args, accelerator, models, inject_adapters(args, models.unet, models.text_encoders))
    for report in run.reports:
        logger.info(str(report))
    if not args.no_lora_weights:
        check_lora_file(run)
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for encoder in models.text_encoders:
                encoder.gradient_checkpointing_enable()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    run.trainable = [models.unet] + (models.text_encoders if args.train_text_encoder else [])
    run.params = [p for m in run.trainable for p in m.parameters() if p.requires_grad]
    if any(p.dtype != torch.float32 for p in run.params):
        raise ValueError('adapter parameters must be float32 for mixed-precision training')
    run.optimizer = make_optimizer(args, run.params)
    _setup_data(run)
    _prepare(run)
    register_checkpoint_hooks(run)
    return run


def check_lora_file(run: Run) -> None:
    """Refuse at start what pytorch_lora_weights.safetensors could not hold (a method without a LoRA form)."""
    from visadapt.integrations import diffusers_pipelines as vd
    try:
        vd.diffusers_lora_state_dict(adapted_components(run.models, run.unwrap))
    except ValueError as err:
        raise ValueError(f'{err}. The diffusers LoRA file {vd.DIFFUSERS_LORA_NAME} needs methods with a LoRA form '
                         f'(FLoRA, LoRA, DoRA, MoSLoRA, MELoRA, VeRA, SeRA, SVFT); or pass --no_lora_weights '
                         f'(--export merged writes the merged UNet)') from None


def _setup_data(run: Run) -> None:
    args, accelerator = run.args, run.accelerator
    with accelerator.main_process_first():
        split = load_train_split(args)
    seed = args.seed if args.seed is not None else torch.initial_seed()
    run.dataset = StyleDataset(split, args, run.models.tokenizers, seed)
    # the loader's own generator: creating an iterator draws its base seed there, not from the global RNG
    run.loader = torch.utils.data.DataLoader(run.dataset, batch_size=args.train_batch_size, shuffle=True,
                                             collate_fn=collate, num_workers=args.dataloader_num_workers,
                                             generator=torch.Generator().manual_seed(seed))
    batches = math.ceil(len(run.loader) / accelerator.num_processes)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * math.ceil(batches / args.gradient_accumulation_steps)
    from diffusers.optimization import get_scheduler
    # accelerate steps a prepared scheduler once per process per optimizer step
    run.lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=run.optimizer,
                                     num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                     num_training_steps=args.max_train_steps * accelerator.num_processes)


def _prepare(run: Run) -> None:
    args, accelerator = run.args, run.accelerator
    prepared = accelerator.prepare(*run.trainable, run.optimizer, run.loader, run.lr_scheduler)
    run.trainable = list(prepared[:len(run.trainable)])
    run.optimizer, run.loader, run.lr_scheduler = prepared[-3:]
    run.models.unet = run.trainable[0]
    if args.train_text_encoder:
        run.models.text_encoders = run.trainable[1:]
    run.steps_per_epoch = math.ceil(len(run.loader) / args.gradient_accumulation_steps)
    args.num_train_epochs = math.ceil(args.max_train_steps / run.steps_per_epoch)
    if accelerator.is_main_process:
        accelerator.init_trackers(TRACKER_PROJECT, config=_tracker_config(args))


def _tracker_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The flags as tracker hyper-parameters (trackers take scalars and strings only; never the Hub token)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in vars(args).items()
            if v is not None and k != 'hub_token'}


def _configure_logging(accelerator) -> None:
    import datasets
    import diffusers
    import transformers
    logging.basicConfig(format='%(asctime)s - %(levelname)s - %(name)s - %(message)s', datefmt='%m/%d/%Y %H:%M:%S',
                        level=logging.INFO)
    quiet = not accelerator.is_local_main_process  # other processes report errors only
    datasets.utils.logging.set_verbosity(logging.ERROR if quiet else logging.WARNING)
    transformers.utils.logging.set_verbosity(logging.ERROR if quiet else logging.WARNING)
    diffusers.utils.logging.set_verbosity(logging.ERROR if quiet else logging.INFO)


# ---- checkpoints ---------------------------------------------------------------------------------------------------
def save_lora_files(run: Run, directory: str) -> None:
    """visadapt's ``adapter/`` and (unless --no_lora_weights) diffusers' ``pytorch_lora_weights.safetensors``."""
    from visadapt.integrations import diffusers_pipelines as vd
    components = adapted_components(run.models, run.unwrap)
    vd.save_pipeline_adapters(components, os.path.join(directory, 'adapter'))
    if not run.args.no_lora_weights:
        vd.save_diffusers_lora(components, directory)


def register_checkpoint_hooks(run: Run) -> None:
    """accelerate's save_state/load_state write and read the adapters only, never the frozen weights."""
    from visadapt.core import adapter_names, load_adapter_state_dict, read_adapter
    accelerator = run.accelerator

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_lora_files(run, output_dir)
        weights.clear()

    def load_hook(models, input_dir):
        components = adapted_components(run.models, run.unwrap)
        names = {id(m): c for c, m in components.items()}
        while models:
            model = run.unwrap(models.pop())
            component = names[id(model)]
            for adapter in adapter_names(model):
                _, tensors = read_adapter(os.path.join(input_dir, 'adapter', component, adapter))
                load_adapter_state_dict(model, {k: v.to(accelerator.device) for k, v in tensors.items()}, adapter,
                                        source=f'checkpoint {input_dir!r}')

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(run: Run) -> None:
    """``checkpoint-<step>``, pruning the oldest first to keep --checkpoints_total_limit (as the example)."""
    from visadapt.core import atomic_write_bytes
    args, accelerator = run.args, run.accelerator
    if accelerator.is_main_process and args.checkpoints_total_limit is not None:
        found = sorted((d for d in os.listdir(args.output_dir) if d.startswith('checkpoint-')),
                       key=lambda d: int(d.split('-')[1]))
        for old in found[:max(0, len(found) - args.checkpoints_total_limit + 1)]:
            logger.info(f'removing checkpoint {old} (--checkpoints_total_limit {args.checkpoints_total_limit})')
            shutil.rmtree(os.path.join(args.output_dir, old))
    path = os.path.join(args.output_dir, f'checkpoint-{run.global_step}')
    accelerator.save_state(path)
    if accelerator.is_main_process:
        atomic_write_bytes(os.path.join(path, 'loss_history.json'), json.dumps(run.history).encode())
        logger.info(f'Saved state to {path}')


def resume(run: Run, checkpoint: Optional[str]) -> None:
    if checkpoint is None:
        return
    run.accelerator.print(f'Resuming from checkpoint {os.path.basename(checkpoint)}')
    run.accelerator.load_state(checkpoint)
    run.global_step = int(os.path.basename(checkpoint).split('-')[1])
    run.first_epoch = run.global_step // run.steps_per_epoch
    history = os.path.join(checkpoint, 'loss_history.json')
    if os.path.isfile(history):
        with open(history) as f:
            run.history = [tuple(h) for h in json.load(f)]


# ---- training ------------------------------------------------------------------------------------------------------
def train(run: Run) -> None:
    """The example's epoch loop: accumulate, clip, step; log, checkpoint and validate on its schedule."""
    from tqdm.auto import tqdm
    args, accelerator = run.args, run.accelerator
    progress = tqdm(range(args.max_train_steps), initial=run.global_step, desc='Steps',
                    disable=not accelerator.is_local_main_process)
    start, first_step = time.perf_counter(), run.global_step
    for epoch in range(run.first_epoch, args.num_train_epochs):
        for model in run.trainable:
            model.train()
        run.dataset.set_epoch(epoch)
        run.loader.set_epoch(epoch)
        batches, train_loss = run.loader, 0.0
        done_in_epoch = run.global_step - epoch * run.steps_per_epoch
        if done_in_epoch > 0:  # resumed mid-epoch: skip what the checkpointed run already trained on
            batches = accelerator.skip_first_batches(run.loader, done_in_epoch * args.gradient_accumulation_steps)
            batches.set_epoch(epoch)
        for batch in batches:
            with accelerator.accumulate(*run.trainable):
                with accelerator.autocast():
                    loss = diffusion_loss(args, batch, run.models)
                if args.debug_loss:
                    for name in batch['filenames']:
                        accelerator.log({f'loss_for_{name}': loss.item()}, step=run.global_step)
                train_loss += accelerator.gather(loss.detach().repeat(len(batch['pixel_values']))).mean().item() \
                    / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(run.params, args.max_grad_norm)
                run.optimizer.step()
                run.lr_scheduler.step()
                run.optimizer.zero_grad()
            if accelerator.sync_gradients:
                _after_update(run, train_loss, progress)
                train_loss = 0.0
            progress.set_postfix(step_loss=loss.detach().item(), lr=run.lr_scheduler.get_last_lr()[0])
            if run.global_step >= args.max_train_steps:
                break
        if accelerator.is_main_process and args.validation_prompt and epoch % args.validation_epochs == 0:
            run.metrics.setdefault('validation', []).extend(validate(run, epoch))
        if run.global_step >= args.max_train_steps:
            break
    progress.close()
    run.metrics['seconds_per_step'] = (time.perf_counter() - start) / max(run.global_step - first_step, 1)


def _after_update(run: Run, train_loss: float, progress) -> None:
    run.global_step += 1
    run.history.append((run.global_step, train_loss))
    progress.update(1)
    run.accelerator.log({'train_loss': train_loss}, step=run.global_step)
    if run.global_step % run.args.checkpointing_steps == 0:
        save_checkpoint(run)


# ---- validation and outputs -----------------------------------------------------------------------------------------
def validate(run: Run, epoch: int, pipeline=None, final: bool = False) -> List[str]:
    """``--num_validation_images`` images of ``--validation_prompt`` (same seed every time), saved as PNG and logged
    to the trackers (tensorboard: ``validation`` / ``test`` images, as the example)."""
    import numpy as np
    from diffusers import StableDiffusionXLPipeline
    args, accelerator = run.args, run.accelerator
    if args.num_validation_images == 0:
        return []
    if pipeline is None:
        pipeline = StableDiffusionXLPipeline.from_pretrained(
            args.pretrained_model_name_or_path, vae=run.models.vae, torch_dtype=run.models.weight_dtype,
            text_encoder=run.unwrap(run.models.text_encoders[0]), text_encoder_2=run.unwrap(run.models.text_encoders[1]),
            unet=run.unwrap(run.models.unet), revision=args.revision, variant=args.variant)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed) if args.seed is not None else None
    extra = {} if args.num_inference_steps is None else {'num_inference_steps': args.num_inference_steps}
    with torch.no_grad(), accelerator.autocast():
        images = [pipeline(args.validation_prompt, generator=generator, **extra).images[0]
                  for _ in range(args.num_validation_images)]
    phase = 'test' if final else 'validation'
    for tracker in accelerator.trackers:
        if tracker.name == 'tensorboard':
            tracker.writer.add_images(phase, np.stack([np.asarray(im) for im in images]), epoch, dataformats='NHWC')
    os.makedirs(os.path.join(args.output_dir, 'validation'), exist_ok=True)
    paths = [os.path.join(args.output_dir, 'validation', f'{phase}-epoch{epoch:03d}-{i}.png') for i in
             range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return paths


def final_validation(run: Run, epoch: int) -> List[str]:
    """As the example: a fresh pipeline reads the LoRA file from --output_dir (``load_lora_weights``) and generates;
    with --no_lora_weights it loads visadapt's ``adapter/`` instead."""
    from diffusers import StableDiffusionXLPipeline

    from visadapt.integrations import diffusers_pipelines as vd
    args = run.args
    pipeline = StableDiffusionXLPipeline.from_pretrained(args.pretrained_model_name_or_path, vae=run.models.vae,
                                                         revision=args.revision, variant=args.variant,
                                                         torch_dtype=run.models.weight_dtype)
    pipeline.to(run.accelerator.device)
    if args.no_lora_weights:
        vd.load_into_pipeline(pipeline, os.path.join(args.output_dir, 'adapter'))
    else:
        pipeline.load_lora_weights(args.output_dir)
    return validate(run, epoch, pipeline, final=True)


def finish(run: Run) -> None:
    """The outputs of --output_dir (main process): LoRA file and adapters, exports, curves, metrics, Hub upload."""
    from visadapt.core import atomic_write_bytes
    from visadapt.integrations import diffusers_pipelines as vd
    from visadapt.integrations import kohya_format
    args, out = run.args, run.args.output_dir
    save_lora_files(run, out)
    components = adapted_components(run.models, run.unwrap)
    if 'kohya' in args.export:
        kohya_format.save_kohya(components, os.path.join(out, 'export', 'kohya.safetensors'))
    if 'merged' in args.export:
        vd.save_merged_unet(components['unet'], os.path.join(out, 'export', 'merged_unet'))
    atomic_write_bytes(os.path.join(out, 'loss_history.json'), json.dumps(run.history).encode())
    if run.history:
        plot_loss(run.history, os.path.join(out, 'loss_curve.png'),
                  f'{args.conv_method} convs + {args.attn_method} attention')
    if args.validation_prompt and args.num_validation_images > 0:
        run.metrics['final_validation'] = final_validation(run, args.num_train_epochs - 1)
    if args.push_to_hub:
        push_to_hub(run)
    atomic_write_bytes(os.path.join(out, 'train_metrics.json'), json.dumps(run.metrics, indent=2).encode())
    logger.info(json.dumps({k: v for k, v in run.metrics.items() if k not in ('adapters', 'history', 'validation')}))


def push_to_hub(run: Run) -> None:
    """The example's model card (diffusers' card helpers) and upload of --output_dir."""
    from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
    from huggingface_hub import upload_folder
    args = run.args
    repo_id = args.hub_repo_id
    card = load_or_create_model_card(repo_id_or_path=repo_id, from_training=True, license='creativeml-openrail-m',
                                     base_model=args.pretrained_model_name_or_path, inference=True,
                                     model_description=f'visadapt adapters ({", ".join(map(str, run.reports))}) '
                                                       f'for {args.pretrained_model_name_or_path}, trained on '
                                                       f'{args.dataset_name or args.train_data_dir}.')
    populate_model_card(card, tags=['stable-diffusion-xl', 'diffusers', 'diffusers-training', 'lora', 'visadapt'])
    card.save(os.path.join(args.output_dir, 'README.md'))
    upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message='End of training',
                  ignore_patterns=['step_*', 'epoch_*'], token=args.hub_token)


def plot_loss(history: List[Tuple[int, float]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    steps, losses = zip(*history)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label='step loss')
    k = max(1, len(losses) // 20)
    if len(losses) > k:
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.5, label=f'mean of last {k}')
    ax.set_xlabel('step')
    ax.set_ylabel('MSE loss')
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- entry points ----------------------------------------------------------------------------------------------------
def fixed_batch_loss(run: Run) -> float:
    """Loss of the first batch (no augmentation draws: epoch 0 order) with fixed noise and timesteps."""
    batch = collate([run.dataset[i] for i in range(min(run.args.train_batch_size, len(run.dataset)))])
    batch['pixel_values'] = batch['pixel_values'].to(run.accelerator.device)
    generator = torch.Generator(device=run.accelerator.device).manual_seed(1234)
    with torch.no_grad(), run.accelerator.autocast():
        return diffusion_loss(run.args, batch, run.models, generator=generator).item()


def run_training(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Train; returns the metrics (also written to ``train_metrics.json``)."""
    args = parse_args(argv)
    checkpoint = check_environment(args)
    state = setup(args)
    resume(state, checkpoint)
    accelerator = state.accelerator
    state.metrics.update({'adapters': [str(r) for r in state.reports], 'device': str(accelerator.device),
                          'trainable_parameters': sum(p.numel() for p in state.params),
                          'num_processes': accelerator.num_processes, 'mixed_precision': accelerator.mixed_precision,
                          'resumed_from': checkpoint})
    if args.eval_fixed_batch and state.global_step == 0:
        state.metrics['fixed_batch_loss_before'] = fixed_batch_loss(state)
    train(state)
    state.metrics.update({'steps': state.global_step, 'history': state.history})
    if args.eval_fixed_batch:
        state.metrics['fixed_batch_loss_after'] = fixed_batch_loss(state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finish(state)
    accelerator.end_training()
    return state.metrics


def main(argv: Optional[List[str]] = None) -> int:
    run_training(argv)
    return 0


if __name__ == '__main__':
    sys.exit(main())
