"""open_clip integration: build two-tower models offline, pick the SeRA paper's adapter targets, embed and evaluate.

::

    import visadapt, visadapt.integrations.open_clip_models as vclip
    bundle = vclip.create_clip(config_path='clip_configs/EffNetLite0-MiniLM-L6.json', pretrained_image='packaged')
    for name, config in vclip.retrieval_configs(bundle.model, {'method': 'SeRA', 'r': 8}).items():
        visadapt.inject(bundle.model, config, name=name)

Models: any open_clip architecture by name (``'ViT-B-32'``) or a custom config JSON (registered with
``open_clip.add_model_config``), e.g. a timm image tower with a Hugging Face text tower. Nothing is downloaded:
``pretrained`` must be a local file, timm towers start random or from ``pretrained_image`` (a local file or
``'packaged'``, the ImageNet weights shipped in pip packages, see :data:`visadapt.integrations.timm_models.PACKAGED_WEIGHTS`), and a
Hugging Face text tower loads from ``hf_model_name``, which should be a local directory (environment variables in it
are expanded: ``"hf_model_name": "$MINILM_DIR"``). Set ``HF_HUB_OFFLINE=1`` before importing transformers so that a
hub name fails instead of downloading.

Targets (:func:`retrieval_configs`), as in the SeRA paper's retrieval experiments (section 4.2: "all methods
fine-tuned only the query and value layers", on both towers):

* attention query/value projections in every tower: separate Linears named ``query``/``value`` (BERT-style Hugging
  Face text towers) or ``q_proj``/``v_proj`` are targeted directly; fused ones (``nn.MultiheadAttention`` in
  open_clip's own transformers, timm's ``attn.qkv``) through the q and v slices of the fused weight, for methods
  that support slice targeting;
* conv towers (timm CNNs, ResNets: a tower with more than one conv; a ViT's single patch-embedding conv does not
  count): every plain conv, with a second adapter (FLoRA by default, the method made for conv kernels).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..core import AdapterConfig, AdapterSpec, is_plain_layer, parse_adapter_spec

try:
    import open_clip as _open_clip
    _has_open_clip = True
except ImportError:  # pragma: no cover - exercised only without the extra
    _open_clip = None
    _has_open_clip = False

__all__ = ['has_open_clip', 'ClipBundle', 'load_model_config', 'create_clip', 'towers', 'attention_layers',
           'conv_tower_layers', 'retrieval_configs', 'freeze_norm_stats', 'QV_NAMES']

PathLike = Union[str, os.PathLike]

#: names of separate query / value projections (Hugging Face BERT/RoBERTa: ``query``/``value``; CLIP-HF, OPT,
#: LLaMA and open_clip's attention pools: ``q_proj``/``v_proj``)
QV_NAMES = (('query', 'value'), ('q_proj', 'v_proj'))


def has_open_clip(necessary: bool = False) -> bool:
    """True if open_clip is importable; with ``necessary=True`` raise ImportError with the install command instead."""
    if not _has_open_clip and necessary:
        raise ImportError("visadapt.integrations.open_clip_models needs open_clip; install it with: pip install 'visadapt[clip]'")
    return _has_open_clip


# ---- building models ---------------------------------------------------------------------------------------------
@dataclass
class ClipBundle:
    """What :func:`create_clip` returns.

    Attributes:
        model: the open_clip model (``encode_image`` / ``encode_text``).
        tokenizer: callable list[str] → Tensor[N, context_length].
        preprocess_train, preprocess_val: PIL image → Tensor[3, H, W] transforms.
        name: the model's open_clip name.
        model_cfg: the resolved model config (environment variables expanded).
        mean, std: the image normalization the transforms use.
    """
    model: nn.Module
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    preprocess_train: Callable
    preprocess_val: Callable
    name: str
    model_cfg: Dict[str, Any]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


def _expand(value: Any, what: str) -> Any:
    if not isinstance(value, str) or '$' not in value:
        return value
    expanded = os.path.expandvars(value)
    if '$' in expanded:
        raise ValueError(f'{what}={value!r} uses an environment variable that is not set (expanded: {expanded!r})')
    return expanded


def load_model_config(path: PathLike) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """Read an open_clip model config JSON: a bare model config or ``{"model_cfg": ..., "preprocess_cfg": ...}``.

    Returns:
        (name, model_cfg, preprocess_cfg): the name is the file's stem (open_clip's convention); environment
        variables in the text tower's ``hf_model_name`` / ``hf_tokenizer_name`` are expanded.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'model config {path!r} not found')
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f'model config {path!r} is not valid JSON: {err}') from None
    model_cfg = data.get('model_cfg', data) if isinstance(data, dict) else None
    if not isinstance(model_cfg, dict) or not all(k in model_cfg for k in ('embed_dim', 'vision_cfg', 'text_cfg')):
        raise ValueError(f'model config {path!r} needs embed_dim, vision_cfg and text_cfg (open_clip\'s format, '
                         f'optionally inside "model_cfg"); got keys {sorted(model_cfg or data)}')
    model_cfg = copy.deepcopy(model_cfg)
    for key in ('hf_model_name', 'hf_tokenizer_name'):
        if key in model_cfg['text_cfg']:
            model_cfg['text_cfg'][key] = _expand(model_cfg['text_cfg'][key], f'text_cfg.{key}')
    preprocess_cfg = dict(data.get('preprocess_cfg', {})) if 'model_cfg' in data else {}
    return os.path.splitext(os.path.basename(path))[0], model_cfg, preprocess_cfg


