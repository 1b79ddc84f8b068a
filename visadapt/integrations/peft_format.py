"""Hugging Face PEFT interop: read a PEFT adapter directory into a visadapt model and write one from it, exactly.

PEFT's directory is ``adapter_config.json`` (a ``peft.PeftConfig``) and ``adapter_model.safetensors`` with keys
``base_model.model.<layer>.lora_A.weight`` etc. (the model's own module names under PEFT's two wrapper prefixes).

Reading (:func:`load_peft_adapter`) builds visadapt configs and goes through the core (``inject`` and
``load_adapter_state_dict``, so one validator checks every key, shape and value); it is all or nothing. What maps:

* LoRA (``peft_type`` LORA) on nn.Linear / nn.Conv1d/2d/3d → visadapt LoRA (DoRA with ``use_dora``): ``lora_A`` is
  visadapt's ``A`` (PEFT's conv LoRA is the same k×k-down, 1×1-up chain), ``lora_B`` its ``B``, the magnitude
  vector DoRA's ``m``. Ranks come from the tensors (``rank_pattern`` is checked against them), PEFT's scaling
  ``alpha/r`` (``alpha/√r`` with ``use_rslora``, ``alpha_pattern`` per layer) becomes visadapt's ``alpha``; a layer
  whose scaling one ``alpha`` cannot express gets the ratio folded into its ``B`` (listed in the returned notes).
* (IA)³ (IA3): a feed-forward module (``feedforward_modules``: PEFT scales its input) → visadapt SSL (``s``); another
  module (PEFT scales its output, bias included) → visadapt (IA)³ (``l``), which leaves the bias unscaled: on a layer
  with a bias the difference (l − 1)·b is a BitFit ``delta_b`` — a reparametrization, see below.
* VeRA (VERA): PEFT draws the shared ``vera_A``/``vera_B`` from ``projection_prng_key`` with its own generator, and
  visadapt's VeRA regenerates per-shape projections from its seed, so it cannot hold PEFT's. The adapter is exactly
  the LoRA A = diag(λ_d)·vera_A[:, :in], B = diag(λ_b)·vera_B[:out] (needs ``save_projection=True``).
* ``modules_to_save`` → ``train_modules`` (their full state, as PEFT saves it).

Two mappings give the same outputs with other trainable parameters (VeRA → LoRA, (IA)³ on a biased layer → (IA)³ +
BitFit); they need ``reparametrize=True``, otherwise the error says what they would do. Anything else is a
ValueError naming it: other PEFT methods (LoHa, LoKr, BOFT/OFT, prompt methods, ...), options that change the math
(``lora_bias``, ``bias='all'``, ``fan_in_fan_out``, an ``init_lora_weights`` that rewrites the base weights, ...),
and layers PEFT treats differently (grouped, dilated or non-zero-padded convs, nn.MultiheadAttention). Dropout
(``lora_dropout``, ``vera_dropout``) is identity at inference; visadapt's LoRA has none, so it is dropped (noted).

Writing (:func:`save_peft_adapter`) reads each layer's declared factored form (``Adapter.factor_form()``, Tucker
cores folded into the k×k down factor by ``Factors.as_chain()``) and writes a PEFT LoRA (DoRA when the form has a
magnitude) with every scale folded into ``lora_B`` (``lora_alpha = r`` per layer); ``train_modules`` become
``modules_to_save``. A method without an exact low-rank form, or a layer PEFT's LoRA computes differently, is
refused with the reason. Files are written atomically.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..core import (
    ADAPTER_ATTR,
    AdapterConfig,
    Factors,
    adapter_file_key,
    adapter_state_keys,
    atomic_write_files,
    base_bias,
    get_config_class,
    get_injection,
    inject,
    is_adapted,
    is_adapter_key,
    is_plain_layer,
    iter_adapted,
    load_adapter_state_dict,
    read_state_dict,
    remove,
    select_targets,
    select_train_modules,
    site_from_module,
    trained_file_key,
)

__all__ = ['load_peft_adapter', 'save_peft_adapter', 'read_peft_adapter', 'peft_lora_state', 'peft_layer_problem',
           'PeftImport', 'has_peft']

PEFT_PREFIX = 'base_model.model.'      # PeftModel.base_model (the tuner) .model (the user's model)
VERA_PROJECTIONS = ('base_model.vera_A', 'base_model.vera_B')
#: PEFT config fields that only name, locate or select (the weights file decides which layers are adapted)
BOOKKEEPING = {'peft_type', 'task_type', 'inference_mode', 'base_model_name_or_path', 'revision', 'auto_mapping',
               'peft_version', 'target_modules', 'exclude_modules', 'layers_to_transform', 'layers_pattern',
               'modules_to_save'}
#: PEFT config fields each reader maps (all others must be at PEFT's defaults)
#: (init-only fields: init_lora_weights (checked below), eva_config, init_ia3_weights, d_initial, init_weights;
#: save_projection: the projections must be in the file, checked by the VeRA reader)
MAPPED_FIELDS = {'LORA': {'r', 'lora_alpha', 'rank_pattern', 'alpha_pattern', 'use_rslora', 'use_dora', 'lora_dropout',
                          'init_lora_weights', 'eva_config'},
                 'IA3': {'feedforward_modules', 'init_ia3_weights'},
                 'VERA': {'r', 'projection_prng_key', 'save_projection', 'vera_dropout', 'd_initial', 'init_weights'}}
#: init_lora_weights values known to leave the base weights alone when PEFT loads the adapter (pissa, olora, corda and
#: loftq rewrite them; lora_ga and mica are not mapped)
BASE_PRESERVING_INITS = (True, False, 'gaussian', 'eva', 'orthogonal')
WHY_NOT = {
    'LOHA': "LoHa's ΔW is a Hadamard product of two low-rank products, not a low-rank chain",
    'LOKR': "LoKr's ΔW is a Kronecker product, not a low-rank chain",
    'BOFT': 'BOFT multiplies W by a learned butterfly-orthogonal matrix',
    'OFT': 'OFT multiplies W by a learned block-orthogonal matrix',
}
# visadapt's adapter-file key scheme (visadapt.core.io): adapter tensors and fully trained modules' state


def has_peft(necessary: bool = False) -> bool:
    """Is Hugging Face PEFT importable? With ``necessary``, raise ImportError with the install command instead."""
    try:
        import peft  # noqa: F401
    except ImportError:
        if necessary:
            raise ImportError('PEFT interop needs the peft package: pip install "visadapt[peft]"') from None
        return False
    return True


# ---- what PEFT computes differently (both directions) --------------------------------------------------------------
def peft_layer_problem(model: nn.Module, layer: str, module: nn.Module, lora: bool = True) -> Optional[str]:
    """Why PEFT's adapter on ``layer`` does not compute what visadapt's does, or None when they agree.

    ``lora``: also check the conv geometry PEFT's LoRA chain ignores ((IA)³'s scalings hold on any conv).
    """
    parent = model.get_submodule(layer.rpartition('.')[0])
    if isinstance(module, nn.MultiheadAttention) or isinstance(parent, nn.MultiheadAttention):
        return ("it belongs to an nn.MultiheadAttention, whose forward reads in_proj_weight and out_proj.weight "
                "directly; PEFT's layouts for it differ from visadapt's, so it is not converted")
    if not is_adapted(module) and not is_plain_layer(module):
        return f'its type {type(module).__name__} is not a plain nn.Linear/nn.Conv1d/nn.Conv2d/nn.Conv3d'
    site = module.site if is_adapted(module) else site_from_module(module)
    if not lora or site.kind != 'conv':
        return None
    if site.groups > 1:
        return (f"it is a grouped conv (groups={site.groups}): PEFT's conv LoRA runs a dense k×k down conv over all "
                f"input channels and a grouped 1×1 up conv, which is no update of the grouped weight (PEFT cannot "
                f"merge it) and not visadapt's per-group chain")
    if any(d != 1 for d in site.dilation):
        return f"it is dilated (dilation={site.dilation}) and PEFT's down conv runs without the dilation"
    if site.padding_mode != 'zeros':
        return f"it pads with padding_mode={site.padding_mode!r} and PEFT's down conv pads with zeros"
    return None


# ---- reading ---------------------------------------------------------------------------------------------------------
@dataclass
class PeftImport:
    """What :func:`load_peft_adapter` created.

    Attributes:
        peft_type: PEFT's method (``'LORA'``, ``'IA3'``, ``'VERA'``).
        adapters: visadapt adapter name → method, in injection order (one PEFT adapter may need several, e.g.
            (IA)³ on feed-forward and other modules).
        layers: the adapted layers.
        train_modules: PEFT's modules_to_save, trained fully.
        notes: what was done beyond a one-to-one copy (dropout dropped, scales folded, reparametrizations).
    """
    peft_type: str
    adapters: Dict[str, str]
    layers: List[str]
    train_modules: List[str]
    notes: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        made = ', '.join(f'{n!r} ({m})' for n, m in self.adapters.items())
        lines = [f'PEFT {self.peft_type} adapter -> visadapt {made} on {len(self.layers)} layers'
                 + (f', train_modules {self.train_modules}' if self.train_modules else '')]
        return '\n'.join(lines + [f'  note: {n}' for n in self.notes])


@dataclass
class _Part:
    """One visadapt adapter to create: name, config and tensors (visadapt's file key scheme)."""
    name: str
    config: AdapterConfig
    tensors: Dict[str, torch.Tensor]


def read_peft_adapter(path: Union[str, os.PathLike]) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """PEFT's config (a ``peft.PeftConfig``, parsed by PEFT) and the tensors of a PEFT adapter directory.

    Raises FileNotFoundError for a missing file and ValueError for a PEFT method visadapt cannot map (named).
    """
    has_peft(necessary=True)
    from peft import PeftConfig
    from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
    path = os.fspath(path)
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f'{cfg_path!r} not found; a PEFT adapter directory holds {CONFIG_NAME} and '
                                f'{SAFETENSORS_WEIGHTS_NAME} (written by PeftModel.save_pretrained)')
    try:
        with open(cfg_path) as f:
            peft_type = json.load(f).get('peft_type')
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f'{cfg_path!r} is not a PEFT adapter config: {err}') from None
    if peft_type not in MAPPED_FIELDS:
        why = WHY_NOT.get(peft_type, 'it has no visadapt counterpart with the same math (prompt-learning methods '
                                     'change no layer; others have another update form)')
        raise ValueError(f'{cfg_path!r}: PEFT method {peft_type!r} cannot be loaded into visadapt: {why}; visadapt '
                         f'reads {sorted(MAPPED_FIELDS)} adapters')
    config = PeftConfig.from_pretrained(path)
    weights = next((os.path.join(path, n) for n in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)
                    if os.path.isfile(os.path.join(path, n))), None)
    if weights is None:
        raise FileNotFoundError(f'{path!r} holds no {SAFETENSORS_WEIGHTS_NAME} (nor {WEIGHTS_NAME})')
    return config, read_state_dict(weights)


