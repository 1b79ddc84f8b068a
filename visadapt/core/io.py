"""Checkpoints of adapters: the one schema, the one validator, and ``adapter_config.json`` + ``adapter_model.safetensors``.

The schema (used by :func:`save_adapter` and by every integration's checkpoints: mmengine, the trainers):

* tensors: the adapter's tensors (keys ``adapter.<layer>.<tensor>``) and the state of the fully trained
  ``train_modules`` (keys ``trained.<base key>``, the base model's own names) — :func:`adapter_state_dict`;
* metadata: :func:`adapter_metadata` — the visadapt version, the adapter name, its config, the adapted layers, the
  train modules and per-layer facts (e.g. SVFT's base-weight fingerprint), checked by :func:`check_adapter_metadata`.

Loading validates every key, shape, dtype kind and value (:func:`check_state_dict`) before anything is changed, and
never unpickles: safetensors only (:func:`read_state_dict` reads other checkpoint files with
``torch.load(weights_only=True)``). Files are written to a temporary name and renamed into place, so an interrupted
save never leaves a half-written adapter.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Collection, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from .._version import __version__
from .config import AdapterConfig
from .layer import is_adapter_key, iter_adapted
from .registry import config_from_dict
from .selection import train_entry_state
from .tuner import adapter_names, get_injection, inject, remove

__all__ = ['save_adapter', 'load_adapter', 'adapter_state_dict', 'load_adapter_state_dict', 'adapter_metadata',
           'check_adapter_metadata', 'check_state_dict', 'adapter_state_keys', 'adapter_file_key', 'trained_file_key', 'read_adapter', 'read_state_dict', 'atomic_write_bytes',
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


def adapter_file_key(layer: str, tensor: str) -> str:
    """The schema's key of adapter tensor ``tensor`` (e.g. ``G``, ``factors.0``) on layer ``layer``."""
    return f'{ADAPTER_PREFIX}{layer}.{tensor}'


def trained_file_key(base_key: str) -> str:
    """The schema's key of a fully trained module's tensor, from its base-model key (e.g. ``head.fc.weight``)."""
    return TRAINED_PREFIX + base_key


