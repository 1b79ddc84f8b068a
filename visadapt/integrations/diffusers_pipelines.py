"""diffusers integration: SDXL targets, pipeline load/unload, and exports other tools load.

Targets (module-name patterns, see :func:`visadapt.core.matches`):

* :data:`UNET_CONV_PATTERNS`: every conv of the UNet: ``conv_in``, ``conv_out``, the resnets' ``conv1``/``conv2``/
  ``conv_shortcut`` and the down/upsamplers' ``conv`` (FLoRA by default; the FLoRA paper tuned all SDXL convs);
* :data:`UNET_ATTENTION_PATTERNS`: the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0``;
* :data:`TEXT_ENCODER_ATTENTION_PATTERNS`: CLIP's ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``.

Several named adapters may live in one model (e.g. ``'conv'`` = FLoRA on the convs and ``'attn'`` = LoRA on the
attention). Our own format saves each (component, adapter) pair with :func:`visadapt.save_adapter` under
``<dir>/<component>/<adapter>/``; :func:`load_into_pipeline` / :func:`unload_from_pipeline` attach and detach them.

Exports, each exact (tests rebuild ΔW the way the loading tool does), all reading each adapter's declared factored
form (``Adapter.factor_form``, :mod:`visadapt.core.factors`), never a table of methods:

* :func:`save_merged_unet`: ``save_pretrained`` of the UNet with W + ΔW (no visadapt needed to load it);
* :func:`kohya_state_dict` / :func:`save_kohya`: kohya/LyCORIS keys ``lora_unet_<module path with _>``,
  ``lora_te1_...``, ``lora_te2_...``. A Tucker form (conv FLoRA) is a Tucker LoCon: ``lora_down`` (R, in, 1, 1),
  ``lora_mid`` (R, R, kh, kw), ``lora_up`` (out, R, 1, 1), ``alpha`` = R, with R = max(r_out, r_in) (the smaller
  side zero-padded: LyCORIS' mid is square); a LoRA form (LoRA, MoSLoRA, MELoRA, VeRA, SeRA, SVFT, linear and 1×1
  FLoRA) is ``lora_down``/``lora_up``, with the scale in ``lora_up`` (so alpha/rank = 1 exactly). Any other
  mergeable adapter is written as LyCORIS' full ``diff`` (ΔW itself).
* :func:`diffusers_lora_state_dict` / :func:`save_diffusers_lora`: the PEFT-style ``unet.<path>.lora_A.weight`` /
  ``lora_B.weight`` keys ``pipeline.load_lora_weights`` reads, for every adapter with a factored form; a Tucker
  form is written as its chain (its mode-1 unfolding has rank r_out, so ΔW = B A with A = G ×₂ A2 ×₃ A3 ×₄ A4 a
  (r_out, in, kh, kw) conv and B = s·A1 a 1×1 conv).

Needs the ``diffusers`` extra (``pip install 'visadapt[diffusers]'``) only for the pipeline helpers; the exports
are plain tensors.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..core import (
    CONFIG_NAME,
    AdapterConfig,
    Factors,
    adapter_names,
    atomic_write_bytes,
    get_config_class,
    is_adapter_key,
    iter_adapted,
    load_adapter,
    matches,
    remove,
    save_adapter,
    stack_factors,
)

__all__ = ['UNET_CONV_PATTERNS', 'UNET_ATTENTION_PATTERNS', 'TEXT_ENCODER_ATTENTION_PATTERNS', 'PIPELINE_COMPONENTS',
           'has_diffusers', 'target_config', 'layer_factors',
           'save_pipeline_adapters', 'load_pipeline_adapters', 'load_into_pipeline', 'unload_from_pipeline',
           'merged_state_dict', 'save_merged_unet', 'kohya_state_dict', 'save_kohya', 'diffusers_lora_state_dict',
           'save_diffusers_lora', 'KOHYA_PREFIXES', 'DIFFUSERS_LORA_NAME']

UNET_CONV_PATTERNS: Tuple[str, ...] = ('conv_in', 'conv_out', 'resnets.*.conv1', 'resnets.*.conv2',
                                       'resnets.*.conv_shortcut', 'downsamplers.*.conv', 'upsamplers.*.conv')
UNET_ATTENTION_PATTERNS: Tuple[str, ...] = ('to_q', 'to_k', 'to_v', 'to_out.0')
TEXT_ENCODER_ATTENTION_PATTERNS: Tuple[str, ...] = ('q_proj', 'k_proj', 'v_proj', 'out_proj')
#: pipeline attributes that can hold adapters
PIPELINE_COMPONENTS: Tuple[str, ...] = ('unet', 'text_encoder', 'text_encoder_2')
#: kohya key prefixes per pipeline component (SDXL: two text encoders)
KOHYA_PREFIXES: Dict[str, str] = {'unet': 'lora_unet', 'text_encoder': 'lora_te1', 'text_encoder_2': 'lora_te2'}
#: the file name ``load_lora_weights(directory)`` looks for
DIFFUSERS_LORA_NAME = 'pytorch_lora_weights.safetensors'
_PRESETS = {'conv': (UNET_CONV_PATTERNS, 'Conv2d'), 'attention': (UNET_ATTENTION_PATTERNS, 'Linear'),
            'text_attention': (TEXT_ENCODER_ATTENTION_PATTERNS, 'Linear')}


def has_diffusers(necessary: bool = False) -> bool:
    """True if diffusers and transformers import; with ``necessary=True`` raise ImportError with the pip command."""
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
        return True
    except ImportError:
        if necessary:
            raise ImportError("this needs diffusers and transformers: pip install 'visadapt[diffusers]'") from None
        return False


# ---- targeting and budgets ----------------------------------------------------------------------------------------
def target_config(model: nn.Module, preset: str, method: str = 'FLoRA', **fields: Any) -> AdapterConfig:
    """A ``method`` config targeting a preset's layers of ``model``.

    Args:
        model: a UNet (presets ``'conv'``, ``'attention'``) or a CLIP text encoder (``'text_attention'``).
        preset: ``'conv'``, ``'attention'`` or ``'text_attention'``.
        method: a registered method name (``visadapt.METHODS``).
        **fields: the method's config fields (``r``, ``scale``, ...).

    Only the preset patterns that match a layer of the preset's type in ``model`` are kept (a small UNet may have
    no ``conv_shortcut``), so the config is valid for this model.
    """
    if preset not in _PRESETS:
        raise ValueError(f'preset {preset!r} is not valid; use one of {sorted(_PRESETS)}')
    patterns, layer_type = _PRESETS[preset]
    names = [n for n, m in model.named_modules() if isinstance(m, getattr(nn, layer_type))]
    include = [p for p in patterns if any(matches(n, p) for n in names)]
    if not include:
        raise ValueError(f'preset {preset!r} matches no {layer_type} of this {type(model).__name__}; '
                         f'its patterns are {list(patterns)}')
    cls = get_config_class(method)
    valid = {f.name for f in dataclasses.fields(cls)} - {'target_types', 'include'}
    unknown = sorted(set(fields) - valid)
    if unknown:
        raise ValueError(f'{cls.method} has no config field(s) {unknown}; valid fields: {sorted(valid)}')
    return cls(target_types=[layer_type], include=include, **fields)


# ---- our format for a whole pipeline ------------------------------------------------------------------------------
def _components(pipe_or_components: Any) -> Dict[str, nn.Module]:
    if isinstance(pipe_or_components, Mapping):
        items = dict(pipe_or_components)
    else:
        items = {c: getattr(pipe_or_components, c, None) for c in PIPELINE_COMPONENTS}
    unknown = sorted(set(items) - set(PIPELINE_COMPONENTS))
    if unknown:
        raise ValueError(f'unknown pipeline component(s) {unknown}; valid: {list(PIPELINE_COMPONENTS)}')
    return {k: v for k, v in items.items() if v is not None}


def save_pipeline_adapters(pipe_or_components: Any, path: Union[str, os.PathLike]) -> List[Tuple[str, str]]:
    """Save every adapter of the pipeline's UNet/text encoders to ``path/<component>/<adapter>/``.

    Args:
        pipe_or_components: a ``StableDiffusionXLPipeline`` or a dict ``{'unet': unet, 'text_encoder': ...}``.
    Returns the (component, adapter name) pairs written; an index ``visadapt_pipeline.json`` lists them.
    """
    path = os.fspath(path)
    written = []
    for component, model in _components(pipe_or_components).items():
        for name in adapter_names(model):
            save_adapter(model, os.path.join(path, component, name), name=name)
            written.append((component, name))
    if not written:
        raise ValueError('the pipeline holds no visadapt adapter to save')
    atomic_write_bytes(os.path.join(path, 'visadapt_pipeline.json'),
                       json.dumps({'adapters': [list(w) for w in written]}, indent=2).encode())
    return written


def _saved_adapters(path: str) -> List[Tuple[str, str]]:
    index = os.path.join(path, 'visadapt_pipeline.json')
    if not os.path.isfile(index):
        raise FileNotFoundError(f'{index!r} not found; {path!r} is not a pipeline adapter directory written by '
                                f'visadapt.integrations.diffusers_pipelines.save_pipeline_adapters')
    with open(index) as f:
        pairs = [tuple(p) for p in json.load(f)['adapters']]
    for component, name in pairs:
        if component not in PIPELINE_COMPONENTS or not os.path.isfile(os.path.join(path, component, name, CONFIG_NAME)):
            raise ValueError(f'{index!r} lists {component}/{name}, which is not a saved adapter in {path!r}')
    return pairs


def load_pipeline_adapters(pipe_or_components: Any, path: Union[str, os.PathLike]) -> List[Tuple[str, str]]:
    """Inject and load every adapter saved by :func:`save_pipeline_adapters`; all or nothing.

    Adapter tensors are created in float32 on each component's device (the frozen weights keep their dtype).
    """
    path = os.fspath(path)
    components = _components(pipe_or_components)
    pairs = _saved_adapters(path)
    missing = sorted({c for c, _ in pairs} - set(components))
    if missing:
        raise ValueError(f'{path!r} holds adapters for {missing}, which this pipeline does not have')
    done: List[Tuple[str, str]] = []
    try:
        for component, name in pairs:
            load_adapter(components[component], os.path.join(path, component, name), name=name)
            done.append((component, name))
    except BaseException:
        for component, name in done:
            remove(components[component], name)
        raise
    return done


def load_into_pipeline(pipe: Any, path: Union[str, os.PathLike], merge: bool = False) -> List[Tuple[str, str]]:
    """Load our saved adapters into a ``StableDiffusionXLPipeline`` (in place). ``merge=True`` folds them into the
    weights afterwards (generation then costs exactly the base; :func:`unload_from_pipeline` still restores the base
    weights, up to the weights' rounding). Returns the (component, adapter) pairs loaded."""
    from ..core import merge as merge_adapters
    pairs = load_pipeline_adapters(pipe, path)
    if merge:
        components = _components(pipe)
        for component, name in pairs:
            merge_adapters(components[component], name)
    return pairs


def unload_from_pipeline(pipe: Any, merge_weights: bool = False) -> List[Tuple[str, str]]:
    """Remove every visadapt adapter from the pipeline: base weights back (or ΔW baked in, ``merge_weights=True``)."""
    removed = []
    for component, model in _components(pipe).items():
        for name in adapter_names(model):
            remove(model, name, merge_weights=merge_weights)
            removed.append((component, name))
    return removed


# ---- merged weights ------------------------------------------------------------------------------------------------
@torch.no_grad()
def _merge_into(state: Dict[str, torch.Tensor], model: nn.Module, prefix: str = '') -> Dict[str, torch.Tensor]:
    for key in [k for k in state if is_adapter_key(k)]:
        del state[key]
    for layer_name, module in iter_adapted(model):
        if not module.active_adapters():
            continue
        key = f'{prefix}{layer_name}.'
        weight, bias = state[key + 'weight'], state.get(key + 'bias')
        new_weight, new_bias = module.adapted_params(torch.float32)
        state[key + 'weight'] = new_weight.to(device=weight.device, dtype=weight.dtype)
        if new_bias is not None:
            state[key + 'bias'] = new_bias.to(device=bias.device, dtype=bias.dtype)
    return state


def merged_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` with every enabled, unmerged adapter folded in (computed in float32, stored in the
    weight's dtype) and no adapter keys: the base model's key set. The model itself is not modified."""
    return _merge_into(dict(model.state_dict()), model)


def save_merged_unet(unet: nn.Module, path: Union[str, os.PathLike], **save_kwargs: Any) -> None:
    """``unet.save_pretrained(path)`` with W + ΔW: loads with ``UNet2DConditionModel.from_pretrained`` alone.

    The adapters stay in ``unet`` and its weights are not touched (no in-place merge, so no rounding drift).
    """
    if not hasattr(unet, 'save_pretrained'):
        raise TypeError(f'save_merged_unet needs a diffusers model with save_pretrained, got {type(unet).__name__}')

    def hook(module, state, prefix, local_metadata):  # edits ``state`` in place (post-hooks must return None)
        if module is unet:
            _merge_into(state, unet, prefix)

    handle = unet.register_state_dict_post_hook(hook)
    try:
        unet.save_pretrained(os.fspath(path), **save_kwargs)
    finally:
        handle.remove()


# ---- the exact factored form of a layer's adapters -----------------------------------------------------------------
def layer_factors(module: nn.Module, names: Sequence[str]) -> Factors:
    """The exact form of adapters ``names`` on one layer (stacked when several); ValueError when there is none."""
    if module.site.groups != 1:
        raise ValueError(f'grouped convs (groups={module.site.groups}) have no LoRA/LoCon form')
    return stack_factors([module.visadapt[n].factor_form() for n in names]).detached()


def _square_tucker(form: Factors) -> Factors:
    """LyCORIS' Tucker mid is square (R, R, *k): zero-pad the smaller side of the core and its factor."""
    rank = form.rank
    mid = form.mid.new_zeros(rank, rank, *form.mid.shape[2:])
    mid[:form.mid.shape[0], :form.mid.shape[1]] = form.mid
    down = form.down.new_zeros(rank, *form.down.shape[1:])
    down[:form.down.shape[0]] = form.down
    up = form.up.new_zeros(form.up.shape[0], rank, *form.up.shape[2:])
    up[:, :form.up.shape[1]] = form.up
    return Factors(down, up, mid)


def _adapted_layers(components: Dict[str, nn.Module], names: Optional[Iterable[str]]):
    wanted = None if names is None else set(names)
    found = False
    for component, model in components.items():
        for layer_name, module in iter_adapted(model):
            adapters = [(n, a) for n, a in module.visadapt.items() if wanted is None or n in wanted]
            if adapters:
                found = True
                yield component, layer_name, module, adapters
    if not found:
        what = f'named {sorted(wanted)}' if wanted else 'at all'
        raise ValueError(f'no visadapt adapter {what} in the components {sorted(components)}; adapters present: '
                         f'{ {c: adapter_names(m) for c, m in components.items()} }')


# ---- kohya / LyCORIS ----------------------------------------------------------------------------------------------
def kohya_state_dict(pipe_or_components: Any, names: Optional[Iterable[str]] = None,
                     dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """kohya/LyCORIS tensors for the adapters ``names`` (default all) of the pipeline's UNet and text encoders.

    Keys: ``<prefix>_<module path, dots as _>.{lora_down,lora_mid,lora_up}.weight`` and ``.alpha`` (= rank, so the
    loaders' alpha/rank scale is 1 and the scale sits in ``lora_up``), or ``.diff`` (full ΔW) for adapters without
    an exact factored form. Several adapters on one layer are stacked into one exact LoCon.
    """
    state: Dict[str, torch.Tensor] = {}
    for component, layer_name, module, adapters in _adapted_layers(_components(pipe_or_components), names):
        key = f'{KOHYA_PREFIXES[component]}_{layer_name}'.replace('.', '_')
        try:
            form = layer_factors(module, [n for n, _ in adapters]).simplified()
        except ValueError:
            state[f'{key}.diff'] = _full_delta(component, layer_name, module, adapters).to(dtype).contiguous()
            continue
        if form.mid is not None:
            form = _square_tucker(form)
            state[f'{key}.lora_mid.weight'] = form.mid.to(dtype).contiguous()
        state[f'{key}.lora_down.weight'] = form.down.to(dtype).contiguous()
        state[f'{key}.lora_up.weight'] = form.up.to(dtype).contiguous()
        state[f'{key}.alpha'] = torch.tensor(float(form.rank), dtype=dtype)
    return state


def _full_delta(component: str, layer_name: str, module: nn.Module, adapters) -> torch.Tensor:
    """ΔW of every adapter on the layer together (LyCORIS' ``diff``), computed in float32."""
    for _, adapter in adapters:
        if not adapter.mergeable:
            raise ValueError(f'adapter on {component}.{layer_name} ({adapter.config.method}) cannot be exported: '
                             f'{adapter.why_not_mergeable()}')
    return module.delta_weight([n for n, _ in adapters], torch.float32)


def save_kohya(pipe_or_components: Any, path: Union[str, os.PathLike], names: Optional[Iterable[str]] = None,
               dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Write :func:`kohya_state_dict` to one ``.safetensors`` file (A1111/Forge/ComfyUI/LyCORIS load it)."""
    from safetensors.torch import save
    path = os.fspath(path)
    if not path.endswith('.safetensors'):
        raise ValueError(f'kohya files are .safetensors; got path {path!r}')
    state = {k: v.cpu() for k, v in kohya_state_dict(pipe_or_components, names, dtype).items()}
    tucker = any(k.endswith('lora_mid.weight') for k in state)
    meta = {'ss_network_module': 'lycoris.kohya', 'ss_network_args': json.dumps({'algo': 'locon', 'use_tucker':
            str(tucker).lower()}), 'visadapt_export': 'kohya'}
    atomic_write_bytes(path, save(state, metadata=meta))
    return state


# ---- diffusers (PEFT) LoRA -----------------------------------------------------------------------------------------
def diffusers_lora_state_dict(pipe_or_components: Any, names: Optional[Iterable[str]] = None,
                              dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """``<component>.<module path>.lora_A.weight`` / ``lora_B.weight`` for ``pipeline.load_lora_weights``.

    Every adapter must have an exact factored form (``Adapter.factor_form``; a conv Tucker form is written as the
    equivalent chain); no alphas are written, so diffusers uses lora_alpha = r (scale 1) and the scale sits in
    ``lora_B``. ValueError names the first layer that has no such form.
    """
    state: Dict[str, torch.Tensor] = {}
    for component, layer_name, module, adapters in _adapted_layers(_components(pipe_or_components), names):
        try:
            form = layer_factors(module, [n for n, _ in adapters]).as_chain()
            if form.magnitude is not None:
                raise ValueError('DoRA magnitudes are not written to this file')
        except ValueError as err:
            raise ValueError(f'{component}.{layer_name} cannot be written as a diffusers LoRA: {err}; use '
                             f'save_kohya (LyCORIS keys) or save_merged_unet instead') from None
        key = f'{component}.{layer_name}'
        state[f'{key}.lora_A.weight'] = form.down.to(dtype).contiguous()
        state[f'{key}.lora_B.weight'] = form.up.to(dtype).contiguous()
    return state


def save_diffusers_lora(pipe_or_components: Any, directory: Union[str, os.PathLike],
                        names: Optional[Iterable[str]] = None, dtype: torch.dtype = torch.float32
                        ) -> Dict[str, torch.Tensor]:
    """Write ``directory/pytorch_lora_weights.safetensors``: ``pipe.load_lora_weights(directory)`` loads it."""
    from safetensors.torch import save
    state = {k: v.cpu() for k, v in diffusers_lora_state_dict(pipe_or_components, names, dtype).items()}
    atomic_write_bytes(os.path.join(os.fspath(directory), DIFFUSERS_LORA_NAME),
                       save(state, metadata={'format': 'pt', 'visadapt_export': 'diffusers'}))
    return state