def _type_name(config: Any) -> str:
    """PEFT's method name ('LORA', ...): ``config.peft_type`` is a str enum."""
    return str(getattr(config.peft_type, 'value', config.peft_type))


def _default(f) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def _check_options(config: Any, source: str) -> None:
    """Refuse every PEFT option that changes the math and is not mapped (each must be at PEFT's default)."""
    mapped = MAPPED_FIELDS[config.peft_type]
    for f in fields(config):
        if f.name in BOOKKEEPING or f.name in mapped:
            continue
        value, default = getattr(config, f.name), _default(f)
        if value != default and not (not value and not default and default is not MISSING):
            raise ValueError(f'{source}: PEFT {_type_name(config)} option {f.name}={value!r} changes what the adapter '
                             f'computes and visadapt does not map it (it reads {sorted(mapped)} at any value, every '
                             f'other option at its default, here {default!r})')
    init = getattr(config, 'init_lora_weights', True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in BASE_PRESERVING_INITS):
        raise ValueError(f'{source}: init_lora_weights={init!r} is not mapped: PiSSA, OLoRA, CorDA and LoftQ rewrite '
                         f'the base weights when PEFT loads the adapter, so it is no update of the base model (convert '
                         f'it first: PEFT save_pretrained(..., path_initial_model_for_weight_conversion=...)); visadapt '
                         f'reads {list(BASE_PRESERVING_INITS)}')


