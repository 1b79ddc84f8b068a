"""OpenMMLab integration (mmengine, mmdet, mmseg): ``adapter=dict(type='FLoRA', ...)`` in a config, a timm backbone.

Add three keys to any mmdet or mmseg config::

    custom_imports = dict(imports=['visadapt.integrations.openmmlab'], allow_failed_imports=False)
    runner_type = 'VisadaptRunner'
    adapter = dict(type='FLoRA', r=16, r3=2, scale=4.0)     # any visadapt method: LoRA, DoRA, BitFit, SVFT, ...

and train with mmdet's / mmseg's own ``tools/train.py`` (or visadapt's ``visadapt-mm-train``). What this module adds:

* :class:`TimmBackbone` (registered in mmdet's and mmseg's ``MODELS``): any timm model with
  ``forward_intermediates`` (ConvNeXt(-V2), EfficientNet, MobileNet, ResNet, ...) as a multi-scale backbone.
  ``pretrained`` is a local file or ``'packaged'`` (weights shipped in a pip package, see
  :data:`visadapt.integrations.timm_models.PACKAGED_WEIGHTS`); a hub is never contacted. Parameter names are timm's own
  (``backbone.model.stages.0.blocks.0.conv_dw.weight``), so timm checkpoints load by name.
* :class:`VisadaptRunner` (registered in mmengine's ``RUNNERS``): builds the model, loads its pretrained weights
  (``init_weights``: ``init_cfg`` / ``pretrained``) and a non-adapter ``load_from`` checkpoint, *then* injects the
  adapter (methods such as SVFT derive their buffers from the pretrained W), all before the optimizer is built and
  before ``MMDistributedDataParallel`` wraps the model (so DDP sees only the trainable parameters). Base parameter
  names never change. It also makes CPU (gloo) DDP work with mmengine's ``pytorch`` launcher.
* Hooks, added by the runner unless already listed in ``custom_hooks`` (list one there to change its arguments):

  - :class:`AdapterCheckpointHook`: checkpoints hold only the adapter tensors and the fully trained modules
    (neck/heads), plus the adapter config under ``meta['visadapt']``; loading or resuming such a checkpoint fills in
    the frozen base weights from the model (which already holds the pretrained ones) after checking every key;
  - :class:`AdapterStatsHook`: logs the trainable parameter count (total and per stage) once, and the mean
    Frobenius norm ‖ΔW‖_F per backbone stage every ``interval`` iterations (text log and visualizer scalars);
  - :class:`MPCRegularizerHook`: when the adapter config sets ``mpc='o'``/``'d'``, adds
    :func:`visadapt.regularization_loss` to the model's loss dict as ``loss_mpc`` (logged, and correct under DDP and
    AMP, unlike a gradient hook).

Defaults when the ``adapter`` dict leaves them out: ``include=['backbone.*']`` (adapt the backbone only) and
``train_modules`` = every top-level module with parameters except the backbone (FPN neck, RPN/RoI heads, decode and
auxiliary heads), which are trained fully and saved with the adapter. ``FullFinetune`` trains everything and saves
everything; ``HeadOnly`` freezes the backbone without adapting it.
"""
from __future__ import annotations

import codecs
import importlib
import importlib.util
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

try:
    from mmengine.dist import broadcast, is_distributed
    from mmengine.hooks import Hook
    from mmengine.model import BaseModule, MMDistributedDataParallel, initialize, is_model_wrapper
    from mmengine.registry import HOOKS, RUNNERS
    from mmengine.runner import Runner
    from mmengine.runner.checkpoint import _load_checkpoint, _load_checkpoint_to_model
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    raise ImportError('visadapt.integrations.openmmlab needs mmengine (and mmdet and/or mmsegmentation): pip install "visadapt[mm]" '
                      'then bash tools/build_mmcv.sh for mmcv with compiled ops') from _err

from .._version import __version__
from ..core import (
    AdapterConfig,
    adapter_metadata,
    adapter_names,
    adapter_state_keys,
    check_adapter_metadata,
    check_spec_fields,
    check_state_dict,
    count_parameters,
    inject,
    is_adapter_key,
    iter_adapted,
    parse_adapter_spec,
)

__all__ = ['TimmBackbone', 'VisadaptRunner', 'AdapterCheckpointHook', 'AdapterStatsHook', 'MPCRegularizerHook',
           'resolve_adapter_config', 'adapter_checkpoint_keys', 'stage_of', 'delta_weight_norms',
           'CHECKPOINT_META_KEY']

