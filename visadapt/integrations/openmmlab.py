"""OpenMMLab integration (mmengine, mmdet, mmseg): the adapter is part of ``cfg.model``, so it travels with the model.

Any mmdet 3.x / mmseg 1.x config becomes an adapter config with two changes::

    custom_imports = dict(imports=['visadapt.integrations.openmmlab'], allow_failed_imports=False)
    model = dict(type='AdaptedModel', model_type='MaskRCNN',          # the model's own type moves to model_type
                 adapter=dict(type='FLoRA', r=16, r3=2, scale=4.0))   # any visadapt method

``model`` merges with the base config's model dict as usual (backbone, neck and heads stay). Whatever builds
``cfg.model`` builds the adapted model: mmdet's and mmseg's stock ``tools/train.py`` and ``tools/test.py``, ``torchrun``
/ ``dist_train.sh``, mmengine's ``Runner`` and ``FlexibleRunner``, ``init_detector`` / ``inference_detector`` /
``DetInferencer`` and ``init_model`` / ``inference_model`` / ``MMSegInferencer``. What this module registers:

* ``AdaptedModel`` (in mmengine's root ``MODELS``, which every OpenMMLab toolbox's registry falls back to):
  :func:`build_adapted_model` builds ``model_type`` from the other keys, loads its pretrained weights
  (``init_weights()``: backbone ``init_cfg`` / ``pretrained``, a model-level ``init_cfg``), injects the adapter and
  returns the model itself: the toolbox's own class with its own parameter names, adapted before any runner wraps it
  in DDP or builds an optimizer. The model carries state-dict hooks (the checkpoint format, below) and, when the
  adapter sets ``mpc='o'``/``'d'``, adds the MPC regularizer to its losses as ``loss_mpc``.
* :class:`TimmBackbone` (mmdet's and mmseg's ``MODELS``): a timm model with ``forward_intermediates`` as a
  multi-scale backbone, weights from a local file or a pip package (never a hub).
* :class:`AdapterStatsHook` (``HOOKS``; list it in ``custom_hooks``): trainable counts and mean ‖ΔW‖_F per stage.

Checkpoints: ``state_dict()`` of an adapted model holds only what the adapter owns
(:func:`visadapt.core.adapter_state_keys`: the adapter tensors and the fully trained neck/heads) and, in the state
dict's own ``_metadata[''][STATE_META_KEY]``, :func:`checkpoint_metadata` (the adapter's config, layers and per-layer
facts, and fingerprints of the adapted layers' base weights), so every runner saves adapter-only checkpoints
(:func:`full_state_dict` keeps the base too). Loading a state dict into the model (``load_from``, ``resume``,
``tools/test.py``, the inference APIs, ``load_state_dict``):

* an adapter checkpoint is checked (adapter names, config, layers, base weights, every key, shape and value:
  :func:`visadapt.core.check_adapter_metadata`, :func:`visadapt.core.check_state_dict`) and completed with the
  model's own frozen base tensors; a mismatch is a ValueError naming it;
* a plain checkpoint (no adapter tensors, e.g. a COCO-trained detector as ``load_from``) loads into the base, and the
  adapters of every layer whose weight it replaced are rebuilt from the loaded weight (SVFT's bases, DoRA's
  magnitudes), in place: the optimizer and DDP keep their parameters.

Two fixes for the stack as installed, applied on import: mmengine 0.10 reads checkpoints with ``torch.load``'s default,
which is ``weights_only=True`` since torch 2.6 and refuses the message-hub objects every mmengine training checkpoint
holds, so mmengine's local checkpoint loader is re-registered to allow exactly those classes (:data:`MMENGINE_GLOBALS`,
still ``weights_only``); and under ``torchrun`` on a machine without CUDA the gloo process group is initialized
before mmengine's ``pytorch`` launcher would call ``torch.cuda.set_device`` (:func:`init_cpu_process_group`; the
smoke configs also set ``model_wrapper_cfg`` with ``device_ids=None``, which DDP needs for a CPU model). And, never
silent: once this module is imported, a config that names an ``adapter`` outside ``cfg.model`` (which no runner or
inference API would apply) fails to load with the fix in the message (:func:`refuse_top_level_adapter`).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

try:
    from mmengine.config import Config
    from mmengine.dist import broadcast
    from mmengine.hooks import Hook
    from mmengine.logging import print_log
    from mmengine.model import BaseModule, initialize, is_model_wrapper
    from mmengine.registry import HOOKS, MODELS
    from mmengine.runner.checkpoint import CheckpointLoader, load_from_local
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    raise ImportError('visadapt.integrations.openmmlab needs mmengine (and mmdet and/or mmsegmentation): pip install '
                      '"visadapt[mm]" then bash tools/build_mmcv.sh for mmcv with compiled ops') from _err

from .._version import __version__
from ..core import (
    ADAPTER_ATTR,
    AdapterConfig,
    adapter_metadata,
    adapter_names,
    adapter_state_keys,
    base_weight,
    build_adapter,
    check_adapter_metadata,
    check_spec_fields,
    check_state_dict,
    count_parameters,
    fingerprint,
    fingerprint_mismatch,
    get_injection,
    inject,
    is_adapter_key,
    iter_adapted,
    method_names,
    parse_adapter_spec,
    regularization_loss,
)

__all__ = ['TimmBackbone', 'build_adapted_model', 'AdapterStatsHook', 'resolve_adapter_config', 'checkpoint_metadata',
           'check_adapter_checkpoint', 'full_state_dict', 'rebuild_adapters', 'stage_of', 'delta_weight_norms',
           'trainable_by_stage', 'init_cpu_process_group', 'refuse_top_level_adapter', 'ADAPTED_MODEL', 'STATE_META_KEY', 'MMENGINE_GLOBALS',
           'REGISTERED_IN']

#: the registered type name of :func:`build_adapted_model`
ADAPTED_MODEL = 'AdaptedModel'
#: key of :func:`checkpoint_metadata` in an adapted model's ``state_dict()._metadata['']``
STATE_META_KEY = 'visadapt'


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_model_wrapper(model) else model


# ---- the timm backbone ---------------------------------------------------------------------------------------------
class TimmBackbone(BaseModule):
    """A timm model as an mmdet/mmseg backbone: returns the feature maps of the chosen stages.

    Features come from timm's ``forward_intermediates`` on the plain model, so parameter names are the model's own
    (``model.stages.0...``) and any timm checkpoint loads by name; the classifier head and unused trailing stages
    are pruned (``prune_intermediate_layers``).

    Args:
        model_name: a timm architecture, e.g. ``'convnextv2_large'``, ``'efficientnet_lite0'``.
        out_indices: indices into the model's ``feature_info`` (ConvNeXt: stages 0-3 at strides 4-32;
            EfficientNet/MobileNet: 0-4 at strides 2-32).
        pretrained: None/False (random init), a local checkpoint file (``.pth``/``.safetensors``, every key and
            shape checked), or ``'packaged'`` for weights that ship in a pip package (EfficientNet-Lite0,
            MobileNetV2). Never downloads.
        norm_eval: keep BatchNorm layers in eval mode while training (frozen running statistics: adapter
            checkpoints do not store the backbone's buffers, and small detection batches make BN statistics
            noisy). Has no effect on LayerNorm models such as ConvNeXt.
        grad_checkpointing: timm's activation checkpointing (saves memory on large models).
        init_cfg: mmengine init config, e.g. ``dict(type='Pretrained', checkpoint=<file with keys model.*>)``
            (applied by ``init_weights``; ``pretrained`` loads at construction instead).
        **model_kwargs: passed to ``timm.create_model`` (``drop_path_rate``, ``in_chans``, ...).

    Attributes:
        out_channels: channels of each returned feature map, e.g. ``[192, 384, 768, 1536]`` for convnextv2_large.
        strides: their reductions w.r.t. the input, e.g. ``[4, 8, 16, 32]``.

    Loading a checkpoint that holds adapter tensors into a TimmBackbone without an adapter is a ValueError (the
    adapter would otherwise be dropped with only mmengine's "unexpected key" warning).

    Shapes:
        input (N, C, H, W) → tuple of (N, out_channels[i], H / strides[i], W / strides[i]) (rounded up).
    """

    def __init__(self, model_name: str, out_indices: Sequence[int] = (0, 1, 2, 3),
                 pretrained: Union[None, bool, str] = None, norm_eval: bool = True, grad_checkpointing: bool = False,
                 init_cfg: Optional[dict] = None, **model_kwargs: Any):
        super().__init__(init_cfg=init_cfg)
        from .timm_models import create_model, has_timm
        has_timm(necessary=True)
        if not isinstance(model_name, str) or not model_name:
            raise TypeError(f'model_name must be a timm architecture name, got {model_name!r}')
        indices = [out_indices] if isinstance(out_indices, int) else list(out_indices)
        if not indices or any(isinstance(i, bool) or not isinstance(i, int) for i in indices):
            raise ValueError(f'out_indices must be a non-empty sequence of ints, got {out_indices!r}')
        model = create_model(model_name, pretrained=False if pretrained is None else pretrained, **model_kwargs)
        if not hasattr(model, 'forward_intermediates') or not hasattr(model, 'prune_intermediate_layers'):
            raise ValueError(f'timm model {model_name!r} ({type(model).__name__}) has no forward_intermediates, '
                             f'which TimmBackbone needs; most timm CNNs and ViTs have it (convnext*, efficientnet*, '
                             f'mobilenet*, resnet*, regnet*, vit*)')
        info = list(model.feature_info)
        num = len(info)
        resolved = [i + num if i < 0 else i for i in indices]
        if any(not 0 <= i < num for i in resolved) or len(set(resolved)) != len(resolved) \
                or resolved != sorted(resolved):
            raise ValueError(f'out_indices={list(out_indices)} is not valid for {model_name!r}: use distinct, '
                             f'increasing indices in [0, {num - 1}] (its stages: '
                             f'{[(i, f["module"], f["num_chs"], f["reduction"]) for i, f in enumerate(info)]})')
        model.prune_intermediate_layers(resolved, prune_norm=True, prune_head=True)
        if grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.model = model
        self.model_name = model_name
        self.out_indices = resolved
        self.out_channels = [int(info[i]['num_chs']) for i in resolved]
        self.strides = [int(info[i]['reduction']) for i in resolved]
        self.norm_eval = norm_eval
        self.register_load_state_dict_pre_hook(_refuse_unapplied_adapter)

    def init_weights(self) -> None:
        """Apply ``init_cfg`` only: the timm model was initialized (or loaded) at construction, and timm's own
        ``init_weights`` (ViT) must not re-initialize it, as mmengine's default recursion would."""
        if self.init_cfg:
            initialize(self, self.init_cfg)
        self._is_init = True

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.model.forward_intermediates(x, indices=self.out_indices, intermediates_only=True))

    def train(self, mode: bool = True) -> 'TimmBackbone':
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self