def _split_keys(config: Any, tensors: Dict[str, torch.Tensor], source: str):
    """(layer → {PEFT tensor name: tensor}, model key → tensor of modules_to_save, shared tensors)."""
    import peft.tuners.ia3 as ia3
    import peft.tuners.lora as lora
    import peft.tuners.vera as vera
    names = {'LORA': lora.LoraLayer, 'IA3': ia3.IA3Layer, 'VERA': vera.VeraLayer}[config.peft_type].adapter_layer_names
    layers: Dict[str, Dict[str, torch.Tensor]] = {}
    others: Dict[str, torch.Tensor] = {}
    shared: Dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            if config.peft_type != 'VERA' or key not in VERA_PROJECTIONS:
                raise ValueError(f'{source}: tensor {key!r} is not under {PEFT_PREFIX!r} (not a PEFT adapter file '
                                 f'of a {_type_name(config)} adapter?)')
            shared[key] = tensor
            continue
        parts = key[len(PEFT_PREFIX):].split('.')
        cut = next((i for i, p in enumerate(parts) if p in names), None)
        if cut is None:
            others['.'.join(parts)] = tensor
        else:
            layers.setdefault('.'.join(parts[:cut]), {})['.'.join(parts[cut:])] = tensor
    if not layers:
        raise ValueError(f'{source} holds no {_type_name(config)} layer tensors ({", ".join(names)})')
    return layers, others, shared


