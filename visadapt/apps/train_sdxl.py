"""Style-tune Stable Diffusion XL with visadapt: FLoRA on every UNet conv, a linear method on the attention.

Modeled on diffusers' ``examples/text_to_image/train_text_to_image_lora_sdxl.py`` (same flag names), with two named
adapters instead of one PEFT LoRA: ``conv`` (``--conv_method``, default FLoRA, on conv_in/conv_out, the resnets'
conv1/conv2/conv_shortcut and the down/upsamplers) and ``attn`` (``--attn_method``, default LoRA, on to_q/to_k/to_v/
to_out.0; with ``--train_text_encoder`` also on both CLIP encoders' q/k/v/out projections). Frozen weights are kept in
the ``--mixed_precision`` dtype, adapter weights in float32 (the VAE stays float32, as in diffusers' script).

Runs unchanged on one process, several GPUs or several nodes through ``accelerate launch``::

    accelerate launch -m visadapt.apps.train_sdxl --pretrained_model_name_or_path <sdxl dir> \\
        --train_data_dir data/clipart-fruit --resolution 1024 --train_batch_size 1 --max_train_steps 2000 \\
        --learning_rate 1e-4 --mixed_precision bf16 --conv_rank 8 --attn_method LoRA --attn_rank 8 \\
        --validation_prompt "an apple, clipart style" --output_dir out/sdxl-clipart --export kohya diffusers

Outputs in ``--output_dir``: ``adapter/`` (our format, :func:`visadapt.integrations.diffusers_pipelines.load_into_pipeline` reads it),
``checkpoint-<step>/`` (adapter + optimizer/scheduler/RNG state, for ``--resume_from_checkpoint``),
``validation/step-<step>-<i>.png``, ``loss_history.json``, ``loss_curve.png``, ``train_metrics.json`` and, per
``--export``, ``export/kohya.safetensors``, ``export/diffusers_lora/`` and ``export/merged_unet/``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import visadapt
from visadapt.core import atomic_write_bytes, load_adapter_state_dict, read_adapter
from visadapt.core.budget import match_budget
from visadapt.integrations import diffusers_pipelines as vd

__all__ = ['main', 'parse_args']

logger = logging.getLogger('train_sdxl_style')
EXPORTS = ('kohya', 'diffusers', 'merged')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description='Style-tune SDXL with visadapt adapters (FLoRA on convs, ...).')
    p.add_argument('--pretrained_model_name_or_path', required=True, help='local SDXL pipeline directory')
    p.add_argument('--train_data_dir', required=True, help='imagefolder with a metadata.jsonl of captions')
    p.add_argument('--caption_column', default='text')
    p.add_argument('--max_train_samples', type=int, default=None, help='use only the first N images')
    p.add_argument('--resolution', type=int, default=1024)
    p.add_argument('--center_crop', action='store_true', help='center crop (default: random crop)')
    p.add_argument('--random_flip', action='store_true')
    p.add_argument('--train_batch_size', type=int, default=1)
    p.add_argument('--dataloader_num_workers', type=int, default=0)
    p.add_argument('--gradient_accumulation_steps', type=int, default=1)
    p.add_argument('--max_train_steps', type=int, default=1000)
    p.add_argument('--learning_rate', type=float, default=1e-4)
    p.add_argument('--lr_scheduler', default='constant',
                   help='linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup')
    p.add_argument('--lr_warmup_steps', type=int, default=0)
    p.add_argument('--adam_beta1', type=float, default=0.9)
    p.add_argument('--adam_beta2', type=float, default=0.999)
    p.add_argument('--adam_weight_decay', type=float, default=1e-2)
    p.add_argument('--adam_epsilon', type=float, default=1e-8)
    p.add_argument('--max_grad_norm', type=float, default=1.0)
    p.add_argument('--mixed_precision', choices=['no', 'fp16', 'bf16'], default=None,
                   help="dtype of the frozen weights and autocast (default: accelerate's config)")
    p.add_argument('--gradient_checkpointing', action='store_true')
    p.add_argument('--checkpointing_steps', type=int, default=500)
    p.add_argument('--checkpoints_total_limit', type=int, default=None)
    p.add_argument('--resume_from_checkpoint', default=None, help='a checkpoint directory, or "latest"')
    p.add_argument('--validation_prompt', default=None)
    p.add_argument('--num_validation_images', type=int, default=4)
    p.add_argument('--validation_steps', type=int, default=None, help='also validate every N steps')
    p.add_argument('--num_inference_steps', type=int, default=25)
    p.add_argument('--seed', type=int, default=None)
    p.add_argument('--output_dir', default='sdxl-visadapt-style')
    # adapters
    p.add_argument('--conv_method', default='FLoRA', help='method on the UNet convs, or "none"')
    p.add_argument('--conv_rank', type=int, default=8)
    p.add_argument('--conv_budget', type=int, default=None, help='trainable-parameter budget: sets the conv rank')
    p.add_argument('--conv_options', type=json.loads, default=None,
                   help='JSON of other config fields of the conv method (default for FLoRA: {"r3": 2, "scale": 1.0})')
    p.add_argument('--attn_method', default='LoRA', help='method on to_q/to_k/to_v/to_out.0, or "none"')
    p.add_argument('--attn_rank', type=int, default=4)
    p.add_argument('--attn_budget', type=int, default=None, help='trainable-parameter budget: sets the attn rank')
    p.add_argument('--attn_options', type=json.loads, default={}, help='JSON of other fields of the attn method')
    p.add_argument('--train_text_encoder', action='store_true', help='also adapt both text encoders (attn method)')
    p.add_argument('--export', nargs='*', default=[], choices=EXPORTS, help='exports written after training')
    p.add_argument('--eval_fixed_batch', action='store_true',
                   help='log the loss of the first batch with fixed noise and timesteps before and after training')
    args = p.parse_args(argv)
    if args.conv_method.lower() == 'none' and args.attn_method.lower() == 'none':
        p.error('--conv_method and --attn_method are both "none": nothing to train')
    for flag in ('resolution', 'train_batch_size', 'gradient_accumulation_steps', 'max_train_steps',
                 'checkpointing_steps', 'num_validation_images', 'conv_rank', 'attn_rank'):
        if getattr(args, flag) <= 0:
            p.error(f'--{flag} must be positive, got {getattr(args, flag)}')
    return args


# ---- data -------------------------------------------------------------------------------------------------------
class CaptionedImageFolder(torch.utils.data.Dataset):
    """``metadata.jsonl`` rows ``{"file_name": ..., <caption_column>: ...}`` → SDXL training examples."""

    def __init__(self, root: str, tokenizers, resolution: int, center_crop: bool, random_flip: bool,
                 caption_column: str = 'text', max_samples: Optional[int] = None):
        from torchvision import transforms
        meta = os.path.join(root, 'metadata.jsonl')
        if not os.path.isfile(meta):
            raise FileNotFoundError(f'{meta!r} not found; --train_data_dir must be an imagefolder with a metadata.jsonl '
                                    f'(tools/make_clipart_styleset.py writes one)')
        with open(meta) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for row in rows:
            if 'file_name' not in row or caption_column not in row:
                raise ValueError(f'{meta!r}: row {row} lacks "file_name" or the caption column {caption_column!r}')
        self.rows = rows[:max_samples] if max_samples else rows
        if not self.rows:
            raise ValueError(f'{meta!r} lists no images')
        self.root, self.tokenizers, self.caption_column = root, tokenizers, caption_column
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.resize = transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR)
        self.crop = transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution)
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        from PIL import Image
        from torchvision.transforms import functional as TF
        row = self.rows[i]
        with Image.open(os.path.join(self.root, row['file_name'])) as im:
            image = im.convert('RGB')
        original_size = (image.height, image.width)
        image = self.resize(image)
        if self.random_flip and torch.rand(()) < 0.5:
            image = TF.hflip(image)
        if self.center_crop:
            top = max(0, round((image.height - self.resolution) / 2.0))
            left = max(0, round((image.width - self.resolution) / 2.0))
            image = self.crop(image)
        else:
            top, left, h, w = self.crop.get_params(image, (self.resolution, self.resolution))
            image = TF.crop(image, top, left, h, w)
        ids = [tok(row[self.caption_column], padding='max_length', max_length=tok.model_max_length,
                   truncation=True, return_tensors='pt').input_ids[0] for tok in self.tokenizers]
        return {'pixel_values': self.to_tensor(image), 'input_ids_one': ids[0], 'input_ids_two': ids[1],
                'original_size': original_size, 'crop_top_left': (top, left)}


def collate(examples: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {'pixel_values': torch.stack([e['pixel_values'] for e in examples]).float(),
            'input_ids_one': torch.stack([e['input_ids_one'] for e in examples]),
            'input_ids_two': torch.stack([e['input_ids_two'] for e in examples]),
            'original_sizes': [e['original_size'] for e in examples],
            'crop_top_lefts': [e['crop_top_left'] for e in examples]}


# ---- model pieces -------------------------------------------------------------------------------------------------
def encode_prompt(text_encoders, input_ids: List[torch.Tensor], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """SDXL conditioning: both encoders' penultimate hidden states concatenated, and encoder 2's pooled output."""
    embeds, pooled = [], None
    for encoder, ids in zip(text_encoders, input_ids):  # (encoders may be DDP-wrapped: no .device)
        out = encoder(ids.to(device), output_hidden_states=True, return_dict=True)
        pooled = out[0]  # the last encoder's (projected) pooled output
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def add_time_ids(batch: Dict[str, Any], resolution: int, device, dtype) -> torch.Tensor:
    rows = [list(o) + list(c) + [resolution, resolution] for o, c in zip(batch['original_sizes'],
                                                                         batch['crop_top_lefts'])]
    return torch.tensor(rows, device=device, dtype=dtype)


def diffusion_loss(batch, unet, vae, text_encoders, scheduler, resolution: int, weight_dtype,
                   generator: Optional[torch.Generator] = None, text_grad: bool = False) -> torch.Tensor:
    """The SDXL denoising loss (epsilon or v-prediction, per the scheduler) of one batch."""
    device = batch['pixel_values'].device
    with torch.no_grad():
        latents = vae.encode(batch['pixel_values'].to(vae.dtype)).latent_dist.sample(generator=generator)
        latents = (latents * vae.config.scaling_factor).to(weight_dtype)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device).to(weight_dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                      device=latents.device).long()
    noisy = scheduler.add_noise(latents, noise, t)
    with torch.set_grad_enabled(text_grad and torch.is_grad_enabled()):
        prompt_embeds, pooled = encode_prompt(text_encoders, [batch['input_ids_one'], batch['input_ids_two']],
                                        device)
    cond = {'time_ids': add_time_ids(batch, resolution, device, weight_dtype), 'text_embeds': pooled}
    pred = unet(noisy, t, prompt_embeds, added_cond_kwargs=cond, return_dict=False)[0]
    if scheduler.config.prediction_type == 'epsilon':
        target = noise
    elif scheduler.config.prediction_type == 'v_prediction':
        target = scheduler.get_velocity(latents, noise, t)
    else:
        raise ValueError(f'unknown prediction_type {scheduler.config.prediction_type!r}')
    return F.mse_loss(pred.float(), target.float(), reduction='mean')


def inject_adapters(args, unet, text_encoders) -> List[visadapt.InjectReport]:
    """The ``conv`` and ``attn`` adapters (rank from --*_rank, or from --*_budget)."""
    reports = []
    conv_options = args.conv_options
    if conv_options is None:
        conv_options = {'r3': 2, 'scale': 1.0} if args.conv_method.lower() == 'flora' else {}
    plan = [('conv', args.conv_method, args.conv_rank, args.conv_budget, conv_options, [(unet, 'conv')]),
            ('attn', args.attn_method, args.attn_rank, args.attn_budget, args.attn_options,
             [(unet, 'attention')] + ([(te, 'text_attention') for te in text_encoders]
                                      if args.train_text_encoder else []))]
    for name, method, rank, budget, options, targets in plan:
        if method.lower() == 'none':
            continue
        for model, preset in targets:
            config = vd.target_config(model, preset, method, r=rank, **options)
            if budget is not None and model is unet:
                config = match_budget(model, config, budget, at_most=True).config
            reports.append(visadapt.inject(model, config, name=name))
    return reports


def plot_loss(history: List[Tuple[int, float]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    steps, losses = zip(*history)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label='step loss')
    k = max(1, len(losses) // 20)
    if len(losses) > k:
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, lw=1.5, label=f'mean of last {k}')
    ax.set_xlabel('step')
    ax.set_ylabel('MSE loss')
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def validate(args, accelerator, components, weight_dtype, step: int) -> List[str]:
    """Generate ``--num_validation_images`` images for ``--validation_prompt`` and save them as PNG."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline(
        scheduler=EulerDiscreteScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder='scheduler'),
        add_watermarker=False, **components)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed or 0)
    paths = []
    os.makedirs(os.path.join(args.output_dir, 'validation'), exist_ok=True)
    with torch.no_grad(), accelerator.autocast():
        for i in range(args.num_validation_images):
            image = pipe(args.validation_prompt, num_inference_steps=args.num_inference_steps, height=args.resolution,
                         width=args.resolution, generator=generator).images[0]
            path = os.path.join(args.output_dir, 'validation', f'step-{step:06d}-{i}.png')
            image.save(path)
            paths.append(path)
    return paths


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    vd.has_diffusers(necessary=True)
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision,
                              project_config=ProjectConfiguration(project_dir=args.output_dir),
                              # text encoder 1 feeds its penultimate layer: its last layer's adapters get no gradient
                              kwargs_handlers=[DistributedDataParallelKwargs(
                                  find_unused_parameters=args.train_text_encoder)])
    logging.basicConfig(format='%(asctime)s %(levelname)s %(name)s: %(message)s', level=logging.INFO)
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    path = args.pretrained_model_name_or_path
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=s) for s in ('tokenizer', 'tokenizer_2')]
    text_encoders = [CLIPTextModel.from_pretrained(path, subfolder='text_encoder'),
                     CLIPTextModelWithProjection.from_pretrained(path, subfolder='text_encoder_2')]
    vae = AutoencoderKL.from_pretrained(path, subfolder='vae')
    unet = UNet2DConditionModel.from_pretrained(path, subfolder='unet')
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder='scheduler')
    weight_dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    for model in (unet, vae, *text_encoders):
        model.requires_grad_(False)
    vae.to(accelerator.device, dtype=torch.float32)  # float32 VAE avoids NaN latents (as diffusers' script)
    unet.to(accelerator.device, dtype=weight_dtype)
    for te in text_encoders:
        te.to(accelerator.device, dtype=weight_dtype)
    reports = inject_adapters(args, unet, text_encoders)  # adapters are float32 on the weights' device
    for report in reports:
        logger.info(str(report))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for te in text_encoders:
                te.gradient_checkpointing_enable()
    trainable_models = [unet] + (text_encoders if args.train_text_encoder else [])
    params = [p for m in trainable_models for p in m.parameters() if p.requires_grad]
    if any(p.dtype != torch.float32 for p in params):
        raise ValueError('adapter parameters must be float32 for mixed-precision training')
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    dataset = CaptionedImageFolder(args.train_data_dir, tokenizers, args.resolution, args.center_crop,
                                   args.random_flip, args.caption_column, args.max_train_samples)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate,
                                         num_workers=args.dataloader_num_workers, drop_last=False)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)

    names = {id(unet): 'unet', id(text_encoders[0]): 'text_encoder', id(text_encoders[1]): 'text_encoder_2'}

    def save_hook(models, weights, output_dir):  # checkpoints hold the adapters only, not the frozen weights
        if accelerator.is_main_process:
            vd.save_pipeline_adapters({names[id(accelerator.unwrap_model(m))]: accelerator.unwrap_model(m)
                                       for m in models}, os.path.join(output_dir, 'adapter'))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            component = names[id(model)]
            for adapter in visadapt.adapter_names(model):
                _, tensors = read_adapter(os.path.join(input_dir, 'adapter', component, adapter))
                load_adapter_state_dict(model, {k: v.to(accelerator.device) for k, v in tensors.items()}, adapter,
                                        source=f'checkpoint {input_dir!r}')

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    prepared = accelerator.prepare(*trainable_models, optimizer, loader, lr_scheduler)
    trainable_models, (optimizer, loader, lr_scheduler) = list(prepared[:len(trainable_models)]), prepared[-3:]
    unet = trainable_models[0]
    if args.train_text_encoder:
        text_encoders = trainable_models[1:]

    global_step, history = 0, []
    if args.resume_from_checkpoint:
        ckpt = args.resume_from_checkpoint
        if ckpt == 'latest':
            found = sorted((d for d in os.listdir(args.output_dir) if d.startswith('checkpoint-')),
                           key=lambda d: int(d.split('-')[1])) if os.path.isdir(args.output_dir) else []
            if not found:
                raise ValueError(f'--resume_from_checkpoint latest: no checkpoint-* in {args.output_dir!r}')
            ckpt = os.path.join(args.output_dir, found[-1])
        if not os.path.isdir(ckpt):
            raise ValueError(f'--resume_from_checkpoint {ckpt!r} is not a directory')
        accelerator.load_state(ckpt)
        global_step = int(os.path.basename(os.path.normpath(ckpt)).split('-')[1])
        with open(os.path.join(ckpt, 'loss_history.json')) as f:
            history = [tuple(h) for h in json.load(f)]
        logger.info(f'resumed from {ckpt} at step {global_step}')

    components = dict(vae=vae, text_encoder=accelerator.unwrap_model(text_encoders[0]),
                      text_encoder_2=accelerator.unwrap_model(text_encoders[1]), tokenizer=tokenizers[0],
                      tokenizer_2=tokenizers[1], unet=accelerator.unwrap_model(unet))
    metrics: Dict[str, Any] = {'adapters': [str(r) for r in reports], 'trainable_parameters': sum(p.numel() for p in params),
                               'device': str(accelerator.device), 'num_processes': accelerator.num_processes,
                               'mixed_precision': accelerator.mixed_precision}
    fixed_batch = None
    if args.eval_fixed_batch:
        fixed_batch = collate([dataset[i] for i in range(min(args.train_batch_size, len(dataset)))])
        fixed_batch['pixel_values'] = fixed_batch['pixel_values'].to(accelerator.device)

    def fixed_loss() -> float:
        gen = torch.Generator(device=accelerator.device).manual_seed(1234)
        with torch.no_grad(), accelerator.autocast():
            return diffusion_loss(fixed_batch, unet, vae, text_encoders, noise_scheduler, args.resolution,
                                  weight_dtype, generator=gen).item()

    if fixed_batch is not None and global_step == 0:
        metrics['fixed_batch_loss_before'] = fixed_loss()
    if args.validation_prompt and global_step == 0 and accelerator.is_main_process:
        metrics['validation_step0'] = validate(args, accelerator, components, weight_dtype, 0)

    progress = tqdm(range(args.max_train_steps), initial=global_step, desc='steps',
                    disable=not accelerator.is_local_main_process)
    for model in trainable_models:
        model.train()
    start, steps_run, accumulated = time.perf_counter(), 0, []
    while global_step < args.max_train_steps:
        for batch in loader:
            with accelerator.accumulate(*trainable_models):
                with accelerator.autocast():
                    loss = diffusion_loss(batch, unet, vae, text_encoders, noise_scheduler, args.resolution,
                                          weight_dtype, text_grad=args.train_text_encoder)
                accumulated.append(accelerator.gather(loss.detach()[None]).mean().item())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            steps_run += 1
            step_loss = sum(accumulated) / len(accumulated)
            accumulated = []
            history.append((global_step, step_loss))
            progress.update(1)
            progress.set_postfix(loss=f'{step_loss:.4f}', lr=f'{lr_scheduler.get_last_lr()[0]:.2e}')
            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                save_checkpoint(args, accelerator, global_step, history)
            if (args.validation_prompt and args.validation_steps and global_step % args.validation_steps == 0
                    and global_step != args.max_train_steps and accelerator.is_main_process):
                validate(args, accelerator, components, weight_dtype, global_step)
            if global_step >= args.max_train_steps:
                break
    progress.close()
    metrics['seconds_per_step'] = (time.perf_counter() - start) / max(steps_run, 1)
    metrics['steps'] = global_step
    if fixed_batch is not None:
        metrics['fixed_batch_loss_after'] = fixed_loss()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finish(args, accelerator, components, weight_dtype, history, metrics)
    accelerator.end_training()
    return metrics


