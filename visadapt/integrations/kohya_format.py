"""kohya / LyCORIS files of visadapt adapters: the keys A1111, Forge, ComfyUI and sd-scripts read for SDXL.

One ``.safetensors`` file; each adapted layer is one LyCORIS module named ``<prefix>_<module path, '.' → '_'>``
with the prefixes of :data:`KOHYA_PREFIXES` (``lora_unet``, ``lora_te1``, ``lora_te2``). What each layer becomes is
read from its adapters' declared factored form (``Adapter.factor_form``, :mod:`visadapt.core.factors`), never from a
table of methods:

* a **LoRA form** (LoRA, MoSLoRA, MELoRA, VeRA, SeRA, SVFT, linear and 1×1 FLoRA): ``lora_down`` / ``lora_up`` with
  the scale folded into ``lora_up`` and ``alpha`` = rank (the loaders' alpha/rank scale is then exactly 1);
* a **Tucker form** (conv FLoRA): a Tucker LoCon, ``lora_down`` (R, in, 1, 1), ``lora_mid`` (R, R, kh, kw),
  ``lora_up`` (out, R, 1, 1), R = max(r_out, r_in) (LyCORIS' mid is square: the smaller side is zero-padded); with
  ``tucker=False`` the same ΔW is written as its chain (``lora_down`` with the layer's kernel), which loaders without
  Tucker support (diffusers' kohya converter) read too;
* **DoRA**: its LoRA form plus ``dora_scale`` (out, 1, ...), the magnitude per output channel (LyCORIS' default
  ``wd_on_out``): W' = dora_scale ⊙ (W + ΔW) / ‖W + ΔW‖ per output channel;
* any other mergeable adapter: LyCORIS' full ``diff`` = W' − W (and ``diff_b`` when the bias changes).

UNet names: ``unet_names='sgm'`` (default) writes the names kohya's sd-scripts writes for SDXL, i.e. the original
(SGM/LDM) UNet's modules: ``input_blocks.N.M``, ``middle_block.N``, ``output_blocks.N.M``, ``out.2`` (``conv_out``)
and the resnets' ``in_layers.2``/``out_layers.3``/``skip_connection``/``emb_layers.1``
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``); ``unet_names='diffusers'`` keeps the diffusers
module paths (``lora_unet_down_blocks_1_attentions_0_...``, what kohya writes for SD 1.x). Text encoders keep the
transformers paths (``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``), as sd-scripts writes them.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..core import Factors, atomic_write_bytes, fold_adapters
from .diffusers_pipelines import adapted_layers, export_module_path, layer_factors, pipeline_components

__all__ = ['KOHYA_PREFIXES', 'UNET_NAMINGS', 'sgm_module_names', 'kohya_state_dict', 'save_kohya']

#: kohya key prefixes per pipeline component (SDXL: two text encoders)
KOHYA_PREFIXES: Dict[str, str] = {'unet': 'lora_unet', 'text_encoder': 'lora_te1', 'text_encoder_2': 'lora_te2'}
#: how UNet layers are named: the original SGM UNet's modules (sd-scripts' SDXL files) or diffusers' paths
UNET_NAMINGS = ('sgm', 'diffusers')
#: diffusers ResnetBlock2D children → the SGM ResBlock's (in_layers = [norm, SiLU, conv], out_layers = [norm, SiLU,
#: dropout, conv], emb_layers = [SiLU, linear])
_RESNET_CHILDREN = {'norm1': 'in_layers.0', 'conv1': 'in_layers.2', 'norm2': 'out_layers.0', 'conv2': 'out_layers.3',
                    'time_emb_proj': 'emb_layers.1', 'conv_shortcut': 'skip_connection'}
_TOP_LEVEL = {'conv_in': 'input_blocks.0.0', 'time_embedding.linear_1': 'time_embed.0',
              'time_embedding.linear_2': 'time_embed.2', 'add_embedding.linear_1': 'label_emb.0.0',
              'add_embedding.linear_2': 'label_emb.0.2', 'conv_norm_out': 'out.0', 'conv_out': 'out.2'}


# ---- names ---------------------------------------------------------------------------------------------------------
def _block_prefixes(unet: nn.Module) -> Dict[str, str]:
    """diffusers block prefix → SGM prefix, walking the UNet's own block lists (so any depth or block count)."""
    prefixes, index = {}, 1
    for b, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            prefixes[f'down_blocks.{b}.resnets.{j}'] = f'input_blocks.{index}.0'
            if getattr(block, 'attentions', None) is not None:
                prefixes[f'down_blocks.{b}.attentions.{j}'] = f'input_blocks.{index}.1'
            index += 1
        if getattr(block, 'downsamplers', None) is not None:
            prefixes[f'down_blocks.{b}.downsamplers.0.conv'] = f'input_blocks.{index}.0.op'
            index += 1
    for j, name in enumerate(('resnets.0', 'attentions.0', 'resnets.1')):
        prefixes[f'mid_block.{name}'] = f'middle_block.{j}'
    index = 0
    for b, block in enumerate(unet.up_blocks):
        has_attention = getattr(block, 'attentions', None) is not None
        for j in range(len(block.resnets)):
            prefixes[f'up_blocks.{b}.resnets.{j}'] = f'output_blocks.{index}.0'
            if has_attention:
                prefixes[f'up_blocks.{b}.attentions.{j}'] = f'output_blocks.{index}.1'
            index += 1
        if getattr(block, 'upsamplers', None) is not None:  # a child of the block's last SGM entry
            prefixes[f'up_blocks.{b}.upsamplers.0.conv'] = f'output_blocks.{index - 1}.{2 if has_attention else 1}.conv'
    return prefixes