def _layer_modules(model: nn.Module, layers: Dict[str, Any], source: str, lora: bool = True
                   ) -> Dict[str, nn.Module]:
    """The model's modules for the file's layers; ValueError for a missing one or one PEFT treats differently."""
    modules = dict(model.named_modules())
    for layer in layers:
        owner = layer.split('.base_layer.')[0]   # PEFT nests sublayers of a layer it wrapped (MHA's out_proj) there
        if owner not in modules:
            some = ', '.join(repr(n) for n, m in modules.items() if is_plain_layer(m))[:300]
            raise ValueError(f'{source} holds weights for layer {layer!r}, which this model does not have (its layers '
                             f'include {some})')
        problem = peft_layer_problem(model, owner, modules[owner], lora) or (
            f'PEFT wraps it in {owner!r}' if owner != layer else None)
        if problem:
            raise ValueError(f'{source}: layer {owner!r} cannot be loaded exactly: {problem}')
    return {layer: modules[layer] for layer in layers}


def _expect(tensors: Dict[str, torch.Tensor], names: List[str], layer: str, source: str) -> None:
    if sorted(tensors) != sorted(names):
        raise ValueError(f'{source}: layer {layer!r} has tensors {sorted(tensors)}, expected {sorted(names)}')


def _train_modules(model: nn.Module, config: Any, others: Dict[str, torch.Tensor], source: str):
    """modules_to_save → (visadapt train_modules, their tensors): each remaining key must belong to one of them."""
    patterns = list(config.modules_to_save or [])
    names = [n for n, _ in model.named_modules() if n]
    chosen: List[str] = []
    tensors = {}
    for key, tensor in others.items():
        # PEFT's rule: a module whose name ends with a modules_to_save entry; the outermost one, as train_modules
        owner = min((n for n in names if key.startswith(n + '.') and any(n.endswith(p) for p in patterns)),
                    key=len, default=None)
        if owner is None:
            raise ValueError(f'{source}: tensor {PEFT_PREFIX + key!r} is neither an adapter tensor nor the state of a '
                             f'module in modules_to_save={patterns}')
        if owner not in chosen:
            chosen.append(owner)
        tensors[trained_file_key(key)] = tensor
    return chosen, tensors


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    """PEFT's LoRA scaling: alpha / r, or alpha / √r with use_rslora."""
    return alpha / (math.sqrt(r) if rslora else r)