#: key under ``checkpoint['meta']`` that marks an adapter checkpoint and holds its config
CHECKPOINT_META_KEY = 'visadapt'


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
        init_cfg: mmengine init config (rarely needed: ``pretrained`` loads the weights at construction).
        **model_kwargs: passed to ``timm.create_model`` (``drop_path_rate``, ``in_chans``, ...).

    Attributes:
        out_channels: channels of each returned feature map, e.g. ``[192, 384, 768, 1536]`` for convnextv2_large.
        strides: their reductions w.r.t. the input, e.g. ``[4, 8, 16, 32]``.

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


def _check_adapter_spec(spec: Any) -> Optional[Dict[str, Any]]:
    """Early check of the config's ``adapter`` entry (method name and field names), before the model is built."""
    if spec is None:
        return None
    if isinstance(spec, AdapterConfig):
        return spec.to_dict()
    if not isinstance(spec, Mapping):
        raise TypeError(f"adapter must be a dict such as dict(type='FLoRA', r=8), got {type(spec).__name__}")
    check_spec_fields(spec)
    return dict(spec)


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


# ---- checkpoints -----------------------------------------------------------------------------------------------------
def adapter_checkpoint_keys(model: nn.Module) -> List[str]:
    """Keys of ``model.state_dict()`` an adapter checkpoint keeps (:func:`visadapt.core.adapter_state_keys`)."""
    return adapter_state_keys(_unwrap(model))


def _checkpoint_meta(model: nn.Module) -> Dict[str, Any]:
    model = _unwrap(model)
    trainable, total = count_parameters(model)
    return {'visadapt_version': __version__, 'trainable': trainable, 'total': total,
            'adapters': {n: adapter_metadata(model, n) for n in adapter_names(model)}}


def _safe_globals() -> list:
    """Classes an mmengine checkpoint pickles besides tensors (message hub buffers, numpy arrays).

    torch >= 2.6 loads with ``weights_only=True`` by default and refuses them; mmengine 0.10 calls ``torch.load``
    without arguments, so the runner allows exactly these, only while it loads a checkpoint.
    """
    import numpy as np
    from mmengine.logging import HistoryBuffer
    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    # HistoryBuffer pickles its statistics methods as getattr(buffer, 'mean'); numpy scalars need codecs.encode
    safe: list = [HistoryBuffer, np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar, getattr,
                  codecs.encode]
    safe += [type(np.dtype(t)) for t in ('float64', 'float32', 'float16', 'int64', 'int32', 'uint8', 'bool')]
    return safe


# ---- hooks -----------------------------------------------------------------------------------------------------------
@HOOKS.register_module()
class AdapterCheckpointHook(Hook):
    """Slim checkpoints to the adapter + train modules, and complete them again when they are loaded.

    ``before_save_checkpoint``: keeps only :func:`adapter_checkpoint_keys` in ``checkpoint['state_dict']`` and
    stores the adapter configs, layers, train modules and per-layer metadata in ``checkpoint['meta']['visadapt']``
    (optimizer and scheduler states are kept: they already cover only the trainable parameters).

    ``after_load_checkpoint`` (``load_from``, ``resume``, ``tools/test.py``): for a checkpoint with that meta entry,
    checks that the model holds the same adapters (method, config, layers) and that every adapter/train key is
    present with the model's shape, then adds the model's own (pretrained, frozen) base tensors for the keys the
    checkpoint left out, so mmengine loads a complete state dict. Raises ValueError on any mismatch.

    Args:
        full_state: keep the whole state dict in saved checkpoints (the meta entry is still added).
    """
    priority = 'NORMAL'

    def __init__(self, full_state: bool = False):
        if not isinstance(full_state, bool):
            raise TypeError(f'full_state must be a bool, got {full_state!r}')
        self.full_state = full_state

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        model = _unwrap(runner.model)
        if not adapter_names(model):
            return
        checkpoint.setdefault('meta', {})[CHECKPOINT_META_KEY] = _checkpoint_meta(model)
        if self.full_state:
            return
        keep = set(adapter_checkpoint_keys(model))
        state = checkpoint['state_dict']
        checkpoint['state_dict'] = OrderedDict((k, v) for k, v in state.items() if k in keep)

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        meta = (checkpoint.get('meta') or {}).get(CHECKPOINT_META_KEY)
        if meta is None:
            return
        model = _unwrap(runner.model)
        complete_adapter_checkpoint(model, checkpoint, meta)