def sgm_module_names(unet: nn.Module, names: Iterable[str]) -> Dict[str, str]:
    """The SGM (original SDXL UNet) name of each diffusers module path in ``names``, as sd-scripts names them.

    Raises ValueError for a module the SGM UNet does not have (or a model that is not a diffusers
    ``UNet2DConditionModel``), naming it.
    """
    if not all(hasattr(unet, a) for a in ('down_blocks', 'mid_block', 'up_blocks')):
        raise ValueError(f"unet_names='sgm' needs a diffusers UNet2DConditionModel, got {type(unet).__name__}; "
                         f"use unet_names='diffusers'")
    blocks = _block_prefixes(unet)
    renamed = {}
    for name in names:
        prefix = next((p for p in sorted(blocks, key=len, reverse=True) if name == p or name.startswith(p + '.')),
                      None)
        if prefix is None and name in _TOP_LEVEL:
            renamed[name] = _TOP_LEVEL[name]
            continue
        if prefix is None:
            raise ValueError(f'UNet module {name!r} has no SGM name (the original SDXL UNet has no such module); use '
                             f"unet_names='diffusers'")
        rest = name[len(prefix) + 1:]
        if '.resnets.' in prefix:
            rest = _RESNET_CHILDREN.get(rest, rest)
        renamed[name] = f'{blocks[prefix]}.{rest}' if rest else blocks[prefix]
    return renamed


# ---- tensors -------------------------------------------------------------------------------------------------------
def _square_tucker(form: Factors) -> Factors:
    """LyCORIS' Tucker mid is square (R, R, *k): zero-pad the smaller side of the core and its factor."""
    rank = form.rank
    mid = form.mid.new_zeros(rank, rank, *form.mid.shape[2:])
    mid[:form.mid.shape[0], :form.mid.shape[1]] = form.mid
    down = form.down.new_zeros(rank, *form.down.shape[1:])
    down[:form.down.shape[0]] = form.down
    up = form.up.new_zeros(form.up.shape[0], rank, *form.up.shape[2:])
    up[:, :form.up.shape[1]] = form.up
    return Factors(down, up, mid, form.magnitude)


def _factored_tensors(form: Factors, tucker: bool) -> Dict[str, torch.Tensor]:
    """One layer's LoCon tensors (key suffixes) from its exact form."""
    form = form.simplified() if tucker else form.as_chain()
    tensors = {}
    if form.mid is not None:
        form = _square_tucker(form)
        tensors['lora_mid.weight'] = form.mid
    tensors.update({'lora_down.weight': form.down, 'lora_up.weight': form.up,
                    'alpha': torch.tensor(float(form.rank))})
    if form.magnitude is not None:
        tensors['dora_scale'] = form.magnitude.reshape(form.up.shape[0], *([1] * (form.up.dim() - 1)))
    return tensors


