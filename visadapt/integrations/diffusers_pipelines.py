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

* :func:`save_diffusers_lora`: ``pytorch_lora_weights.safetensors``, the file ``pipeline.load_lora_weights(dir)``
  reads: PEFT-style ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` (and DoRA's ``lora_magnitude_vector``) for
  every adapter with a factored form, with each component's LoRA config (ranks, alpha = rank) in the file's
  metadata; a conv Tucker form is written as its chain (its mode-1 unfolding has rank r_out, so ΔW = B A with
  A = G ×₂ A2 ×₃ A3 ×₄ A4 a (r_out, in, kh, kw) conv and B = s·A1 a 1×1 conv);
* :func:`save_merged_unet`: ``save_pretrained`` of the UNet with W + ΔW (no visadapt needed to load it);
* kohya / LyCORIS files (A1111, ComfyUI; sd-scripts' SDXL names): :mod:`visadapt.integrations.kohya_format`.

Needs the ``diffusers`` extra (``pip install 'visadapt[diffusers]'``) only for the pipeline helpers; the exports
are plain tensors.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

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
           'DIFFUSERS_LORA_NAME', 'has_diffusers', 'target_config', 'pipeline_components', 'layer_factors',
           'adapted_layers', 'export_module_path', 'save_pipeline_adapters', 'load_pipeline_adapters', 'load_into_pipeline',
           'unload_from_pipeline', 'merged_state_dict', 'save_merged_unet', 'diffusers_lora_state_dict',
           'diffusers_lora_metadata', 'save_diffusers_lora']

UNET_CONV_PATTERNS: Tuple[str, ...] = ('conv_in', 'conv_out', 'resnets.*.conv1', 'resnets.*.conv2',
                                       'resnets.*.conv_shortcut', 'downsamplers.*.conv', 'upsamplers.*.conv')
UNET_ATTENTION_PATTERNS: Tuple[str, ...] = ('to_q', 'to_k', 'to_v', 'to_out.0')
TEXT_ENCODER_ATTENTION_PATTERNS: Tuple[str, ...] = ('q_proj', 'k_proj', 'v_proj', 'out_proj')
#: pipeline attributes that can hold adapters
PIPELINE_COMPONENTS: Tuple[str, ...] = ('unet', 'text_encoder', 'text_encoder_2')
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
def pipeline_components(pipe_or_components: Any) -> Dict[str, nn.Module]:
    """``{component: model}`` of a pipeline (its UNet and text encoders that are set) or of a dict of them."""
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
    for component, model in pipeline_components(pipe_or_components).items():
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
    components = pipeline_components(pipe_or_components)
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
        components = pipeline_components(pipe)
        for component, name in pairs:
            merge_adapters(components[component], name)
    return pairs


def unload_from_pipeline(pipe: Any, merge_weights: bool = False) -> List[Tuple[str, str]]:
    """Remove every visadapt adapter from the pipeline: base weights back (or ΔW baked in, ``merge_weights=True``)."""
    removed = []
    for component, model in pipeline_components(pipe).items():
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
    """The exact form of adapters ``names`` on one layer (stacked when several), detached in float32.

    Raises ValueError when there is none (a method without ``factor_form``, a grouped conv, DoRA stacked with
    another adapter).
    """
    if module.site.groups != 1:
        raise ValueError(f'grouped convs (groups={module.site.groups}) have no LoRA/LoCon form')
    return stack_factors([module.visadapt[n].factor_form() for n in names]).detached()


def adapted_layers(components: Dict[str, nn.Module], names: Optional[Iterable[str]] = None
                   ) -> Iterator[Tuple[str, str, nn.Module, List[str]]]:
    """(component, layer name, layer, adapter names on it) for every layer holding adapters ``names`` (default:
    all); ValueError when there is none."""
    wanted = None if names is None else set(names)
    found = False
    for component, model in components.items():
        for layer_name, module in iter_adapted(model):
            adapters = [n for n in module.visadapt if wanted is None or n in wanted]
            if adapters:
                found = True
                yield component, layer_name, module, adapters
    if not found:
        what = f'named {sorted(wanted)}' if wanted else 'at all'
        raise ValueError(f'no visadapt adapter {what} in the components {sorted(components)}; adapters present: '
                         f'{ {c: adapter_names(m) for c, m in components.items()} }')


def export_module_path(model: nn.Module, layer_name: str) -> str:
    """The module path LoRA files name: transformers 5's ``CLIPTextModel`` dropped the ``text_model.`` level that
    kohya's and diffusers' files (and transformers 4) have, so it is put back; diffusers strips it again when it
    loads into a model without it."""
    if hasattr(model, 'text_model') or type(model).__name__ != 'CLIPTextModel':
        return layer_name
    return f'text_model.{layer_name}'


# ---- diffusers (PEFT) LoRA -----------------------------------------------------------------------------------------
def _peft_magnitude(form: Factors, module: nn.Module) -> torch.Tensor:
    """PEFT's DoRA magnitude for a layer: DoRA's own m, or ‖W + ΔW‖ per output channel for an additive update (then
    PEFT's m ⊙ (W + ΔW) / ‖W + ΔW‖ is W + ΔW itself). Conv magnitudes are (1, out, 1, ...), as PEFT stores them."""
    magnitude = form.magnitude
    if magnitude is None:
        weight = module.base_params()[0].detach().to(form.up)
        magnitude = (weight + form.delta_weight().reshape(weight.shape)).flatten(1).norm(dim=1)
    return magnitude if module.site.kind == 'linear' else magnitude.reshape(1, -1, *([1] * module.site.ndim))


def _component_lora(layers, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """One component's ``<path>.lora_A.weight`` / ``lora_B.weight`` (and ``lora_magnitude_vector``) tensors."""
    forms = {}
    for component, layer_name, module, adapters, path in layers:
        try:
            forms[path] = (layer_factors(module, adapters).as_chain(), module)
        except ValueError as err:
            raise ValueError(f'{component}.{layer_name} cannot be written as a diffusers LoRA: {err}; use '
                             f'kohya_format.save_kohya (LyCORIS keys) or save_merged_unet instead') from None
    dora = any(form.magnitude is not None for form, _ in forms.values())  # PEFT's use_dora is per component
    state = {}
    for layer_name, (form, module) in forms.items():
        state[f'{layer_name}.lora_A.weight'] = form.down.to(dtype).contiguous()
        state[f'{layer_name}.lora_B.weight'] = form.up.to(dtype).contiguous()
        if dora:
            state[f'{layer_name}.lora_magnitude_vector'] = _peft_magnitude(form, module).to(dtype).contiguous()
    return state


def diffusers_lora_state_dict(pipe_or_components: Any, names: Optional[Iterable[str]] = None,
                              dtype: torch.dtype = torch.float32) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per component, the PEFT-style tensors ``pipeline.load_lora_weights`` reads: ``<module path>.lora_A.weight``,
    ``lora_B.weight`` and, for DoRA, ``lora_magnitude_vector``.

    Every adapter must have an exact factored form (``Adapter.factor_form``); a conv Tucker form is written as its
    chain (up = s·A⁽¹⁾ a 1×1 conv, down = the rest with the layer's kernel). Scales sit in ``lora_B``, so every
    module has alpha = rank (:func:`diffusers_lora_metadata`). A component with a DoRA layer is written all in DoRA
    form (PEFT's ``use_dora`` is per adapter config): an additive layer gets m = ‖W + ΔW‖, which reproduces
    W + ΔW. ValueError names the first layer that has no such form.
    """
    components = pipeline_components(pipe_or_components)
    by_component: Dict[str, list] = {}
    for component, layer_name, module, adapters in adapted_layers(components, names):
        path = export_module_path(components[component], layer_name)
        by_component.setdefault(component, []).append((component, layer_name, module, adapters, path))
    return {component: _component_lora(layers, dtype) for component, layers in by_component.items()}


def diffusers_lora_metadata(state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """The LoRA config (``peft.LoraConfig`` fields) of one component's :func:`diffusers_lora_state_dict`: every
    module's rank, alpha = rank (scale 1), its target modules and ``use_dora``. diffusers' loaders read it from
    the file's ``lora_adapter_metadata``, so no rank or scale is guessed."""
    from collections import Counter

    from peft import LoraConfig
    # target paths without the ``text_model.`` level match CLIP encoders with and without it (PEFT matches suffixes)
    ranks = {k[:-len('.lora_A.weight')].removeprefix('text_model.'): v.shape[0] for k, v in state.items()
             if k.endswith('.lora_A.weight')}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {path: rank for path, rank in ranks.items() if rank != r}
    fields = dict(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), target_modules=sorted(ranks),
                  use_dora=any(k.endswith('.lora_magnitude_vector') for k in state))
    LoraConfig(**fields)  # PEFT's own validation of the fields
    return fields


def save_diffusers_lora(pipe_or_components: Any, directory: Union[str, os.PathLike],
                        names: Optional[Iterable[str]] = None, dtype: torch.dtype = torch.float32
                        ) -> Dict[str, Dict[str, torch.Tensor]]:
    """Write ``directory/pytorch_lora_weights.safetensors`` (diffusers' own ``save_lora_weights``, with each
    component's :func:`diffusers_lora_metadata`, into a temporary folder, then written atomically into place):
    ``pipe.load_lora_weights(directory)`` loads it. Returns the tensors per component."""
    import tempfile

    from diffusers import StableDiffusionXLPipeline
    directory = os.fspath(directory)
    state = {c: {k: v.cpu() for k, v in s.items()} for c, s in diffusers_lora_state_dict(
        pipe_or_components, names, dtype).items()}
    kwargs = {}
    for component, tensors in state.items():
        kwargs[f'{component}_lora_layers'] = tensors
        kwargs[f'{component}_lora_adapter_metadata'] = diffusers_lora_metadata(tensors)
    with tempfile.TemporaryDirectory(prefix='visadapt-lora-') as tmp:
        StableDiffusionXLPipeline.save_lora_weights(tmp, weight_name=DIFFUSERS_LORA_NAME, **kwargs)
        with open(os.path.join(tmp, DIFFUSERS_LORA_NAME), 'rb') as f:
            atomic_write_bytes(os.path.join(directory, DIFFUSERS_LORA_NAME), f.read())
    return state