def complete_adapter_checkpoint(model: nn.Module, checkpoint: dict, meta: Mapping[str, Any]) -> None:
    """Check an adapter checkpoint against ``model`` and add the model's base tensors it leaves out (in place)."""
    saved = meta.get('adapters', {})
    present = adapter_names(model)
    if sorted(saved) != sorted(present):
        raise ValueError(f'the checkpoint holds adapter(s) {sorted(saved)} but the model has {sorted(present)}; set '
                         f'the config\'s adapter=dict(...) to the one the checkpoint was trained with')
    for n, entry in saved.items():
        check_adapter_metadata(model, n, entry, 'the adapter checkpoint')
    state = checkpoint.get('state_dict', checkpoint)
    for key in [k for k in state if k.startswith('module.')]:
        state[key[len('module.'):]] = state.pop(key)
    model_state = model.state_dict()
    needed = adapter_checkpoint_keys(model)
    check_state_dict(model_state, state, 'the adapter checkpoint',
                     optional=[k for k in model_state if k not in set(needed)])
    for key, value in model_state.items():
        if key not in state:
            state[key] = value


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


@HOOKS.register_module()
class MPCRegularizerHook(Hook):
    """Add the MPC regularizer (:func:`visadapt.regularization_loss`) to the model's losses as ``loss_mpc``.

    A forward hook on the (unwrapped) model appends the term to the loss dict returned in ``mode='loss'`` while
    training, so mmengine's ``parse_losses`` sums it into the loss and logs it, and one backward through DDP and
    AMP gives the gradient of task loss + Σ λ·R(A, B). Does nothing when no adapter sets ``mpc='o'``/``'d'``.
    """
    priority = 'NORMAL'

    def __init__(self):
        self._handle = None

    def before_train(self, runner) -> None:
        from ..core import regularization_loss
        model = _unwrap(runner.model)
        wants = any(getattr(a.config, 'mpc', None) in ('o', 'd')
                    for _, m in iter_adapted(model) for a in m.visadapt.values())
        if not wants or self._handle is not None:
            return

        def add_loss(module, args, kwargs, output):
            if module.training and kwargs.get('mode') == 'loss' and isinstance(output, dict):
                output['loss_mpc'] = regularization_loss(module)
            return output

        self._handle = model.register_forward_hook(add_loss, with_kwargs=True)
        runner.logger.info('visadapt: MPC regularizer added to the losses as loss_mpc')

    def after_train(self, runner) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


_RUNNER_HOOKS = (AdapterCheckpointHook, AdapterStatsHook, MPCRegularizerHook)