def _full_tensors(module: nn.Module, adapters: Sequence[str], where: str) -> Dict[str, torch.Tensor]:
    """LyCORIS' full form of adapters ``adapters`` (only those): ``diff`` = W' − W and, when they change the bias,
    ``diff_b`` = b' − b, folded in float32 from the layer's base weight."""
    for name in adapters:
        adapter = module.visadapt[name]
        if not adapter.mergeable:
            raise ValueError(f'adapter {name!r} on {where} ({adapter.config.method}) cannot be exported: '
                             f'{adapter.why_not_mergeable()}')
        if module.is_merged(name):
            raise ValueError(f'adapter {name!r} is merged into {where}, so its base weight is not at hand; '
                             f'unmerge it (visadapt.unmerge) before exporting it as a full diff')
    weight, bias = (None if t is None else t.detach().float() for t in module.base_params())
    adapted_weight, adapted_bias = fold_adapters([module.visadapt[n] for n in adapters], weight, bias)
    tensors = {'diff': adapted_weight - weight}
    if bias is not None and not torch.equal(adapted_bias, bias):
        tensors['diff_b'] = adapted_bias - bias
    return tensors


def kohya_state_dict(pipe_or_components: Any, names: Optional[Iterable[str]] = None,
                     dtype: torch.dtype = torch.float32, unet_names: str = 'sgm',
                     tucker: bool = True) -> Dict[str, torch.Tensor]:
    """kohya/LyCORIS tensors for the adapters ``names`` (default all) of a pipeline's UNet and text encoders.

    Args:
        pipe_or_components: a ``StableDiffusionXLPipeline`` or ``{'unet': ..., 'text_encoder': ...}``.
        names: adapter names to export (default: every adapter); several on one layer are stacked into one exact
            LoCon (``stack_factors``).
        dtype: dtype of the written tensors.
        unet_names: ``'sgm'`` (sd-scripts' SDXL names) or ``'diffusers'`` (module paths).
        tucker: write conv FLoRA's Tucker form as a Tucker LoCon (``lora_mid``); False writes its chain.
    """
    if unet_names not in UNET_NAMINGS:
        raise ValueError(f'unet_names={unet_names!r} is not valid; use one of {UNET_NAMINGS}')
    components = pipeline_components(pipe_or_components)
    layers = list(adapted_layers(components, names))
    renamed: Dict[str, str] = {}
    if unet_names == 'sgm':
        unet_layers = [layer for component, layer, _, _ in layers if component == 'unet']
        renamed = sgm_module_names(components['unet'], unet_layers) if unet_layers else {}
    state: Dict[str, torch.Tensor] = {}
    for component, layer_name, module, adapters in layers:
        path = renamed.get(layer_name) or export_module_path(components[component], layer_name)
        key = f'{KOHYA_PREFIXES[component]}_{path}'.replace('.', '_')
        try:
            tensors = _factored_tensors(layer_factors(module, adapters), tucker)
        except ValueError:  # no exact factored form: LyCORIS' full diff
            tensors = _full_tensors(module, adapters, f'{component}.{layer_name}')
        state.update({f'{key}.{suffix}': t.detach().to(dtype).contiguous() for suffix, t in tensors.items()})
    return state


def save_kohya(pipe_or_components: Any, path: Union[str, os.PathLike], names: Optional[Iterable[str]] = None,
               dtype: torch.dtype = torch.float32, unet_names: str = 'sgm',
               tucker: bool = True) -> Dict[str, torch.Tensor]:
    """Write :func:`kohya_state_dict` to one ``.safetensors`` file (atomically); returns the tensors written."""
    from safetensors.torch import save
    path = os.fspath(path)
    if not path.endswith('.safetensors'):
        raise ValueError(f'kohya files are .safetensors; got path {path!r}')
    state = {k: v.cpu() for k, v in kohya_state_dict(pipe_or_components, names, dtype, unet_names, tucker).items()}
    has_mid = any(k.endswith('lora_mid.weight') for k in state)
    has_dora = any(k.endswith('dora_scale') for k in state)
    args = {'algo': 'locon', 'use_tucker': str(has_mid).lower(), 'dora_wd': str(has_dora).lower()}
    meta = {'ss_network_module': 'lycoris.kohya', 'ss_network_args': json.dumps(args), 'visadapt_export': 'kohya'}
    atomic_write_bytes(path, save(state, metadata=meta))
    return state