def adapter_state_dict(model: nn.Module, name: str = 'default') -> Dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors and its train_modules' state, under the file's key scheme (detached, contiguous)."""
    injection = get_injection(model, name)
    state: Dict[str, torch.Tensor] = {}
    for layer_name, module in iter_adapted(model, name):
        for key, tensor in module.visadapt[name].state_dict().items():
            state[adapter_file_key(layer_name, key)] = tensor.detach().contiguous()
    for entry in injection.train_modules:  # adapters inside a train module are saved as adapters
        for key, tensor in train_entry_state(model, entry).items():
            state[trained_file_key(key)] = tensor.detach().contiguous()
    return state


def adapter_state_keys(model: nn.Module, names: Optional[Collection[str]] = None) -> List[str]:
    """Keys of ``model.state_dict()`` (the model's own names) that adapters ``names`` (default: all) own: their
    tensors and their train modules' state. A ``FullFinetune`` adapter (train module ``''``) owns every key.

    What a trainer's slim checkpoint keeps (mmengine checkpoints, resume files); the rest is the frozen base.
    """
    names = adapter_names(model) if names is None else list(names)
    entries = {m for n in names for m in get_injection(model, n).train_modules}
    owned = {key for entry in entries for key in train_entry_state(model, entry)}
    return [k for k in model.state_dict().keys() if is_adapter_key(k) or k in owned]


def adapter_metadata(model: nn.Module, name: str = 'default') -> Dict[str, Any]:
    """The schema's JSON metadata of adapter ``name``: version, name, config, layers, train modules, layer facts."""
    injection = get_injection(model, name)
    layer_metadata = {layer_name: meta for layer_name, module in iter_adapted(model, name)
                      if (meta := module.visadapt[name].metadata())}
    return {'visadapt_version': __version__, 'adapter_name': name, 'config': injection.config.to_dict(),
            'layers': injection.layers, 'train_modules': injection.train_modules, 'layer_metadata': layer_metadata}


def check_adapter_metadata(model: nn.Module, name: str, meta: Mapping[str, Any], source: str,
                           check_config: bool = True) -> None:
    """Raise ValueError unless ``meta`` (:func:`adapter_metadata` of a saved adapter) fits adapter ``name`` here.

    Checks the config (with ``check_config``; a loader that built the adapter from ``meta`` skips it), the adapted
    layers and each layer's own facts (``Adapter.check_metadata``, e.g. SVFT's base-weight fingerprint).
    """
    injection = get_injection(model, name)
    if check_config:
        mine, theirs = injection.config.to_dict(), dict(meta.get('config', {}))
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(f'{source}: adapter {name!r} was trained with another config (differs in {diff}: saved '
                             f'{[theirs.get(k) for k in diff]}, here {[mine.get(k) for k in diff]})')
    saved_layers = meta.get('layers')
    if saved_layers is not None and list(saved_layers) != list(injection.layers):
        diff = sorted(set(saved_layers) ^ set(injection.layers))
        raise ValueError(f'{source} was saved for layers that differ from those its config selects in this model '
                         f'(first difference: {diff[0] if diff else "order"!r})')
    for layer_name, module in iter_adapted(model, name):
        layer_meta = (meta.get('layer_metadata') or {}).get(layer_name)
        if layer_meta:
            module.visadapt[name].check_metadata(layer_meta, f'{source}, layer {layer_name!r}')


def save_adapter(model: nn.Module, path: Union[str, os.PathLike], name: str = 'default') -> None:
    """Write adapter ``name`` to directory ``path`` (created if needed)."""
    from safetensors.torch import save
    path = os.fspath(path)
    state = {k: v.cpu() for k, v in adapter_state_dict(model, name).items()}
    config = adapter_metadata(model, name)
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


def check_state_dict(expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], source: str,
                     optional: Collection[str] = (), check_values: bool = True) -> None:
    """Raise ValueError unless ``tensors`` has exactly the keys of ``expected`` with the same shapes and kind of
    dtype (floating or not) and, with ``check_values``, no NaN or Inf. Keys in ``optional`` may be absent.

    The one validator of checkpoints: adapter files, trainers' resume files, mmengine adapter checkpoints and base
    weights all go through it, so every loader reports a bad file the same way (naming the first bad key).
    """
    missing = [k for k in expected if k not in tensors and k not in optional]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        raise ValueError(f'{source} does not match the model: key {first!r} is '
                         f'{"missing from the file" if missing else "not in the model"} '
                         f'({len(missing)} missing, {len(unexpected)} unexpected)')
    for key, got in tensors.items():
        ref = expected[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise ValueError(f'{source}: tensor {key!r} has shape {tuple(got.shape)} in the file but '
                             f'{tuple(ref.shape)} in the model')
        if ref.is_floating_point() != got.is_floating_point():
            raise ValueError(f'{source}: tensor {key!r} has dtype {got.dtype} in the file but {ref.dtype} in the model')
        if check_values and got.is_floating_point() and not torch.isfinite(got).all():
            raise ValueError(f'{source}: tensor {key!r} contains NaN or Inf values')


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Read a checkpoint file without unpickling arbitrary objects.

    ``.safetensors`` files go through safetensors; anything else through ``torch.load(weights_only=True)``. A
    training checkpoint's ``state_dict`` / ``model`` / ``state_dict_ema`` entry is unwrapped (in that order of
    preference) and a DistributedDataParallel ``module.`` prefix is stripped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file {path!r} not found')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            state = load_file(path)
        except Exception as err:  # safetensors raises several types for bad files
            raise ValueError(f'{path!r} is not a valid safetensors file: {err}') from None
    else:
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as err:  # pickle errors, zip errors, weights_only refusals
            raise ValueError(f'cannot read checkpoint {path!r} with torch.load(weights_only=True): {err}') from None
    if isinstance(state, Mapping):
        for key in ('state_dict', 'model', 'state_dict_ema'):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f'{path!r} does not hold a state dict (a mapping of names to tensors)')
    if state and all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return dict(state)


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, tensors: Dict[str, torch.Tensor], name: str = 'default',
                            source: str = 'state dict') -> None:
    """Copy validated ``tensors`` (file key scheme) into adapter ``name`` and its train_modules."""
    check_state_dict(adapter_state_dict(model, name), tensors, source)
    injection = get_injection(model, name)
    for layer_name, module in iter_adapted(model, name):
        prefix = f'{ADAPTER_PREFIX}{layer_name}.'
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.visadapt[name].load_state_dict(sub, strict=True)
    for entry in injection.train_modules:  # keys and shapes were validated above
        for key, target in train_entry_state(model, entry).items():
            target.copy_(tensors[trained_file_key(key)])


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
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    inject(model, config, name=name)
    try:
        check_adapter_metadata(model, name, meta, source, check_config=False)
        load_adapter_state_dict(model, tensors, name, source)
    except BaseException:
        remove(model, name)
        for n, p in model.named_parameters():  # exactly the flags from before, whatever other adapters hold
            p.requires_grad_(flags[n])
        raise
    return config