# ---- the runner ------------------------------------------------------------------------------------------------------
@RUNNERS.register_module()
class VisadaptRunner(Runner):
    """mmengine ``Runner`` that injects the config's ``adapter`` between weight loading and optimizer/DDP set-up.

    Order inside ``__init__`` → ``build_model``: build → ``init_weights()`` (pretrained backbone) → ``load_from``
    when it is a plain (non-adapter) checkpoint and not a resume → ``visadapt.inject`` → (then mmengine) wrap with
    DDP → register hooks (+ the visadapt hooks). ``train()`` then builds the optimizer over the trainable
    parameters only, skips the second ``init_weights`` (it would be a no-op anyway) and loads/resumes adapter
    checkpoints through :class:`AdapterCheckpointHook`. Without an ``adapter`` key it behaves like ``Runner``.

    Args:
        adapter: ``dict(type=<method>, **fields)`` (also read from ``cfg['adapter']``), see
            :func:`resolve_adapter_config`.
        adapter_name: the adapter's name in the model (default ``'default'``; also ``cfg['adapter_name']``).
        *args, **kwargs: ``mmengine.runner.Runner`` arguments.
    """

    def __init__(self, *args: Any, adapter: Optional[Mapping[str, Any]] = None, adapter_name: Optional[str] = None,
                 **kwargs: Any):
        cfg = kwargs.get('cfg') or {}
        if adapter is None:
            adapter = cfg.get('adapter')
        self._va_spec = _check_adapter_spec(adapter)
        self._va_name = adapter_name or cfg.get('adapter_name') or 'default'
        self._va_initialized = False
        self._va_report = None
        super().__init__(*args, **kwargs)

    # -- environment: CPU DDP with the pytorch launcher --
    def setup_env(self, env_cfg: Dict) -> None:
        if self.distributed and not is_distributed() and not torch.cuda.is_available() \
                and self.launcher == 'pytorch':
            # mmengine's pytorch launcher calls torch.cuda.set_device, which fails on a machine without GPUs
            dist_cfg = dict((env_cfg or {}).get('dist_cfg') or {})
            backend = dist_cfg.pop('backend', 'gloo')
            if backend != 'gloo':
                raise ValueError(f"distributed training without a GPU needs env_cfg.dist_cfg.backend='gloo', "
                                 f'got {backend!r}')
            timeout = dist_cfg.pop('timeout', None)
            kwargs = {'timeout': __import__('datetime').timedelta(seconds=timeout)} if timeout else {}
            torch.distributed.init_process_group(backend='gloo', **kwargs)
        super().setup_env(env_cfg)

    # -- model: pretrained weights, then the adapter --
    def build_model(self, model: Union[nn.Module, Dict]) -> nn.Module:
        model = super().build_model(model)
        if self._va_spec is None:
            return model
        if hasattr(model, 'init_weights'):
            model.init_weights()  # pretrained weights (init_cfg) before the adapter sees W
            self._va_initialized = True
        if self._load_from is not None and not self._resume:
            checkpoint = self._read_checkpoint(self._load_from)
            if CHECKPOINT_META_KEY not in (checkpoint.get('meta') or {}):
                _load_checkpoint_to_model(model, checkpoint, strict=False)
                self.logger.info(f'visadapt: loaded base weights from {self._load_from} before injecting the adapter')
                self._load_from = None  # consumed; an adapter checkpoint is loaded after injection instead
        config = resolve_adapter_config(model, self._va_spec)
        self._va_report = inject(model, config, name=self._va_name)
        self.logger.info(str(self._va_report))
        return model

    def wrap_model(self, model_wrapper_cfg: Optional[Dict], model: nn.Module) -> nn.Module:
        if self.distributed and not torch.cuda.is_available() and not is_model_wrapper(model):
            # CPU DDP: mmengine passes device_ids=[LOCAL_RANK], which DDP refuses for CPU modules
            wrapper_cfg = dict(model_wrapper_cfg or {})
            wrapper_type = wrapper_cfg.pop('type', 'MMDistributedDataParallel')
            if wrapper_type != 'MMDistributedDataParallel':
                return super().wrap_model(model_wrapper_cfg, model)
            wrapper_cfg.setdefault('broadcast_buffers', False)
            wrapper_cfg.setdefault('find_unused_parameters', self.cfg.get('find_unused_parameters', False))
            return MMDistributedDataParallel(module=model, **wrapper_cfg)
        return super().wrap_model(model_wrapper_cfg, model)

    def _init_model_weights(self) -> None:
        if not self._va_initialized:
            return super()._init_model_weights()
        for value in _unwrap(self.model).state_dict().values():  # what mmengine does after init_weights
            broadcast(value)

    def register_hooks(self, default_hooks=None, custom_hooks=None) -> None:
        super().register_hooks(default_hooks, custom_hooks)
        if self._va_spec is None:
            return
        for hook_cls in _RUNNER_HOOKS:
            if not any(isinstance(h, hook_cls) for h in self._hooks):
                self.register_hook(hook_cls())

    # -- checkpoints: torch>=2.6 weights_only loading of mmengine checkpoints --
    def _read_checkpoint(self, filename: str, map_location: Any = 'cpu') -> dict:
        with torch.serialization.safe_globals(_safe_globals()):
            return _load_checkpoint(filename, map_location=map_location)

    def load_checkpoint(self, filename: str, map_location: Any = 'cpu', strict: bool = False,
                        revise_keys: list = [(r'^module.', '')]):  # noqa: B006 - mmengine's signature
        with torch.serialization.safe_globals(_safe_globals()):
            return super().load_checkpoint(filename, map_location=map_location, strict=strict,
                                           revise_keys=revise_keys)

    @property
    def adapter_report(self):
        """The :class:`visadapt.InjectReport` of the injected adapter (None without an adapter)."""
        return self._va_report