def _layer_scaling(config: Any, layer: str, r: int) -> float:
    """PEFT's scaling on ``layer`` of rank ``r``, with its alpha_pattern entry if one matches (PEFT's own lookup)."""
    from peft.utils.other import get_pattern_key
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), layer), config.lora_alpha)
    return _scaling(alpha, r, config.use_rslora)


def _read_lora(model, config, layers, source: str) -> Tuple[List[_Part], List[str]]:
    """PEFT LoRA/DoRA → one visadapt LoRA/DoRA adapter (ranks from the tensors, PEFT's scale as alpha or in B)."""
    from peft.utils.other import get_pattern_key
    modules = _layer_modules(model, layers, source)
    r0 = config.r
    alpha = r0 * _scaling(config.lora_alpha, r0, config.use_rslora)   # visadapt's alpha / r0 = PEFT's default scaling
    names = ['lora_A.weight', 'lora_B.weight'] + (['lora_magnitude_vector'] if config.use_dora else [])
    tensors, ranks, folded = {}, {}, []
    for layer, t in layers.items():
        _expect(t, names, layer, source)
        A, B = t['lora_A.weight'], t['lora_B.weight']
        r = A.shape[0]
        want = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), layer), r0)
        if r != want:
            raise ValueError(f'{source}: layer {layer!r} has lora_A of rank {r}, but adapter_config.json gives it '
                             f'rank {want} (r / rank_pattern)')
        factor = _layer_scaling(config, layer, r) * r / alpha   # PEFT's scale over visadapt's alpha / r
        if not math.isclose(factor, 1.0, rel_tol=1e-12):
            folded.append(layer)
            B = B * factor
        ranks[layer] = r
        tensors[adapter_file_key(layer, 'A')] = A
        tensors[adapter_file_key(layer, 'B')] = B.reshape(B.shape[0], r)
        if config.use_dora:
            tensors[adapter_file_key(layer, 'm')] = t['lora_magnitude_vector'].reshape(-1)
    cls = get_config_class('DoRA' if config.use_dora else 'LoRA')
    vconfig = cls(r=r0, alpha=alpha, include=list(modules), rank_pattern={n: r for n, r in ranks.items() if r != r0})
    notes = [f"PEFT's scaling on {len(folded)} layer(s) ({', '.join(folded[:3])}{', ...' if len(folded) > 3 else ''}) "
             f"differs from alpha/r with one alpha={alpha:g}; it is folded into their B (same outputs)"] if folded else []
    return [_Part('', vconfig, tensors)], notes


def _read_ia3(model, config, layers, source: str, reparametrize: bool) -> Tuple[List[_Part], List[str]]:
    """PEFT (IA)³ → visadapt (IA)³ (output side), SSL (feed-forward modules: input side) and, on biased layers with
    ``reparametrize``, BitFit for the bias scaling PEFT applies and visadapt's (IA)³ does not."""
    from peft.tuners.ia3 import IA3Model
    modules = _layer_modules(model, layers, source, lora=False)
    out_scales, in_scales, bias_deltas = {}, {}, {}
    for layer, t in layers.items():
        _expect(t, ['ia3_l'], layer, source)
        scale = t['ia3_l'].reshape(-1)
        if IA3Model._check_target_module_feedforward(config, layer):   # PEFT's own test: x ⊙ l, bias unscaled
            in_scales[layer] = scale
            continue
        out_scales[layer] = scale                                      # l ⊙ (W x + b)
        bias = base_bias(modules[layer])
        if bias is not None:   # = l ⊙ W x + b + (l − 1) ⊙ b
            bias_deltas[layer] = (scale.float() - 1) * bias.detach().float().to(scale.device)
    if bias_deltas and not reparametrize:
        raise ValueError(f"{source}: PEFT's (IA)³ scales the whole output of {len(bias_deltas)} layer(s) with a bias "
                         f"(e.g. {next(iter(bias_deltas))!r}): l ⊙ (W x + b), while visadapt's (IA)³ leaves the bias "
                         f"unscaled. The same outputs need a BitFit bias delta (l − 1) ⊙ b beside it, which trains as "
                         f"a separate vector: pass reparametrize=True to load it that way")
    parts = []
    for suffix, method, tensor, scales in (('', 'IA3', 'l', out_scales), ('_ff', 'SSL', 's', in_scales),
                                          ('_bias', 'BitFit', 'delta_b', bias_deltas)):
        if scales:
            parts.append(_Part(suffix, get_config_class(method)(include=list(scales)),
                               {adapter_file_key(n, tensor): v for n, v in scales.items()}))
    parts[0].name = ''   # the first adapter takes the plain name (SSL when only feed-forward modules are adapted)
    notes = [f'(IA)³ on feed-forward modules ({len(in_scales)} layers) scales their input: loaded as SSL'] \
        if in_scales else []
    if bias_deltas:
        notes.append(f'reparametrized: BitFit delta_b = (l − 1) ⊙ b on {len(bias_deltas)} biased layer(s), computed '
                     f'from this base model\'s biases')
    return parts, notes


