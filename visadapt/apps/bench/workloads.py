"""The models the bench runs: each a random-init model from a real config, its inputs and the layers every
configuration adapts (every Conv2d/Linear except the classifier).

CPU-sized workloads (``make bench``): ``convnext_atto``, ``convnext_tiny``, ``efficientnet_lite0``, ``vit_small`` and
``unet_down`` (SDXL's second down block). GPU-sized ones (issue 18): ``convnextv2_large`` (timm ConvNeXt-V2-L),
``vit_base`` (ViT-B/16) and ``sdxl_unet`` (the whole SDXL base 1.0 UNet, config from
:data:`visadapt.apps.bench_sdxl.SDXL_UNET`, on ``size/8`` latents); ``sdxl_tiny`` is the same code path on the tiny
SDXL-architecture UNet (:data:`visadapt.apps.bench_sdxl.TINY_UNET`) so the UNet calling convention is exercised on CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from visadapt.core import site_from_module

__all__ = ['Workload', 'MODELS', 'DTYPES', 'AMP', 'build_workload', 'conv_linear_targets']

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
#: ``--amp``: the autocast dtype of every forward (None: no autocast)
AMP = {'none': None, 'bf16': torch.bfloat16}

Call = Callable[[nn.Module, Tuple[torch.Tensor, ...]], torch.Tensor]


def _first(model: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    return model(*inputs)


@dataclass
class Workload:
    """A model, its inputs and the layers every configuration adapts.

    Attributes:
        name: model key (``--models``).
        model: the base model (random init, on the bench device/dtype, train mode, frozen).
        inputs: the forward's tensors; ``inputs[0]`` requires grad (so the backward runs through every layer).
        targets: names of the adapted layers (every Conv/Linear except the classifier), in model order.
        call: runs a model on ``inputs`` and returns the tensor the loss is taken on.
        amp: autocast dtype of every forward, or None.
        checkpointing: turns gradient checkpointing on in a model of this workload (None: the model has none).
        input_names: names of ``inputs`` in the JSON.
    """
    name: str
    model: nn.Module
    inputs: Tuple[torch.Tensor, ...]
    targets: List[str]
    call: Call = _first
    amp: Optional[torch.dtype] = None
    checkpointing: Optional[Callable[[nn.Module], None]] = None
    input_names: Tuple[str, ...] = ('x',)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.inputs[0].device.type, dtype=self.amp)

    def forward(self, model: nn.Module, inputs: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        with self.autocast():
            return self.call(model, tuple(self.inputs if inputs is None else inputs))


def _adaptable(module: nn.Module) -> bool:
    try:
        site_from_module(module)
    except TypeError:
        return False
    return True


def conv_linear_targets(model: nn.Module, skip: Sequence[str] = ()) -> List[str]:
    """Every Conv2d/Linear visadapt can adapt, outside the modules named in ``skip``."""
    return [n for n, m in model.named_modules()
            if n and isinstance(m, (nn.Conv2d, nn.Linear)) and _adaptable(m)
            and not any(n == s or n.startswith(s + '.') for s in skip)]


def _timm(arch: str, **kwargs: Any) -> Callable[[str, int, int], Workload]:
    def build(key: str, batch: int, size: int) -> Workload:
        import timm
        extra = {name: size if value == 'size' else value for name, value in kwargs.items()}
        model = timm.create_model(arch, pretrained=False, **extra)
        classifier = model.pretrained_cfg.get('classifier', 'head')
        skip = [classifier] if isinstance(classifier, str) else list(classifier)
        x = torch.randn(batch, 3, size, size)
        return Workload(key, model, (x,), conv_linear_targets(model, skip),
                        checkpointing=lambda m: m.set_grad_checkpointing(True))
    return build


def _unet_down(key: str, batch: int, size: int) -> Workload:
    """SDXL's second down block (``down_blocks.1``: 320 → 640 channels, 2 transformer layers per resnet, 10 heads,
    cross-attention to 77 tokens of width 2048) on the latent of a ``size`` image (size / 8)."""
    from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D
    block = CrossAttnDownBlock2D(in_channels=320, out_channels=640, temb_channels=1280, num_layers=2,
                                 transformer_layers_per_block=2, num_attention_heads=10, cross_attention_dim=2048,
                                 add_downsample=True, resnet_groups=32, use_linear_projection=True)
    side = size // 8
    inputs = (torch.randn(batch, 320, side, side), torch.randn(batch, 1280), torch.randn(batch, 77, 2048))

    def checkpointing(module: nn.Module) -> None:
        module.gradient_checkpointing = True

    return Workload(key, block, inputs, conv_linear_targets(block), call=lambda m, t: m(*t)[0],
                    checkpointing=checkpointing, input_names=('x', 'temb', 'context'))


def _unet_call(model: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> torch.Tensor:
    sample, timestep, context, text_embeds, time_ids = inputs
    return model(sample, timestep, encoder_hidden_states=context,
                 added_cond_kwargs={'text_embeds': text_embeds, 'time_ids': time_ids}).sample


def _sdxl(tiny: bool) -> Callable[[str, int, int], Workload]:
    def build(key: str, batch: int, size: int) -> Workload:
        """The SDXL UNet (random init) on ``size/8`` latents, 77 text tokens and SDXL's size conditioning."""
        from diffusers import UNet2DConditionModel

        from visadapt.apps.bench_sdxl import SDXL_UNET, TINY_UNET
        cfg = TINY_UNET if tiny else SDXL_UNET
        unet = UNet2DConditionModel(**cfg)
        side = size // 8
        text = cfg['projection_class_embeddings_input_dim'] - 6 * cfg['addition_time_embed_dim']
        inputs = (torch.randn(batch, 4, side, side), torch.randint(0, 1000, (batch,)),
                  torch.randn(batch, 77, cfg['cross_attention_dim']), torch.randn(batch, text),
                  torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32))
        return Workload(key, unet, inputs, conv_linear_targets(unet), call=_unet_call,
                        checkpointing=lambda m: m.enable_gradient_checkpointing(),
                        input_names=('x', 'timestep', 'context', 'text_embeds', 'time_ids'))
    return build


