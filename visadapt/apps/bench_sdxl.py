"""Training-step time and peak memory of conv adapters on the SDXL UNet: visadapt FLoRA vs PEFT LoRA vs LyCORIS.

Every variant adapts the same layers (every Conv2d of the UNet: conv_in/conv_out, resnet conv1/conv2/conv_shortcut,
down/upsamplers) under the same trainable-parameter budget (the FLoRA adapter's count; the LoRA and Tucker-LoCon
ranks are the largest that fit it):

* ``flora``: visadapt FLoRA (r, r3), the core picks the weight or bypass path per layer. On the full UNet (51 convs)
  the default r=32, r3=2 gives 3,056,150 parameters, so PEFT LoRA gets r=7 (2,674,840) and Tucker LoCon r=30
  (3,031,440); r=8 would leave LoRA at r=1;
* ``peft_lora``: PEFT ``LoraConfig`` on the same modules (conv LoRA: k×k down, 1×1 up);
* ``lycoris_tucker_rebuild`` / ``lycoris_tucker_bypass``: LyCORIS LoCon with ``use_tucker=True`` (1×1 down, k×k
  mid, 1×1 up), rebuilding ΔW each step or running the bypass chain.

The UNet is built from SDXL base 1.0's ``unet/config.json`` (random init, no download) in bf16 (``--dtype``); the
adapters are float32. One step = forward + MSE loss + backward + AdamW step on a 1024×1024 batch (latents
128×128, 77 text tokens of width 2048), timed after warm-up with CUDA synchronisation.

    visadapt-bench-sdxl --config full --device cuda --batch_size 2 --steps 10   # GPU, full size
    visadapt-bench-sdxl --config tiny --device cpu --dtype float32 --rank 8 --steps 3  # CPU smoke

``--config tiny`` is the tiny SDXL-architecture UNet of tools/make_tiny_sdxl.py at 64×64 pixels; on a CPU the peak
memory column is not measured (n/a).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

import visadapt
from visadapt.core.budget import count_adapter_params, match_budget
from visadapt.integrations import diffusers_pipelines as vd

__all__ = ['main', 'run_variant']

#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that differ from diffusers' defaults)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D',
                                                                        'CrossAttnDownBlock2D'),
                 up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type='text_time', addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)
TINY_UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
                 down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
                 up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), transformer_layers_per_block=(1, 2),
                 attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True,
                 addition_embed_type='text_time', addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                 norm_num_groups=16)
VARIANTS = ('flora', 'peft_lora', 'lycoris_tucker_rebuild', 'lycoris_tucker_bypass')


def conv_names(unet: nn.Module) -> List[str]:
    return [n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d)]


def tucker_locon_params(unet: nn.Module, rank: int) -> int:
    """Trainable parameters of LyCORIS Tucker LoCon at ``rank`` on every conv (1×1 convs have no mid)."""
    total = 0
    for name in conv_names(unet):
        out_c, in_c, kh, kw = dict(unet.named_modules())[name].weight.shape
        total += rank * in_c + out_c * rank + (rank * rank * kh * kw if (kh, kw) != (1, 1) else 0)
    return total


def largest(fits: Callable[[int], bool], hi: int = 4096) -> int:
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def adapt(unet: nn.Module, variant: str, args, budget: int) -> Dict[str, Any]:
    """Freeze ``unet`` and add ``variant``'s adapter in place; returns its rank and trainable count."""
    unet.requires_grad_(False)
    if variant == 'flora':
        visadapt.inject(unet, vd.target_config(unet, 'conv', 'FLoRA', r=args.rank, r3=args.r3, scale=1.0))
        rank = args.rank
    elif variant == 'peft_lora':
        from peft import LoraConfig, inject_adapter_in_model
        lora = match_budget(unet, vd.target_config(unet, 'conv', 'LoRA', r=1), budget, at_most=True).config  # PEFT's count
        rank = lora.r
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=conv_names(unet), init_lora_weights=True)
        inject_adapter_in_model(config, unet)
        for n, p in unet.named_parameters():
            if 'lora_' in n:
                p.data = p.data.float()
    else:
        from lycoris.wrapper import LycorisNetwork
        rank = largest(lambda r: tucker_locon_params(unet, r) <= budget)
        LycorisNetwork.apply_preset({'target_module': ['Conv2d'], 'target_name': []})
        net = LycorisNetwork(unet, multiplier=1.0, lora_dim=rank, conv_lora_dim=rank, alpha=rank, conv_alpha=rank,
                             use_tucker=True, network_module='locon',
                             bypass_mode=variant.endswith('bypass'), warn_on_unmatched=False)
        net.apply_to()
        net.to(device=args.device, dtype=torch.float32)
        unet._bench_lycoris = net  # keep it alive with the model (not a submodule: LyCORIS keeps it outside)
    params = [p for p in unet.parameters() if p.requires_grad]
    if variant.startswith('lycoris'):
        params = [p for p in unet._bench_lycoris.parameters() if p.requires_grad]
    return {'rank': rank, 'trainable': sum(p.numel() for p in params), 'params': params}