def _read_vera(model, config, layers, shared, source: str, reparametrize: bool) -> Tuple[List[_Part], List[str]]:
    """PEFT VeRA → the exact LoRA it equals (with ``reparametrize``): A = diag(λ_d) vera_A[:, :in],
    B = diag(λ_b) vera_B[:out]."""
    if not reparametrize:
        raise ValueError(f"{source}: PEFT's VeRA draws its shared projections vera_A/vera_B from "
                         f"projection_prng_key={config.projection_prng_key} with its own generator, and visadapt's "
                         f"VeRA regenerates its frozen projections from its seed, so it cannot hold PEFT's. The adapter "
                         f"is exactly the LoRA A = diag(λ_d)·vera_A[:, :in], B = diag(λ_b)·vera_B[:out] (same outputs, "
                         f"but A and B train instead of λ_d, λ_b): pass reparametrize=True to load it that way")
    modules = _layer_modules(model, layers, source)
    missing = [k for k in VERA_PROJECTIONS if k not in shared]
    if missing:
        raise ValueError(f'{source} lacks the shared projections {missing} (saved with save_projection=False)')
    vera_A, vera_B = (shared[k] for k in VERA_PROJECTIONS)
    tensors = {}
    for layer, t in layers.items():
        _expect(t, ['vera_lambda_b', 'vera_lambda_d'], layer, source)
        out_f, in_f = modules[layer].weight.shape[:2]
        if not isinstance(modules[layer], nn.Linear) or in_f > vera_A.shape[1] or out_f > vera_B.shape[0]:
            raise ValueError(f'{source}: layer {layer!r} ({type(modules[layer]).__name__} {out_f}x{in_f}) does not fit '
                             f'the VeRA projections vera_A {tuple(vera_A.shape)}, vera_B {tuple(vera_B.shape)}')
        tensors[adapter_file_key(layer, 'A')] = t['vera_lambda_d'].unsqueeze(1) * vera_A[:, :in_f]
        tensors[adapter_file_key(layer, 'B')] = t['vera_lambda_b'].unsqueeze(1) * vera_B[:out_f]
    vconfig = get_config_class('LoRA')(r=config.r, include=list(modules))
    return [_Part('', vconfig, tensors)], ['reparametrized: VeRA loaded as the LoRA it equals (A = diag(λ_d) vera_A, '
                                           'B = diag(λ_b) vera_B)']


def _exact_selection(model: nn.Module, part: _Part, source: str) -> None:
    """Make ``part.config`` select exactly the file's layers and train modules: visadapt's name patterns also match
    dotted suffixes (``'fc'`` selects ``head.fc``), so layers reached that way are excluded by name."""
    want, trained = sorted(part.config.include), sorted(part.config.train_modules)
    got = sorted(n for n, _ in select_targets(model, part.config))
    if got != want:
        part.config = dataclasses.replace(part.config, exclude=[n for n in got if n not in want])
        got = sorted(n for n, _ in select_targets(model, part.config))
    if got != want or sorted(select_train_modules(model, trained)) != trained:
        extra = sorted(set(got) ^ set(want)) or sorted(set(select_train_modules(model, trained)) ^ set(trained))
        raise ValueError(f'{source}: visadapt name patterns cannot select exactly these layers and modules (the '
                         f'difference: {extra[:3]})')