#: ``--models`` key → builder(key, batch, size)
MODELS: Dict[str, Callable[[str, int, int], Workload]] = {
    'convnext_atto': _timm('convnext_atto'),
    'convnext_tiny': _timm('convnext_tiny'),
    'efficientnet_lite0': _timm('efficientnet_lite0'),
    'vit_small': _timm('vit_small_patch16_224', img_size='size'),
    'unet_down': _unet_down,
    'convnextv2_large': _timm('convnextv2_large'),
    'vit_base': _timm('vit_base_patch16_224', img_size='size'),
    'sdxl_unet': _sdxl(tiny=False),
    'sdxl_tiny': _sdxl(tiny=True),
}


def build_workload(key: str, args: argparse.Namespace) -> Workload:
    """``MODELS[key]`` at ``args.batch_size`` × ``args.image_size`` on ``args.device`` in ``args.dtype`` (floating
    inputs only; integer inputs such as timesteps keep their dtype), frozen, in train mode, with ``--amp`` and
    gradient checkpointing (``args.checkpointed``: the models ``--grad-checkpointing`` names) applied."""
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        work = MODELS[key](key, args.batch_size, args.image_size)
    dtype = DTYPES[args.dtype]
    work.model = work.model.to(device=args.device, dtype=dtype).train().requires_grad_(False)
    work.inputs = tuple(t.to(device=args.device, dtype=dtype if t.is_floating_point() else t.dtype)
                        for t in work.inputs)
    work.inputs[0].requires_grad_(True)
    work.amp = AMP[args.amp]
    if key in args.checkpointed:
        if work.checkpointing is None:
            raise ValueError(f'--grad-checkpointing: model {key!r} has no gradient checkpointing')
        work.checkpointing(work.model)
    return work