def run_variant(variant: str, args, budget: int) -> Dict[str, Any]:
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    cfg = SDXL_UNET if args.config == 'full' else TINY_UNET
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        unet = UNet2DConditionModel(**cfg).to(dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    info = adapt(unet, variant, args, budget)
    params = info.pop('params')
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    side = cfg['sample_size']
    b, dev = args.batch_size, args.device
    inputs = dict(sample=torch.randn(b, 4, side, side, device=dev, dtype=dtype),
                  timestep=torch.randint(0, 1000, (b,), device=dev),
                  encoder_hidden_states=torch.randn(b, 77, cfg['cross_attention_dim'], device=dev, dtype=dtype),
                  added_cond_kwargs=dict(
                      text_embeds=torch.randn(b, cfg['projection_class_embeddings_input_dim']
                                              - 6 * cfg['addition_time_embed_dim'], device=dev, dtype=dtype),
                      time_ids=torch.tensor([[8 * side, 8 * side, 0, 0, 8 * side, 8 * side]] * b, device=dev,
                                            dtype=dtype)))
    target = torch.randn_like(inputs['sample'])
    cuda = dev.startswith('cuda')

    def step() -> float:
        out = unet(**inputs).sample
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    info['step_ms'] = 1000 * (time.perf_counter() - start) / args.steps
    info['peak_mem_gib'] = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    return info


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', choices=['full', 'tiny'], default='full')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'])
    parser.add_argument('--batch_size', type=int, default=1)
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--rank', type=int, default=32, help='FLoRA channel rank r (sets the shared budget)')
    parser.add_argument('--r3', type=int, default=2, help='FLoRA kernel rank')
    parser.add_argument('--gradient_checkpointing', action='store_true')
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--out', default=None, help='write the results as JSON here')
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Time every variant on the UNet; returns the results (also written to ``--out``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel
    with torch.device('meta'):
        probe = UNet2DConditionModel(**(SDXL_UNET if args.config == 'full' else TINY_UNET))
    budget = count_adapter_params(probe, vd.target_config(probe, 'conv', 'FLoRA', r=args.rank, r3=args.r3))
    device = torch.cuda.get_device_name() if args.device.startswith('cuda') else f'CPU ({torch.get_num_threads()} threads)'
    results = {'device': device, 'config': args.config, 'dtype': args.dtype, 'batch_size': args.batch_size,
               'budget': budget, 'convs': len(conv_names(probe)), 'variants': {}}
    print(f'{args.config} SDXL UNet, {results["convs"]} convs, {args.dtype}, batch {args.batch_size}, {device}; '
          f'budget {budget:,} trainable parameters (FLoRA r={args.rank}, r3={args.r3})')
    print(f'{"variant":<24} {"rank":>5} {"trainable":>12} {"step ms":>9} {"peak GiB":>9}')
    for variant in args.variants:
        info = run_variant(variant, args, budget)
        gc.collect()  # the variant's UNet and optimizer are gone: free them before the next one
        if args.device.startswith('cuda'):
            torch.cuda.empty_cache()
        results['variants'][variant] = info
        mem = f'{info["peak_mem_gib"]:.2f}' if info['peak_mem_gib'] is not None else 'n/a'
        print(f'{variant:<24} {info["rank"]:>5} {info["trainable"]:>12,} {info["step_ms"]:>9.1f} {mem:>9}', flush=True)
    if args.out:
        from visadapt.core import atomic_write_bytes
        atomic_write_bytes(args.out, json.dumps(results, indent=2).encode())
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``visadapt-bench-sdxl``: exit status 0, or 2 with one ``error:`` line (bad input, diffusers missing)."""
    from ._command import INPUT_ERRORS, exit_status
    return exit_status('visadapt-bench-sdxl', lambda: run(parse_args(argv)), errors=INPUT_ERRORS + (ImportError,))


if __name__ == '__main__':
    sys.exit(main())