def _refuse_unapplied_adapter(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook of :class:`TimmBackbone`: adapter tensors for a backbone without an adapter are an error."""
    key = next((k for k in state_dict if k.startswith(prefix) and is_adapter_key(k[len(prefix):])), None)
    if key is not None and not any(True for _ in iter_adapted(module)):
        raise ValueError(f'the checkpoint holds visadapt adapter tensors (e.g. {key!r}) but this model has no adapter, '
                         f'so they would be dropped: build the model it was trained with, model=dict('
                         f"type='{ADAPTED_MODEL}', model_type=<the model type>, adapter=dict(type=<method>, ...)), "
                         f"with custom_imports=dict(imports=['visadapt.integrations.openmmlab'])")


def _register_backbone() -> List[str]:
    """Register :class:`TimmBackbone` in the MODELS registry of each installed toolbox; returns their names."""
    done = []
    for scope in ('mmdet', 'mmseg'):
        if importlib.util.find_spec(scope) is None:  # toolbox not installed: nothing to register into
            continue
        registry = importlib.import_module(f'{scope}.registry').MODELS  # import errors (no mmcv ops) surface here
        if registry.module_dict.get('TimmBackbone') is not TimmBackbone:
            registry.register_module(name='TimmBackbone', module=TimmBackbone, force=True)
        done.append(scope)
    return done


REGISTERED_IN = _register_backbone()


# ---- adapter config for a detector / segmentor ---------------------------------------------------------------------
def resolve_adapter_config(model: nn.Module, spec: Union[Mapping[str, Any], AdapterConfig]) -> AdapterConfig:
    """The adapter config for an mm model, from the config file's ``adapter`` dict.

    ``spec`` is ``dict(type='FLoRA', **fields)`` (``method`` works as well as ``type``) or a config object. Fields
    left out get mm defaults: ``include=['backbone.*']`` for methods that adapt layers, and ``train_modules`` =
    every top-level child with parameters except ``backbone`` (the neck and heads train fully) for methods that
    take train modules.
    """
    children = dict(model.named_children())

    def defaults(cls: type) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if cls.adapts_layers and 'backbone' in children:
            out['include'] = ['backbone.*']
        if not cls.trains_all:
            out['train_modules'] = [n for n, m in children.items()
                                    if n != 'backbone' and any(True for _ in m.parameters())]
        return out
    return parse_adapter_spec(spec, defaults)


def _check_adapter_spec(spec: Any) -> None:
    """Early check of the ``adapter`` entry (method name and field names), before the model is built."""
    if spec is None:
        raise ValueError(f"model type '{ADAPTED_MODEL}' needs adapter=dict(type=<method>, ...), e.g. "
                         f"adapter=dict(type='FLoRA', r=8); methods: {', '.join(method_names())}")
    if isinstance(spec, AdapterConfig):
        return
    if not isinstance(spec, Mapping):
        raise TypeError(f"adapter must be a dict such as dict(type='FLoRA', r=8), got {type(spec).__name__}")
    check_spec_fields(spec)


# ---- the model builder ---------------------------------------------------------------------------------------------
@dataclass
class _ModelState:
    """Per-model state of the checkpoint hooks, kept in the model's ``__dict__`` (copied with the model)."""
    raw: int = 0  # > 0: state_dict() is the plain torch one (the hooks' own reads of the model)
    full: int = 0  # > 0: state_dict() keeps the frozen base tensors (full_state_dict)
    rebuild: List[str] = field(default_factory=list)  # layers whose base weight a plain checkpoint replaced


_STATE_ATTR = '_visadapt_mm'


def build_adapted_model(model_type: Optional[str] = None, adapter: Union[None, Mapping[str, Any], AdapterConfig] = None,
                        adapter_name: str = 'default', **model_kwargs: Any) -> nn.Module:
    """Registered as ``AdaptedModel``: build ``model_type`` from ``model_kwargs``, load its pretrained weights,
    inject ``adapter``, and return the model itself (its own class and parameter names).

    Args:
        model_type: the model's registered type, e.g. ``'MaskRCNN'``, ``'EncoderDecoder'`` (``'mmdet.MaskRCNN'``
            names the scope explicitly).
        adapter: ``dict(type=<method>, **fields)`` or an :class:`AdapterConfig`; fields left out get the mm
            defaults of :func:`resolve_adapter_config`.
        adapter_name: the adapter's name in the model.
        **model_kwargs: the model's own config (backbone, neck, heads, data_preprocessor, init_cfg, ...).

    Order: build → ``init_weights()`` (pretrained weights, so methods that derive tensors from W such as SVFT see
    them; a runner's later ``init_weights`` call is then a no-op) → ``visadapt.inject`` → checkpoint hooks (and the
    MPC loss). Raises ValueError naming the problem: no ``adapter``, no ``model_type``, an unknown method or field,
    patterns that select no layer (from :func:`visadapt.core.inject`).
    """
    _check_adapter_spec(adapter)
    if not isinstance(model_type, str) or not model_type or model_type.split('.')[-1] == ADAPTED_MODEL:
        raise ValueError(f"model type '{ADAPTED_MODEL}' needs model_type=<the model's own registered type>, e.g. "
                         f"model_type='MaskRCNN' or 'EncoderDecoder'; got {model_type!r}")
    model = MODELS.build(dict(type=model_type, **model_kwargs))
    if hasattr(model, 'init_weights') and not any(p.is_meta for p in model.parameters()):  # meta: no weights to load
        model.init_weights()
    report = inject(model, resolve_adapter_config(model, adapter), name=adapter_name)
    model.__dict__[_STATE_ATTR] = _ModelState()
    model.register_state_dict_post_hook(_slim_state_dict)
    model.register_load_state_dict_pre_hook(_complete_checkpoint)
    model.register_load_state_dict_post_hook(_rebuild_after_plain_load)
    if any(getattr(get_injection(model, n).config, 'mpc', None) in ('o', 'd') for n in adapter_names(model)):
        model.register_forward_hook(_add_mpc_loss, with_kwargs=True)
    print_log(str(report), logger='current')
    return model


MODELS.register_module(name=ADAPTED_MODEL, module=build_adapted_model, force=True)


def _add_mpc_loss(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook: in ``mode='loss'`` while training, add Σ λ·R(A, B) to the loss dict as ``loss_mpc``, so
    mmengine's ``parse_losses`` sums and logs it and one backward (through DDP and AMP) takes its gradient."""
    if module.training and kwargs.get('mode') == 'loss' and isinstance(output, dict):
        output['loss_mpc'] = regularization_loss(module)
    return output


# ---- checkpoints -----------------------------------------------------------------------------------------------------
def _model_state(model: nn.Module) -> _ModelState:
    state = _unwrap(model).__dict__.get(_STATE_ATTR)
    if state is None:
        raise ValueError(f"this model was not built by '{ADAPTED_MODEL}' (model=dict(type='{ADAPTED_MODEL}', ...))")
    return state


@contextlib.contextmanager
def _raised(model: nn.Module, attr: str) -> Iterator[nn.Module]:
    state = _model_state(model)
    setattr(state, attr, getattr(state, attr) + 1)
    try:
        yield model
    finally:
        setattr(state, attr, getattr(state, attr) - 1)


def full_state_dict(model: nn.Module):
    """Context manager: inside it, ``state_dict()`` of an ``AdaptedModel`` keeps the frozen base tensors too."""
    return _raised(model, 'full')


def _plain_state(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The model's complete state dict and the keys the adapter owns, without this module's hooks."""
    with _raised(model, 'raw'):
        return model.state_dict(), adapter_state_keys(model)


def _active_base(module: nn.Module) -> bool:
    """Is the layer's weight its base weight (no adapter merged into it)?"""
    return not any(module.is_merged(n) for n in getattr(module, ADAPTER_ATTR))


def checkpoint_metadata(model: nn.Module) -> Dict[str, Any]:
    """What an adapted model's state dict carries besides tensors: the visadapt version, parameter counts, the
    schema's metadata of each adapter (:func:`visadapt.core.adapter_metadata`) and ``base_weights``, a fingerprint
    (:func:`visadapt.core.fingerprint`) of each adapted layer's base weight (the tensors the checkpoint leaves out)."""
    model = _unwrap(model)
    trainable, total = count_parameters(model)
    return {'visadapt_version': __version__, 'trainable': trainable, 'total': total,
            'adapters': {n: adapter_metadata(model, n) for n in adapter_names(model)},
            'base_weights': {name: fingerprint(base_weight(m)) for name, m in iter_adapted(model) if _active_base(m)}}


def _slim_state_dict(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: add :func:`checkpoint_metadata`, keep only the keys the adapter owns."""
    state = _model_state(module)
    if state.raw:
        return
    local_metadata[STATE_META_KEY] = checkpoint_metadata(module)
    if state.full:
        return
    keep = {prefix + k for k in _plain_state(module)[1]}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in keep]:
        del state_dict[key]


def _saved_metadata(state_dict: Mapping[str, Any], local_metadata: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The checkpoint's :func:`checkpoint_metadata`: this module's entry, or the one entry holding it (a checkpoint
    saved from a wrapped model keeps it under the wrapper's prefix while its keys were renamed)."""
    if STATE_META_KEY in local_metadata:
        return local_metadata[STATE_META_KEY]
    found = [m[STATE_META_KEY] for m in getattr(state_dict, '_metadata', {}).values() if STATE_META_KEY in m]
    return found[0] if len(found) == 1 else None


def check_adapter_checkpoint(model: nn.Module, meta: Optional[Mapping[str, Any]], tensors: Mapping[str, torch.Tensor],
                             source: str = 'the adapter checkpoint') -> None:
    """Raise ValueError unless ``tensors`` (keys without prefix) with ``meta`` (:func:`checkpoint_metadata`) fit
    ``model``: the same adapters with the same configs and layers, the same base weights, every owned key present
    with the model's shape and finite values, no unknown key."""
    if meta is None:
        key = next((k for k in tensors if is_adapter_key(k)), '?')
        raise ValueError(f"{source} holds visadapt adapter tensors (e.g. {key!r}) but no visadapt metadata (the state "
                         f"dict's _metadata[''][{STATE_META_KEY!r}], written by the model's state_dict()); without "
                         f'it the adapter config cannot be checked')
    saved, present = sorted(meta.get('adapters', {})), sorted(adapter_names(model))
    if saved != present:
        raise ValueError(f"{source} holds adapter(s) {saved} but the model has {present}; set the config's "
                         f'model.adapter (and adapter_name) to those the checkpoint was trained with')
    for name, entry in meta['adapters'].items():
        check_adapter_metadata(model, name, entry, source)
    _check_base_weights(model, meta.get('base_weights', {}), source)
    model_state, owned = _plain_state(model)
    owned_set = set(owned)
    check_state_dict(model_state, tensors, source, optional=[k for k in model_state if k not in owned_set])


def _check_base_weights(model: nn.Module, saved: Mapping[str, Any], source: str) -> None:
    for layer_name, module in iter_adapted(model):
        if layer_name in saved and _active_base(module):
            problem = fingerprint_mismatch(saved[layer_name], fingerprint(base_weight(module)))
            if problem:
                raise ValueError(
                    f'{source} was trained on other base weights than this model holds (layer {layer_name!r} differs '
                    f'in {problem}). An adapter checkpoint holds no base weights: they come from the config '
                    f"(backbone pretrained / init_cfg, the model's init_cfg). mmdet's init_detector drops "
                    f'backbone.init_cfg unless cfg_options is given (init_detector(config, checkpoint, '
                    f"cfg_options={{}})); a run started from load_from=<full checkpoint> needs model.init_cfg=dict("
                    f"type='Pretrained', checkpoint=<it>) instead")


def _base_weight_key(layer_name: str, module: nn.Module) -> str:
    weight = base_weight(module)
    return next(f'{layer_name}.{n}' for n, p in module.named_parameters(recurse=False) if p is weight)


def _complete_checkpoint(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: dict,
                         *args: Any) -> None:
    """Load pre-hook: check an adapter checkpoint and add the model's frozen base tensors it leaves out; for a plain
    checkpoint, keep the adapter tensors and note the layers whose base weight it replaces (rebuilt after loading)."""
    incoming = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    meta = _saved_metadata(state_dict, local_metadata)
    model_state, _ = _plain_state(module)
    if meta is not None or any(is_adapter_key(k) for k in incoming):
        check_adapter_checkpoint(module, meta, incoming)
        fill = [k for k in model_state if k not in incoming]
    else:
        replaced = [(n, m) for n, m in iter_adapted(module) if _base_weight_key(n, m) in incoming]
        merged = [n for n, m in replaced if not _active_base(m)]
        if merged:
            raise ValueError(f'the checkpoint replaces the weight of layer {merged[0]!r}, into which an adapter is '
                             f'merged; call visadapt.unmerge(model) before loading base weights')
        _model_state(module).rebuild = [n for n, _ in replaced]
        fill = [k for k in model_state if is_adapter_key(k)]
    for key in fill:
        state_dict[prefix + key] = model_state[key]


def _rebuild_after_plain_load(module: nn.Module, incompatible_keys: Any) -> None:
    """Load post-hook: rebuild the adapters of the layers a plain checkpoint gave new base weights."""
    state = _model_state(module)
    layers, state.rebuild = state.rebuild, []
    if layers:
        rebuild_adapters(module, layers)


@torch.no_grad()
def rebuild_adapters(model: nn.Module, layers: Sequence[str]) -> None:
    """Rebuild every adapter of ``layers`` from the layer's current base weight (what ``inject`` would build now:
    SVFT's singular vectors, DoRA's magnitudes, ...), keeping its parameter objects (the optimizer and DDP hold
    them) with the new values; in distributed runs rank 0's values are broadcast, so every rank holds the same."""
    model = _unwrap(model)
    wanted = set(layers)
    for layer_name, module in iter_adapted(model):
        if layer_name not in wanted:
            continue
        adapters = getattr(module, ADAPTER_ATTR)
        for name in list(adapters.keys()):
            old = adapters[name]
            fresh = build_adapter(get_injection(model, name).config, layer_name, module).train(old.training)
            for param_name, param in old.named_parameters():
                owner, _, leaf = param_name.rpartition('.')
                holder = fresh.get_submodule(owner)
                param.copy_(getattr(holder, leaf))
                setattr(holder, leaf, param)
            adapters[name] = fresh
            for tensor in [*fresh.parameters(), *fresh.buffers()]:
                broadcast(tensor)


# ---- adapter statistics ----------------------------------------------------------------------------------------------
def stage_of(layer_name: str) -> str:
    """Group an adapted layer into a stage: its name up to the first numeric component, else its parent.

    ``backbone.model.stages.2.blocks.5.conv_dw`` → ``backbone.model.stages.2``;
    ``backbone.model.blocks.3.1.conv_pw`` → ``backbone.model.blocks.3``; ``backbone.model.conv_stem`` →
    ``backbone.model``.
    """
    parts = layer_name.split('.')
    for i, part in enumerate(parts):
        if part.isdigit():
            return '.'.join(parts[:i + 1])
    return '.'.join(parts[:-1]) or layer_name


@torch.no_grad()
def delta_weight_norms(model: nn.Module, name: Optional[str] = None) -> Dict[str, float]:
    """Mean ‖ΔW‖_F over the adapted layers of each stage (:func:`stage_of`), ΔW = adapted W − W.

    Adapters without a weight form (MPC_n, bypass-only methods) and merged/disabled ones are skipped. Returns an
    ordered dict ``stage → mean norm`` (empty when no adapter has a weight form).
    """
    sums: Dict[str, List[float]] = OrderedDict()
    for layer_name, module in iter_adapted(_unwrap(model)):
        for n, adapter in module.visadapt.items():
            if (name is not None and n != name) or not module.is_active(n) or not adapter.has_weight_path:
                continue
            dw = module.delta_weight(n, torch.float32)
            sums.setdefault(stage_of(layer_name), []).append(float(torch.linalg.vector_norm(dw)))
    return OrderedDict((k, sum(v) / len(v)) for k, v in sums.items())


def trainable_by_stage(model: nn.Module) -> Dict[str, int]:
    """Trainable parameter count per top-level module and per adapted stage (adapter tensors)."""
    model = _unwrap(model)
    out: Dict[str, int] = OrderedDict()
    for layer_name, module in iter_adapted(model):
        n = sum(p.numel() for p in module.visadapt.parameters() if p.requires_grad)
        if n:
            key = stage_of(layer_name)
            out[key] = out.get(key, 0) + n
    for child_name, child in model.named_children():
        n = sum(p.numel() for pn, p in child.named_parameters()
                if p.requires_grad and not is_adapter_key(pn))
        if n:
            out[child_name] = out.get(child_name, 0) + n
    return out


@HOOKS.register_module()
class AdapterStatsHook(Hook):
    """Log adapter statistics: trainable counts once, mean ‖ΔW‖_F per stage every ``interval`` iterations.

    The norms go to the text log (one line) and to the visualizer as scalars ``visadapt/dW/<stage>`` (written to
    ``vis_data/scalars.json`` and TensorBoard/W&B when configured).

    Args:
        interval: iterations between two ‖ΔW‖ logs; 0 logs only at the end of training.
    """
    priority = 'NORMAL'

    def __init__(self, interval: int = 50):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
            raise ValueError(f'AdapterStatsHook interval must be an integer >= 0, got {interval!r}')
        self.interval = interval

    def before_train(self, runner) -> None:
        model = _unwrap(runner.model)
        if not adapter_names(model):
            return
        trainable, total = count_parameters(model)
        per = trainable_by_stage(model)
        runner.logger.info(f'visadapt: trainable {trainable:,} / {total:,} parameters '
                           f'({100.0 * trainable / max(total, 1):.3f}%); by part: '
                           + ', '.join(f'{k} {v:,}' for k, v in per.items()))
        runner.message_hub.update_info('visadapt_trainable', trainable)

    def _log_norms(self, runner, step: int) -> None:
        norms = delta_weight_norms(runner.model)
        if not norms:
            return
        runner.logger.info(f'visadapt: iter {step} mean ||dW||_F per stage: '
                           + ', '.join(f'{k} {v:.4g}' for k, v in norms.items()))
        runner.visualizer.add_scalars({f'visadapt/dW/{k}': v for k, v in norms.items()}, step=step)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.interval and self.every_n_train_iters(runner, self.interval):
            self._log_norms(runner, runner.iter + 1)

    def after_train(self, runner) -> None:
        if adapter_names(_unwrap(runner.model)) and not (self.interval and runner.iter % self.interval == 0):
            self._log_norms(runner, runner.iter)


# ---- the installed stack: checkpoints under torch >= 2.6, CPU DDP under torchrun ---------------------------------------
def _mmengine_globals() -> list:
    import numpy as np
    from mmengine.logging import HistoryBuffer
    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    # HistoryBuffer pickles its statistics methods as getattr(buffer, 'mean') and its history as numpy arrays, whose
    # dtypes unpickle through their classes (numpy.dtypes.Float64DType, ...)
    dtypes = [type(np.dtype(t)) for t in ('float64', 'float32', 'float16', 'int64', 'int32', 'uint8', 'bool')]
    return [HistoryBuffer, getattr, np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar, *dtypes]


#: the classes an mmengine training checkpoint pickles besides tensors (its message hub's HistoryBuffers and numpy)
MMENGINE_GLOBALS = _mmengine_globals()


def _load_local_checkpoint(filename: str, map_location: Any = None) -> Any:
    """mmengine's local checkpoint loader, with torch's weights-only unpickler allowing :data:`MMENGINE_GLOBALS`."""
    with torch.serialization.safe_globals(MMENGINE_GLOBALS):
        return load_from_local(filename, map_location)


CheckpointLoader.register_scheme(prefixes='', loader=_load_local_checkpoint, force=True)


def init_cpu_process_group() -> bool:
    """Initialize the gloo process group for a ``torchrun`` worker on a machine without CUDA; returns whether it did.

    mmengine's ``pytorch`` launcher calls ``torch.cuda.set_device`` before ``init_process_group``, which fails without
    a GPU; with the group initialized here (on import, through ``custom_imports``), mmengine's runners and strategies
    skip their own set-up. Does nothing with CUDA, outside ``torchrun`` (no ``RANK``/``MASTER_ADDR``/``MASTER_PORT``
    or ``WORLD_SIZE`` < 2) or when a group exists.
    """
    env = os.environ
    if (torch.cuda.is_available() or not torch.distributed.is_available() or torch.distributed.is_initialized()
            or int(env.get('WORLD_SIZE', '1')) < 2 or not {'RANK', 'MASTER_ADDR', 'MASTER_PORT'} <= set(env)):
        return False
    torch.distributed.init_process_group(backend='gloo')
    print_log(f'visadapt: no CUDA device; initialized the gloo process group for mmengine (rank {env["RANK"]} of '
              f'{env["WORLD_SIZE"]})', logger='current')
    return True


init_cpu_process_group()


# ---- never silent: a top-level adapter no runner or API would read ---------------------------------------------------
def refuse_top_level_adapter(cfg_dict: Mapping[str, Any]) -> None:
    """Raise ValueError when a config names an adapter outside ``cfg.model``.

    mmengine's runners and the toolboxes' inference APIs build ``cfg.model`` only: a top-level ``adapter=...`` (this
    integration's earlier form) would be ignored and the whole model trained or evaluated without it.
    """
    if 'adapter' in cfg_dict:
        model_type = (cfg_dict.get('model') or {}).get('type', '<the model type>')
        raise ValueError(f"this config sets a top-level adapter={dict(cfg_dict['adapter'])!r}, which mmengine's "
                         f"runners and the inference APIs never read (the model would run without it); move it into "
                         f"the model: model = dict(type='{ADAPTED_MODEL}', model_type={model_type!r}, adapter=dict(...)) "
                         f"(and drop a runner_type='VisadaptRunner')")


def _checking_config_init(init: Any) -> Any:
    """mmengine's ``Config.__init__`` followed by :func:`refuse_top_level_adapter` (every config is built by it after
    its ``custom_imports`` were imported, so configs that import this module are all checked)."""
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        refuse_top_level_adapter(self._cfg_dict)
    wrapped.__wrapped__ = init
    wrapped.__visadapt_checks_adapter__ = True
    return wrapped


if not getattr(Config.__init__, '__visadapt_checks_adapter__', False):
    Config.__init__ = _checking_config_init(Config.__init__)
