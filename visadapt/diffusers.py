"""diffusers integration: SDXL targets, pipeline load/unload, and exports other tools load.

Targets (module-name patterns, see :func:`visadapt.config.matches`):

* :data:`UNET_CONV_PATTERNS`: every conv of the UNet: ``conv_in``, ``conv_out``, the resnets' ``conv1``/``conv2``/
  ``conv_shortcut`` and the down/upsamplers' ``conv`` (FLoRA by default; the FLoRA paper tuned all SDXL convs);
* :data:`UNET_ATTENTION_PATTERNS`: the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0``;
* :data:`TEXT_ENCODER_ATTENTION_PATTERNS`: CLIP's ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``.

Several named adapters may live in one model (e.g. ``'conv'`` = FLoRA on the convs and ``'attn'`` = LoRA on the
attention). Our own format saves each (component, adapter) pair with :func:`visadapt.save_adapter` under
``<dir>/<component>/<adapter>/``; :func:`load_into_pipeline` / :func:`unload_from_pipeline` attach and detach them.

Exports, each exact (tests rebuild ΔW the way the loading tool does):

* :func:`save_merged_unet`: ``save_pretrained`` of the UNet with W + ΔW (no visadapt needed to load it);
* :func:`kohya_state_dict` / :func:`save_kohya`: kohya/LyCORIS keys ``lora_unet_<module path with _>``,
  ``lora_te1_...``, ``lora_te2_...``. A FLoRA conv is a Tucker LoCon: ``lora_down`` (R, in, 1, 1), ``lora_mid``
  (R, R, kh, kw) = G ×₃ A3 ×₄ A4, ``lora_up`` (out, R, 1, 1) = s·A1, ``alpha`` = R, with R = max(r_out, r_in) (the
  smaller side is zero-padded: LyCORIS' mid is square); a linear FLoRA, LoRA, MoSLoRA, SeRA (down = blockdiag(A),
  up = α·blockdiag(B)·C) or SVFT (down = Vᵀ, up = U M) is ``lora_down``/``lora_up``, the middle matrices folded
  into one side and the scale into ``lora_up`` (so alpha/rank = 1 exactly).
  Any other mergeable method is written as LyCORIS' full ``diff`` (ΔW itself).
* :func:`diffusers_lora_state_dict` / :func:`save_diffusers_lora`: the PEFT-style ``unet.<path>.lora_A.weight`` /
  ``lora_B.weight`` keys ``pipeline.load_lora_weights`` reads, for adapters that are exactly a (conv) LoRA: LoRA,
  MoSLoRA, SeRA, SVFT, linear FLoRA, and also conv FLoRA (its mode-1 unfolding has rank r_out, so ΔW = B A with
  A = G ×₂ A2 ×₃ A3 ×₄ A4 a (r_out, in, kh, kw) conv and B = s·A1 a 1×1 conv).

Needs the ``diffusers`` extra (``pip install 'visadapt[diffusers]'``) only for the pipeline helpers; the exports
are plain tensors.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .config import AdapterConfig, get_config_class, matches
from .io import CONFIG_NAME, atomic_write_bytes, load_adapter, save_adapter
from .layer import iter_adapted
from .site import site_from_module
from .tuner import adapter_names, remove, select_targets

__all__ = ['UNET_CONV_PATTERNS', 'UNET_ATTENTION_PATTERNS', 'TEXT_ENCODER_ATTENTION_PATTERNS', 'PIPELINE_COMPONENTS',
           'has_diffusers', 'target_config', 'count_adapter_params', 'fit_rank', 'LowRank', 'adapter_lowrank',
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


def count_adapter_params(model: nn.Module, config: AdapterConfig) -> int:
    """Trainable adapter parameters ``config`` would add to ``model``, counted without allocating (meta tensors)."""
    total = 0
    for name, module in select_targets(model, config):
        site, layer_config = site_from_module(module), config.for_layer(name)
        with torch.device('meta'):
            adapter = layer_config.adapter_cls(layer_config, site, torch.empty(site.weight_shape))
        total += adapter.num_trainable()
    return total


def fit_rank(model: nn.Module, config: AdapterConfig, budget: int, max_rank: int = 4096) -> AdapterConfig:
    """``config`` with the largest rank ``r`` whose adapter on ``model`` has at most ``budget`` trainable parameters.

    The count grows with r, so this is a bisection over r ∈ [1, max_rank]; ``rank_pattern`` entries are dropped (the
    budget fixes one rank for all layers). Raises ValueError if even r = 1 exceeds the budget.
    """
    if not any(f.name == 'r' for f in dataclasses.fields(config)):
        raise ValueError(f'{config.method} has no rank r, so a parameter budget cannot set it')
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f'budget must be a positive number of parameters, got {budget!r}')

    def with_r(r: int) -> AdapterConfig:
        return dataclasses.replace(config, r=r, rank_pattern={})

    smallest = count_adapter_params(model, with_r(1))
    if smallest > budget:
        raise ValueError(f'a parameter budget of {budget:,} is too small for {config.method}: rank 1 already needs '
                         f'{smallest:,} parameters on these layers')
    lo, hi = 1, max_rank
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_adapter_params(model, with_r(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return with_r(lo)


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
                                f'visadapt.diffusers.save_pipeline_adapters')
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
    from .tuner import merge as merge_adapters
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
def _is_adapter_key(key: str) -> bool:
    return 'visadapt' in key.split('.')


@torch.no_grad()
def _merge_into(state: Dict[str, torch.Tensor], model: nn.Module, prefix: str = '') -> Dict[str, torch.Tensor]:
    for key in [k for k in state if _is_adapter_key(k)]:
        del state[key]
    for layer_name, module in iter_adapted(model):
        adapters = module.active_adapters()
        if not adapters:
            continue
        key = f'{prefix}{layer_name}.'
        weight, bias = state[key + 'weight'], state.get(key + 'bias')
        device = next(adapters[0].parameters(), weight).device
        w, b = weight.to(device, torch.float32), (None if bias is None else bias.to(device, torch.float32))
        for adapter in adapters:
            w, b = adapter.adapted_weight(w), adapter.adapted_bias(b)
        state[key + 'weight'] = w.to(device=weight.device, dtype=weight.dtype)
        if b is not None:
            state[key + 'bias'] = b.to(device=bias.device, dtype=bias.dtype)
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


# ---- low-rank forms of adapters ---------------------------------------------------------------------------------------
@dataclass
class LowRank:
    """ΔW = up ·(mid)· down with the scale folded into ``up`` (float32).

    Attributes:
        down: Linear ``(R, in)``; conv ``(R, in, *k)`` without a mid, ``(R, in, 1, ..)`` with one.
        up: Linear ``(out, R)``; conv ``(out, R, 1, ..)``.
        mid: None, or the Tucker core ``(R, R, *k)`` (rows: up side, columns: down side).
    """
    down: torch.Tensor
    up: torch.Tensor
    mid: Optional[torch.Tensor] = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the layer layout (the reference rebuild: LyCORIS' ``rebuild_tucker`` / a plain product)."""
        up, down = self.up.flatten(1), self.down.flatten(1)
        if self.mid is None:
            return (up @ down).reshape(self.up.shape[0], *self.down.shape[1:])
        return torch.einsum('ij...,pi,jr->pr...', self.mid, up, down)

    def as_chain(self) -> 'LowRank':
        """The same ΔW without a mid: down becomes the (R, in, *k) conv ``mid ×₂ down``."""
        if self.mid is None:
            return self
        down = torch.einsum('ij...,jc->ic...', self.mid, self.down.flatten(1))
        return LowRank(down.contiguous(), self.up)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if t.shape[0] < rows else t