def _apply(model: nn.Module, parts: List[_Part], source: str) -> None:
    """Inject and load every part, or nothing: on any error the injected parts are removed again."""
    for part in parts:
        _exact_selection(model, part, source)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    done: List[str] = []
    try:
        for part in parts:
            inject(model, part.config, name=part.name)
            done.append(part.name)
            load_adapter_state_dict(model, part.tensors, part.name, source)
    except BaseException:
        for name in reversed(done):
            remove(model, name)
        for n, p in model.named_parameters():   # the flags from before, whatever other adapters hold
            p.requires_grad_(flags[n])
        raise


def load_peft_adapter(model: nn.Module, path: Union[str, os.PathLike], name: str = 'default',
                      reparametrize: bool = False) -> PeftImport:
    """Load the PEFT adapter directory ``path`` into ``model`` (the base model PEFT adapted) as visadapt adapters.

    The outputs equal ``PeftModel.from_pretrained(model, path)``'s; base parameter names do not change.

    Args:
        name: the visadapt adapter name (a second or third adapter gets ``<name>_ff`` / ``<name>_bias``, see the
            module docstring).
        reparametrize: allow the exact mappings whose trainable parameters differ from PEFT's (VeRA → LoRA, (IA)³ on
            biased layers → (IA)³ + BitFit).
    Returns a :class:`PeftImport`. Raises ValueError naming what does not map; on any error the model is unchanged.
    """
    config, tensors = read_peft_adapter(path)
    peft_type = _type_name(config)
    source = f'PEFT adapter {os.fspath(path)!r}'
    _check_options(config, source)
    layers, others, shared = _split_keys(config, tensors, source)
    if config.peft_type == 'LORA':
        parts, notes = _read_lora(model, config, layers, source)
    elif config.peft_type == 'IA3':
        parts, notes = _read_ia3(model, config, layers, source, reparametrize)
    else:
        parts, notes = _read_vera(model, config, layers, shared, source, reparametrize)
    train_modules, trained = _train_modules(model, config, others, source)
    parts[0].config = dataclasses.replace(parts[0].config, train_modules=train_modules)
    parts[0].tensors.update(trained)
    for part in parts:
        part.name = name + part.name
    dropout = getattr(config, 'lora_dropout', 0.0) or getattr(config, 'vera_dropout', 0.0)
    if dropout:
        notes.insert(0, f'dropout p={dropout} dropped: visadapt adapters have none (PEFT applies it only in training)')
    _apply(model, parts, source)
    return PeftImport(peft_type, {p.name: p.config.method for p in parts}, sorted(layers), train_modules, notes)


# ---- writing ---------------------------------------------------------------------------------------------------------
def _export_form(model: nn.Module, layer: str, module: nn.Module, name: str) -> Factors:
    """The LoRA form of adapter ``name`` on ``layer`` (Tucker cores folded into the down factor); ValueError if PEFT
    cannot hold it exactly."""
    problem = peft_layer_problem(model, layer, module)
    if problem:
        raise ValueError(f'adapter {name!r} on layer {layer!r} cannot be written as a PEFT LoRA: {problem}')
    try:
        form = getattr(module, ADAPTER_ATTR)[name].factor_form()
    except ValueError as err:
        raise ValueError(f'adapter {name!r} on layer {layer!r} cannot be written as a PEFT LoRA: {err}') from None
    form = form.as_chain()
    dtype = torch.promote_types(form.up.dtype, torch.float32)
    return form.detached(dtype)


def _exact_names(layers: List[str], all_names: List[str]) -> Tuple[Union[List[str], str], Callable[[str], str]]:
    """PEFT's target_modules for exactly ``layers``, and each layer's rank_pattern/alpha_pattern key.

    PEFT matches a target_modules list entry as the module name or a dotted suffix of it, and a pattern key ``k`` as
    the regex ``(.*\\.)?(k)$``: full names select one layer unless a name is also the dotted suffix of another
    module's. Then a full-match regex and ``^``-anchored keys are written instead.
    """
    clash = any(o != n and o.endswith('.' + n) for n in layers for o in all_names)
    if not clash:
        return sorted(layers), re.escape
    return '|'.join(re.escape(n) for n in layers), lambda n: '^' + re.escape(n)