def _register_config(name: str, model_cfg: Dict[str, Any]) -> None:
    """Make ``name`` known to open_clip (add_model_config reads files, so write the resolved config to one)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f'{name}.json')
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(model_cfg, f)
        _open_clip.add_model_config(path)


def _replace_timm_trunk(model: nn.Module, vision_cfg: Dict[str, Any], source: Union[str, os.PathLike]) -> Dict:
    """Swap the timm image trunk for one with pretrained weights (``'packaged'`` or a local timm checkpoint), on the
    old trunk's device and in its dtype (open_clip's ``precision`` has already been applied to the model)."""
    from . import timm_models as vtimm
    trunk = model.visual.trunk
    arch = vision_cfg['timm_model_name']
    pool = vision_cfg.get('timm_pool', 'avg')
    # checks every key and shape, never touches a hub
    new = vtimm.create_model(arch, pretrained=source, drop_path_rate=vision_cfg.get('timm_drop_path'))
    new.reset_classifier(trunk.num_classes, **({'global_pool': '' if pool in ('abs_attn', 'rot_attn') else pool}
                                               if pool else {}))
    old_state, new_state = trunk.state_dict(), new.state_dict()
    bad = [k for k in old_state if k not in new_state or new_state[k].shape != old_state[k].shape]
    if bad or len(old_state) != len(new_state):
        raise ValueError(f'the pretrained {arch} trunk does not match the tower built from the config '
                         f'(first differing key: {(bad or sorted(set(new_state) ^ set(old_state)))[0]!r})')
    if trunk.num_classes:  # the classifier is the CLIP projection here: keep its fresh init from the config build
        new.get_classifier().load_state_dict(trunk.get_classifier().state_dict())
    first = next(trunk.parameters())
    model.visual.trunk = new.to(device=first.device, dtype=first.dtype)
    return dict(new.pretrained_cfg)


def _model_config(model_name: Optional[str], config_path: Optional[PathLike]
                  ) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
    """(name, model_cfg, preprocess_cfg) of an open_clip architecture or a config file (registered with open_clip)."""
    if (model_name is None) == (config_path is None):
        raise ValueError(f'pass exactly one of model_name and config_path; got model_name={model_name!r}, '
                         f'config_path={config_path!r}')
    if config_path is not None:
        name, model_cfg, preprocess_cfg = load_model_config(config_path)
        _register_config(name, model_cfg)
        return name, model_cfg, preprocess_cfg
    model_cfg = _open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(f'unknown open_clip model {model_name!r}; known: {", ".join(_open_clip.list_models()[:8])}, '
                         f'... ({len(_open_clip.list_models())} in all), or pass config_path')
    return model_name, model_cfg, {}


def create_clip(model_name: Optional[str] = None, *, config_path: Optional[PathLike] = None,
                pretrained: Optional[PathLike] = None, pretrained_image: Optional[Union[str, os.PathLike]] = None,
                device: Union[str, torch.device] = 'cpu', precision: str = 'fp32',
                image_mean: Optional[Sequence[float]] = None, image_std: Optional[Sequence[float]] = None,
                image_interpolation: Optional[str] = None, image_resize_mode: Optional[str] = None,
                aug_cfg: Optional[Dict[str, Any]] = None, context_length: Optional[int] = None,
                **open_clip_kwargs: Any) -> ClipBundle:
    """Build an open_clip model, its tokenizer and transforms, offline (``open_clip.create_model_and_transforms``'s
    arguments, plus a config file and timm tower weights that never come from a hub).

    Args:
        model_name: an open_clip architecture (``'ViT-B-32'``, ``'RN50'``); or None with ``config_path``.
        config_path: a model config JSON (see :func:`load_model_config`); registered under its file stem.
        pretrained: a local CLIP checkpoint file for the whole model (open_clip's ``pretrained``, but never a tag:
            tags download).
        pretrained_image: weights for a timm image tower: ``'packaged'`` or a local timm checkpoint file; applied
            after ``pretrained`` (it replaces the image trunk). The image normalization then follows those weights
            (e.g. mean = std = 0.5 for EfficientNet-Lite0) unless the config's ``preprocess_cfg`` or ``image_mean`` /
            ``image_std`` set it.
        device, precision: open_clip's (``precision`` in ``'fp32'``, ``'bf16'``, ``'fp16'``, ``'pure_bf16'``, ...:
            the dtype the weights are kept in; autocast is the trainer's business).
        image_mean, image_std, image_interpolation, image_resize_mode, aug_cfg: open_clip's preprocessing overrides
            and training augmentation (``AugmentationCfg`` fields).
        context_length: the tokenizer's context length (default: the model's).
        **open_clip_kwargs: passed on to ``open_clip.create_model`` (``force_image_size``, ``force_quick_gelu``,
            ``force_patch_dropout``, ``force_context_length``, ``output_dict``, model constructor arguments).
    """
    has_open_clip(necessary=True)
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_kwargs
    if pretrained is not None and not os.path.isfile(os.fspath(pretrained)):
        raise FileNotFoundError(f'pretrained={os.fspath(pretrained)!r} is not a file; pass a local CLIP checkpoint '
                                f'(pretrained tags would download from a hub, which visadapt never does)')
    name, model_cfg, preprocess_cfg = _model_config(model_name, config_path)
    vision_cfg = model_cfg['vision_cfg']
    if pretrained_image is not None and 'timm_model_name' not in vision_cfg:
        raise ValueError(f'pretrained_image is for timm image towers, but {name!r} has no vision_cfg.timm_model_name')
    # priority: the user's overrides > the config's preprocess_cfg > the timm weights' normalization > open_clip's
    forced = {**merge_preprocess_kwargs({}, **{k: v for k, v in preprocess_cfg.items() if k != 'size'}),
              **merge_preprocess_kwargs({}, mean=image_mean, std=image_std, interpolation=image_interpolation,
                                        resize_mode=image_resize_mode)}
    model = _open_clip.create_model(name, pretrained=None if pretrained is None else os.fspath(pretrained),
                                    pretrained_image=False, device=device, precision=precision,
                                    force_preprocess_cfg=forced, **open_clip_kwargs)
    if pretrained_image is not None:
        timm_cfg = _replace_timm_trunk(model, vision_cfg, pretrained_image)
        weights_norm = {'mean': tuple(timm_cfg['mean']), 'std': tuple(timm_cfg['std'])}
        _open_clip.set_model_preprocess_cfg(model, {**model.visual.preprocess_cfg, **weights_norm, **forced})
    pp = PreprocessCfg(**model.visual.preprocess_cfg)
    preprocess_train = image_transform_v2(pp, is_train=True, aug_cfg=aug_cfg)
    preprocess_val = image_transform_v2(pp, is_train=False)
    tokenizer = _open_clip.get_tokenizer(name, context_length=context_length)
    return ClipBundle(model, tokenizer, preprocess_train, preprocess_val, name, model_cfg, tuple(pp.mean),
                      tuple(pp.std))


# ---- targets ---------------------------------------------------------------------------------------------------------
def towers(model: nn.Module) -> Dict[str, List[str]]:
    """Module-name prefixes of the image and text towers.

    open_clip's ``CLIP`` keeps its text transformer at the top level (``transformer``, ``token_embedding``, ...);
    ``CustomTextCLIP`` has ``text``. Returns ``{'image': ['visual'], 'text': [...]}``.
    """
    children = [n for n, _ in model.named_children()]
    if 'visual' not in children:
        raise ValueError(f'{type(model).__name__} has no image tower "visual"; children: {children}')
    text = ['text'] if 'text' in children else [n for n in children if n != 'visual']
    return {'image': ['visual'], 'text': text}


def _in(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + '.') for p in prefixes)


def attention_layers(model: nn.Module) -> Dict[str, List[str]]:
    """Query/value projections of every tower.

    Returns:
        ``{'separate': [...], 'fused': [...]}``: names of separate q/v Linears, and of fused attention projections
        (``nn.MultiheadAttention`` modules and Linears named ``qkv``) whose q and v are slices of one weight.
    """
    separate, fused = [], []
    for name, module in model.named_modules():
        leaf = name.rsplit('.', 1)[-1]
        if isinstance(module, nn.MultiheadAttention):
            fused.append(name)
        elif isinstance(module, nn.Linear) and is_plain_layer(module):
            if leaf == 'qkv':
                fused.append(name)
            elif any(leaf in pair for pair in QV_NAMES):
                separate.append(name)
    return {'separate': separate, 'fused': fused}


def conv_tower_layers(model: nn.Module) -> List[str]:
    """Plain convs of the conv towers (towers with more than one conv; a ViT's patch embedding alone is skipped)."""
    out = []
    modules = dict(model.named_modules())
    for prefixes in towers(model).values():
        convs = [n for n, m in modules.items() if _in(n, prefixes) and isinstance(m, nn.modules.conv._ConvNd)]
        if len(convs) > 1:
            out += [n for n in convs if is_plain_layer(modules[n])]
    return out


def _as_config(spec: AdapterSpec, train_modules: Sequence[str] = ()) -> AdapterConfig:
    """Layer-free configs (HeadOnly) given by name or dict train the given ``train_modules``."""
    return parse_adapter_spec(spec, lambda cls: {} if cls.adapts_layers else {'train_modules': list(train_modules)})


def _union(a: Sequence[str], b: Sequence[str]) -> List[str]:
    return list(a) + [x for x in b if x not in a]


def _has_field(config: AdapterConfig, field: str) -> bool:
    return any(f.name == field for f in dataclasses.fields(config))


def retrieval_configs(model: nn.Module, adapter: AdapterSpec = 'SeRA', conv_adapter: Optional[AdapterSpec] = 'FLoRA',
                      train_modules: Sequence[str] = ()) -> Dict[str, AdapterConfig]:
    """Adapter configs for the SeRA paper's retrieval setting: ``{adapter name: config}`` to inject in order.

    Args:
        model: an open_clip model.
        adapter: the method for the query/value projections of both towers (a config, a dict or a method name).
            Its target fields (``include``/``target_types``/``slices``) are filled in; a config that sets
            ``include`` itself is used as given.
        conv_adapter: the method for the convs of conv towers (FLoRA by default), or None to leave them frozen.
        train_modules: module-name patterns trained fully and saved with the first adapter (e.g. a fresh
            projection head, ``'visual.head.proj'``).
    Returns:
        ``{'qv': ..., 'conv': ...}`` (either may be absent when the model has no such layers); a layer-free
        ``adapter`` (``'HeadOnly'``: train only ``train_modules``) is returned under ``'head'``.
    Raises:
        ValueError: the model has fused attention but the method cannot target q/v slices, or nothing is adapted.
    """
    config = _as_config(adapter, train_modules)
    configs: Dict[str, AdapterConfig] = {}
    train = list(train_modules)
    layers = attention_layers(model)
    if not config.adapts_layers or config.include is not None:  # layer-free (HeadOnly), or the user chose layers
        key = 'qv' if config.adapts_layers else 'head'
        configs[key] = dataclasses.replace(config, train_modules=_union(config.train_modules, train))
        train = []
    elif layers['separate'] or layers['fused']:
        if layers['fused'] and not _has_field(config, 'slices'):
            raise ValueError(f'{config.method} cannot target the q and v slices of fused attention projections '
                             f'({layers["fused"][0]!r}, ...): it has no "slices" field; use a method with slice '
                             f'targeting (e.g. SeRA, LoRA) or set include yourself')
        fields: Dict[str, Any] = {'include': layers['separate'] + layers['fused'],
                                  'train_modules': _union(config.train_modules, train)}
        if layers['fused']:  # only the fused layers are sliced; separate q/v Linears are adapted whole
            fields['slices'] = {name: ['q', 'v'] for name in layers['fused']}
        configs['qv'] = dataclasses.replace(config, **fields)
        train = []
    convs = conv_tower_layers(model)
    if conv_adapter is not None and convs:
        conv = _as_config(conv_adapter)
        fields = {'train_modules': _union(conv.train_modules, train)}
        if conv.include is None:
            fields['include'] = convs
        configs['conv'] = dataclasses.replace(conv, **fields)
        train = []
    if not configs:
        raise ValueError(f'nothing to adapt in {type(model).__name__}: no query/value projection and no conv tower '
                         f'(or conv_adapter=None); pass a config with include set')
    return configs


def freeze_norm_stats(model: nn.Module, train_modules: Sequence[str] = ()) -> List[Any]:
    """Keep every BatchNorm outside ``train_modules`` in eval mode for good, whatever ``model.train()`` a trainer
    calls (open_clip_train's ``train_one_epoch`` calls it every epoch): frozen towers keep their running statistics,
    so a saved adapter reproduces the tuned model on a fresh copy of the base model.

    A forward pre-hook switches the layer to eval before each call, so the layer's own forward runs unchanged (and
    its state_dict keys stay). open_clip's ``lock_image_tower(freeze_bn_stats=True)`` is not used: it swaps timm's
    ``BatchNormAct2d`` for a plain ``FrozenBatchNorm2d`` and so drops the activation fused into it.

    Returns:
        The hook handles (``handle.remove()`` undoes it), one per BatchNorm.
    """
    def to_eval(module: nn.Module, _inputs: Any) -> None:
        module.training = False

    keep = tuple(train_modules)
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not _in(name, keep):
            module.training = False
            handles.append(module.register_forward_pre_hook(to_eval))
    return handles