def _flora_lowrank(adapter: nn.Module) -> LowRank:
    from .methods.flora import tucker_weight
    core, factors, s = adapter.G.detach().float(), [f.detach().float() for f in adapter.factors], adapter.scale
    site = adapter.site
    if site.kind == 'linear':
        return LowRank(core @ factors[1].t(), s * factors[0])
    mid = tucker_weight(core, factors, modes=range(2, core.dim()))        # (r_out, r_in, *k)
    ones = (1,) * site.ndim
    if all(k == 1 for k in site.kernel_size):  # a pointwise conv: no spatial core, fold it into down
        down = mid.flatten(1) @ factors[1].t()
        return LowRank(down.reshape(*down.shape, *ones), (s * factors[0]).reshape(*factors[0].shape, *ones))
    rank = max(core.shape[0], core.shape[1])  # LyCORIS' mid is square: zero-pad the smaller side
    padded = mid.new_zeros(rank, rank, *mid.shape[2:])
    padded[:mid.shape[0], :mid.shape[1]] = mid
    down = _pad_rows(factors[1].t(), rank)
    up = _pad_rows((s * factors[0]).t(), rank).t()
    return LowRank(down.reshape(*down.shape, *ones).contiguous(), up.reshape(*up.shape, *ones).contiguous(), padded)


def _lora_lowrank(adapter: nn.Module, mixer: Optional[torch.Tensor] = None) -> LowRank:
    if adapter.site.kind != 'linear' and adapter.conv_form != 'chain':
        raise ValueError("LoRA with conv_form='reshape' is not a conv LoRA chain")
    up = adapter.scale * adapter.B.detach().float()
    if mixer is not None:
        up = up @ mixer.detach().float()
    ones = (1,) * adapter.site.ndim
    return LowRank(adapter.A.detach().float(), up.reshape(*up.shape, *ones))


