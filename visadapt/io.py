"""Saving and loading adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

The tensor file holds only the adapter's tensors (keys ``adapter.<layer>.<tensor>``) and the state of the fully
trained ``train_modules`` (keys ``trained.<base key>``, the base model's own names). Loading validates every key,
shape and value before anything is changed, and never unpickles: safetensors only. Files are written to a
temporary name and renamed into place, so an interrupted save never leaves a half-written adapter.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn

from . import __version__
from .config import AdapterConfig, config_from_dict
from .layer import ADAPTER_ATTR, iter_adapted
from .tuner import _injections, get_injection, inject, remove

__all__ = ['save_adapter', 'load_adapter', 'adapter_state_dict', 'load_adapter_state_dict', 'atomic_write_bytes',
           'atomic_write_files', 'CONFIG_NAME', 'WEIGHTS_NAME']

CONFIG_NAME = 'adapter_config.json'
WEIGHTS_NAME = 'adapter_model.safetensors'
ADAPTER_PREFIX = 'adapter.'
TRAINED_PREFIX = 'trained.'


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once at import: os.umask can only be read by setting it


def atomic_write_files(files: Dict[str, bytes]) -> None:
    """Write several files so that a failure leaves every previous version intact.

    Each file is written in full (and fsync'ed) to a temporary name in its target directory first; only when all of
    them are on disk are they renamed into place (``os.replace``, atomic per file). An error while writing removes
    the temporary files and changes nothing. Final files get the usual permissions (0o666 minus the umask), not
    mkstemp's 0o600.
    """
    temps = []
    try:
        for path, data in files.items():
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=directory)
            temps.append((tmp, path))
            with os.fdopen(fd, 'wb') as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)
        while temps:
            tmp, path = temps[0]
            os.replace(tmp, path)
            temps.pop(0)
    except BaseException:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and an atomic rename."""
    atomic_write_files({path: data})


def _trained_prefix(mod_name: str) -> str:
    """Key prefix of a train module's state; the root module '' (full fine-tuning) has keys ``trained.<base key>``."""
    return f'{TRAINED_PREFIX}{mod_name}.' if mod_name else TRAINED_PREFIX


def adapter_state_dict(model: nn.Module, name: str = 'default') -> Dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors and its train_modules' state, under the file's key scheme (detached, contiguous)."""
    injection = get_injection(model, name)
    state: Dict[str, torch.Tensor] = {}
    for layer_name, module in iter_adapted(model, name):
        for key, tensor in module.visadapt[name].state_dict().items():
            state[f'{ADAPTER_PREFIX}{layer_name}.{key}'] = tensor.detach().contiguous()
    modules = dict(model.named_modules())
    for mod_name in injection.train_modules:
        for key, tensor in modules[mod_name].state_dict().items():
            if ADAPTER_ATTR not in key.split('.'):  # adapters inside a train module are saved as adapters
                state[_trained_prefix(mod_name) + key] = tensor.detach().contiguous()
    return state


def _layer_metadata(model: nn.Module, name: str) -> Dict[str, Any]:
    return {layer_name: meta for layer_name, module in iter_adapted(model, name)
            if (meta := module.visadapt[name].metadata())}


def save_adapter(model: nn.Module, path: Union[str, os.PathLike], name: str = 'default') -> None:
    """Write adapter ``name`` to directory ``path`` (created if needed)."""
    from safetensors.torch import save
    injection = get_injection(model, name)
    path = os.fspath(path)
    state = {k: v.cpu() for k, v in adapter_state_dict(model, name).items()}
    config = {'visadapt_version': __version__, 'adapter_name': name, 'config': injection.config.to_dict(),
              'layers': injection.layers, 'train_modules': injection.train_modules,
              'layer_metadata': _layer_metadata(model, name)}
    # both files are fully written before either replaces its previous version
    atomic_write_files({os.path.join(path, WEIGHTS_NAME): save(state, metadata={'format': 'pt', 'library': 'visadapt'}),
                        os.path.join(path, CONFIG_NAME): json.dumps(config, indent=2).encode()})


def read_adapter(path: Union[str, os.PathLike]):
    """Read and check an adapter directory: returns (config dict, tensors). Raises ValueError on bad files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = os.fspath(path)
    cfg_path, st_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (cfg_path, st_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f'adapter file {p!r} not found; an adapter directory holds {CONFIG_NAME} and '
                                    f'{WEIGHTS_NAME} (written by visadapt.save_adapter)')
    try:
        with open(cfg_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f'{cfg_path!r} is not valid JSON: {err}') from None
    if not isinstance(meta, dict) or not isinstance(meta.get('config'), dict):
        raise ValueError(f"{cfg_path!r} is not a visadapt adapter config (no 'config' object)")
    try:
        tensors = load_file(st_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f'{st_path!r} is not a valid safetensors file (truncated or another format?): {err}') from None
    return meta, tensors


def _check_tensors(model: nn.Module, name: str, tensors: Dict[str, torch.Tensor], source: str) -> None:
    expected = adapter_state_dict(model, name)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        raise ValueError(f'{source} does not match the model: key {first!r} is '
                         f'{"missing from the file" if missing else "not in the model"} '
                         f'({len(missing)} missing, {len(unexpected)} unexpected)')
    for key, ref in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise ValueError(f'{source}: tensor {key!r} has shape {tuple(got.shape)} in the file but '
                             f'{tuple(ref.shape)} in the model')
        if ref.is_floating_point() != got.is_floating_point():
            raise ValueError(f'{source}: tensor {key!r} has dtype {got.dtype} in the file but {ref.dtype} in the model')
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise ValueError(f'{source}: tensor {key!r} contains NaN or Inf values')


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, tensors: Dict[str, torch.Tensor], name: str = 'default',
                            source: str = 'state dict') -> None:
    """Copy validated ``tensors`` (file key scheme) into adapter ``name`` and its train_modules."""
    _check_tensors(model, name, tensors, source)
    injection = get_injection(model, name)
    for layer_name, module in iter_adapted(model, name):
        prefix = f'{ADAPTER_PREFIX}{layer_name}.'
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.visadapt[name].load_state_dict(sub, strict=True)
    modules = dict(model.named_modules())
    for mod_name in injection.train_modules:
        prefix = _trained_prefix(mod_name)
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        # keys were validated above; only adapter keys of layers inside the module may be absent
        modules[mod_name].load_state_dict(sub, strict=False)