def save_checkpoint(args, accelerator, step: int, history) -> None:
    if accelerator.is_main_process and args.checkpoints_total_limit is not None:
        found = sorted((d for d in os.listdir(args.output_dir) if d.startswith('checkpoint-')),
                       key=lambda d: int(d.split('-')[1]))
        for old in found[:max(0, len(found) - args.checkpoints_total_limit + 1)]:
            shutil.rmtree(os.path.join(args.output_dir, old))
    path = os.path.join(args.output_dir, f'checkpoint-{step}')
    accelerator.save_state(path)
    if accelerator.is_main_process:
        atomic_write_bytes(os.path.join(path, 'loss_history.json'), json.dumps(history).encode())
        logger.info(f'saved {path}')


def finish(args, accelerator, components, weight_dtype, history, metrics) -> None:
    out = args.output_dir
    adapters = {k: components[k] for k in vd.PIPELINE_COMPONENTS if visadapt.adapter_names(components[k])}
    vd.save_pipeline_adapters(adapters, os.path.join(out, 'adapter'))
    atomic_write_bytes(os.path.join(out, 'loss_history.json'), json.dumps(history).encode())
    if history:
        plot_loss(history, os.path.join(out, 'loss_curve.png'),
                  f'{args.conv_method} convs + {args.attn_method} attention, {os.path.basename(args.train_data_dir)}')
    if args.validation_prompt:
        metrics['validation'] = validate(args, accelerator, components, weight_dtype, metrics['steps'])
    if 'kohya' in args.export:
        vd.save_kohya(adapters, os.path.join(out, 'export', 'kohya.safetensors'))
    if 'diffusers' in args.export:
        vd.save_diffusers_lora(adapters, os.path.join(out, 'export', 'diffusers_lora'))
    if 'merged' in args.export:
        vd.save_merged_unet(components['unet'], os.path.join(out, 'export', 'merged_unet'))
    atomic_write_bytes(os.path.join(out, 'train_metrics.json'), json.dumps(metrics, indent=2).encode())
    logger.info(json.dumps({k: v for k, v in metrics.items() if k != 'adapters'}))


if __name__ == '__main__':
    main()