def _sera_lowrank(adapter: nn.Module) -> LowRank:
    # ΔW = α · B C A with block-diagonal A (r, in) and B (out, r): down = A, up = α · B C
    adapter.delta_weight()  # raises for the MPC 'n' form, which has no ΔW
    A, B, C = (t.detach().float() for t in (adapter.A, adapter.B, adapter.C))
    return LowRank(torch.block_diag(*A), adapter.alpha * torch.block_diag(*B) @ C)


def _svft_lowrank(adapter: nn.Module) -> LowRank:
    # ΔW = (U M) Vᵀ with the frozen singular vectors: down = Vᵀ (p, in·Πk) as a conv/linear, up = U M
    from .methods.svft import svft_um
    values = adapter.m_values().detach().float()
    up = svft_um(adapter.U.float(), values, adapter.indices)
    site, ones = adapter.site, (1,) * adapter.site.ndim
    down = adapter.V.float().t().reshape(-1, *site.weight_shape[1:])
    return LowRank(down.contiguous(), up.reshape(*up.shape, *ones))


_LOWRANK = {'flora': _flora_lowrank, 'lora': _lora_lowrank, 'moslora': lambda a: _lora_lowrank(a, a.M),
            'sera': _sera_lowrank, 'svft': _svft_lowrank}


def adapter_lowrank(adapter: nn.Module) -> LowRank:
    """The exact (down, mid, up) form of one adapter; ValueError for a method or layer that has none."""
    method = adapter.config.method.lower()
    if method not in _LOWRANK:
        raise ValueError(f'{adapter.config.method} has no exact LoRA/LoCon form; methods with one: '
                         f'{sorted(_LOWRANK)}')
    if adapter.site.groups != 1:
        raise ValueError(f'grouped convs (groups={adapter.site.groups}) have no LoCon form')
    return _LOWRANK[method](adapter)


def _stack(parts: Sequence[LowRank]) -> LowRank:
    """Several adapters on one layer as one: ranks concatenated, Tucker cores block-diagonal (exact)."""
    if len(parts) == 1:
        return parts[0]
    if len({p.mid is None for p in parts}) > 1:
        parts = [p.as_chain() for p in parts]
    down = torch.cat([p.down for p in parts])
    up = torch.cat([p.up for p in parts], dim=1)
    if parts[0].mid is None:
        return LowRank(down, up)
    mid = down.new_zeros(down.shape[0], down.shape[0], *parts[0].mid.shape[2:])
    at = 0
    for p in parts:
        mid[at:at + p.rank, at:at + p.rank] = p.mid
        at += p.rank
    return LowRank(down, up, mid)


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
    loaders' alpha/rank scale is 1 and the scale sits in ``lora_up``), or ``.diff`` (full ΔW) for methods without a
    low-rank form. Several adapters on one layer are stacked into one exact LoCon.
    """
    state: Dict[str, torch.Tensor] = {}
    for component, layer_name, module, adapters in _adapted_layers(_components(pipe_or_components), names):
        key = f'{KOHYA_PREFIXES[component]}_{layer_name}'.replace('.', '_')
        try:
            lowrank = _stack([adapter_lowrank(a) for _, a in adapters])
        except ValueError:
            lowrank = None
        if lowrank is None:
            weight = module.weight.detach().float()
            delta = weight
            for _, adapter in adapters:
                if not adapter.mergeable:
                    raise ValueError(f'adapter on {component}.{layer_name} ({adapter.config.method}) cannot be '
                                     f'exported: {adapter.why_not_mergeable()}')
                delta = adapter.adapted_weight(delta)
            state[f'{key}.diff'] = (delta - weight).to(dtype).contiguous()
            continue
        state[f'{key}.lora_down.weight'] = lowrank.down.to(dtype).contiguous()
        state[f'{key}.lora_up.weight'] = lowrank.up.to(dtype).contiguous()
        if lowrank.mid is not None:
            state[f'{key}.lora_mid.weight'] = lowrank.mid.to(dtype).contiguous()
        state[f'{key}.alpha'] = torch.tensor(float(lowrank.rank), dtype=dtype)
    return state


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

    Every adapter must be exactly a LoRA (see the module docstring); no alphas are written, so diffusers uses
    lora_alpha = r (scale 1) and the scale sits in ``lora_B``. ValueError names the first layer that is not.
    """
    state: Dict[str, torch.Tensor] = {}
    for component, layer_name, module, adapters in _adapted_layers(_components(pipe_or_components), names):
        try:
            lowrank = _stack([adapter_lowrank(a) for _, a in adapters]).as_chain()
        except ValueError as err:
            raise ValueError(f'{component}.{layer_name} cannot be written as a diffusers LoRA: {err}; use '
                             f'save_kohya (LyCORIS keys) or save_merged_unet instead') from None
        key = f'{component}.{layer_name}'
        state[f'{key}.lora_A.weight'] = lowrank.down.to(dtype).contiguous()
        state[f'{key}.lora_B.weight'] = lowrank.up.to(dtype).contiguous()
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