def _modules_to_save(model: nn.Module, name: str) -> Tuple[List[str], Dict[str, torch.Tensor]]:
    """The train modules of adapter ``name`` as PEFT modules_to_save, and their state under PEFT's keys."""
    modules = get_injection(model, name).train_modules
    if '' in modules:
        raise ValueError(f'adapter {name!r} trains the whole model, which a PEFT adapter cannot hold')
    all_names = [n for n, _ in model.named_modules(remove_duplicate=False)]
    for module in modules:
        others = [o for o in all_names if o != module and o.endswith(module)]
        if others:   # PEFT picks modules_to_save by plain name suffix
            raise ValueError(f'train module {module!r} of adapter {name!r} cannot be a PEFT modules_to_save entry: '
                             f'PEFT selects those by name suffix, so it would also select {others[:3]}')
    state = model.state_dict()
    return modules, {PEFT_PREFIX + k: state[k].detach().contiguous()
                     for k in adapter_state_keys(model, [name]) if not is_adapter_key(k)}


def peft_lora_state(model: nn.Module, name: str = 'default') -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(adapter_config.json contents, tensors) of adapter ``name`` as a PEFT LoRA; ValueError if not exact."""
    has_peft(necessary=True)
    from peft import LoraConfig
    layers = list(iter_adapted(model, name))
    if not layers:
        raise ValueError(f'adapter {name!r} ({get_injection(model, name).config.method}) adapts no layer; a PEFT LoRA '
                         f'holds layer updates')
    forms = {layer: _export_form(model, layer, module, name) for layer, module in layers}
    dora = {f.magnitude is not None for f in forms.values()}
    if len(dora) > 1:
        raise ValueError(f'adapter {name!r} has a DoRA magnitude on some layers only; PEFT sets use_dora per adapter')
    tensors: Dict[str, torch.Tensor] = {}
    for layer, form in forms.items():
        prefix = PEFT_PREFIX + layer
        tensors[f'{prefix}.lora_A.weight'], tensors[f'{prefix}.lora_B.weight'] = form.down, form.up
        if form.magnitude is not None:   # PEFT's shape: (out,) for Linear, (1, out, 1, ...) for ConvNd
            m = form.magnitude
            tensors[f'{prefix}.lora_magnitude_vector'] = m if form.up.dim() == 2 else m.view(1, -1, *form.up.shape[2:])
    train_modules, trained = _modules_to_save(model, name)
    tensors.update(trained)
    ranks = {layer: form.down.shape[0] for layer, form in forms.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    targets, key = _exact_names(list(forms), [n for n, _ in model.named_modules()])
    pattern = {key(layer): rank for layer, rank in ranks.items() if rank != r}
    config = LoraConfig(r=r, lora_alpha=r, target_modules=targets, rank_pattern=pattern, alpha_pattern=dict(pattern),
                        use_dora=dora.pop(), modules_to_save=train_modules or None, inference_mode=True)
    data = json.loads(json.dumps(config.to_dict(), default=sorted))   # plain JSON: sets sorted, str enums as str
    data['auto_mapping'] = {'base_model_class': type(model).__name__, 'parent_library': type(model).__module__}
    return data, tensors


def save_peft_adapter(model: nn.Module, path: Union[str, os.PathLike], name: str = 'default') -> Dict[str, Any]:
    """Write adapter ``name`` of ``model`` as a PEFT LoRA adapter directory (``PeftModel.from_pretrained`` reads it
    with the same outputs). Returns the adapter_config.json contents. Raises ValueError, writing nothing, when the
    adapter has no exact PEFT form (the message names the layer and the reason)."""
    data, tensors = peft_lora_state(model, name)
    from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save
    tensors = {k: v.cpu().clone().contiguous() for k, v in tensors.items()}   # safetensors refuses shared storage
    path = os.fspath(path)
    atomic_write_files({os.path.join(path, SAFETENSORS_WEIGHTS_NAME): save(tensors, metadata={'format': 'pt'}),
                        os.path.join(path, CONFIG_NAME): json.dumps(data, indent=2, sort_keys=True).encode()})
    return data