def load_adapter(model: nn.Module, path: Union[str, os.PathLike], name: Optional[str] = None,
                 config: Optional[AdapterConfig] = None) -> AdapterConfig:
    """Inject the adapter saved in ``path`` into ``model`` and load its tensors.

    Args:
        name: adapter name in the model (default: the name it was saved under).
        config: override the saved config (rarely needed).
    Returns the config used. On any error the model is left unchanged.
    """
    meta, tensors = read_adapter(path)
    if config is None:
        try:
            config = config_from_dict(meta['config'])
        except (ValueError, TypeError) as err:
            raise type(err)(f'{os.path.join(os.fspath(path), CONFIG_NAME)!r}: {err}') from None
    name = name or meta.get('adapter_name', 'default')
    source = f'adapter {os.fspath(path)!r}'
    saved_layers = meta.get('layers')
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    inject(model, config, name=name)
    try:
        if saved_layers is not None and saved_layers != get_injection(model, name).layers:
            now = get_injection(model, name).layers
            diff = sorted(set(saved_layers) ^ set(now))
            raise ValueError(f'{source} was saved for layers that differ from those its config selects in this model '
                             f'(first difference: {diff[0] if diff else "order"!r})')
        for layer_name, module in iter_adapted(model, name):
            layer_meta = meta.get('layer_metadata', {}).get(layer_name)
            if layer_meta:
                module.visadapt[name].check_metadata(layer_meta, f'{source}, layer {layer_name!r}')
        load_adapter_state_dict(model, tensors, name, source)
    except BaseException:
        remove(model, name)
        for n, p in model.named_parameters():  # exactly the flags from before, whatever other adapters hold
            p.requires_grad_(flags[n])
        raise
    return config
