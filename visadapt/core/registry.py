"""The method registry and the one parser of adapter specs (a config, a method name, or a dict from a file).

``@register(FLoRAConfig)`` on an adapter class is the only step that makes a method usable everywhere: configs are
found by name (case-insensitive) for JSON files, mm configs and command lines, and the package's top-level names
(``visadapt.FLoRAConfig``, ...) are derived from this registry.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Type, Union

from .config import AdapterConfig

__all__ = ['METHODS', 'register', 'get_config_class', 'config_from_dict', 'check_spec_fields', 'parse_adapter_spec',
           'method_names', 'AdapterSpec']

METHODS: Dict[str, Type[AdapterConfig]] = {}

#: what :func:`parse_adapter_spec` accepts
AdapterSpec = Union[AdapterConfig, Mapping[str, Any], str]


def register(config_cls: Type[AdapterConfig]):
    """Class decorator for an adapter class: ``@register(FLoRAConfig)`` makes the method usable everywhere.

    Configs that adapt no layer (full fine-tuning, head-only) register with ``register(Config)(None)``.
    """
    def deco(adapter_cls):
        key = config_cls.method.lower()
        if not key:
            raise ValueError(f'{config_cls.__name__}.method is empty')
        if key in METHODS and METHODS[key] is not config_cls:
            raise ValueError(f'method {config_cls.method!r} is already registered by {METHODS[key].__name__}')
        config_cls.adapter_cls = adapter_cls
        METHODS[key] = config_cls
        return adapter_cls
    return deco


def method_names() -> List[str]:
    """Registered method names, as spelled by their configs."""
    return sorted(c.method for c in METHODS.values())


def get_config_class(method: str) -> Type[AdapterConfig]:
    """Config class for a method name, case-insensitively ('FLoRA', 'flora')."""
    key = str(method).lower()
    if key not in METHODS:
        raise ValueError(f'unknown adapter method {method!r}; registered methods: {method_names()}')
    return METHODS[key]


def _mpc_hint(cls: Type[AdapterConfig], unknown: List[str]) -> str:
    if not any(k.startswith('mpc') for k in unknown):
        return ''
    with_mpc = sorted(c.method for c in METHODS.values() if 'mpc' in {f.name for f in dataclasses.fields(c)})
    return f' ({cls.method} has no down/up factors A, B for the MPC regularizers; methods with MPC: {with_mpc})'


def check_spec_fields(data: Mapping[str, Any]) -> Type[AdapterConfig]:
    """The config class a ``{'method'|'type': name, **fields}`` dict names, after checking its field names (not yet
    their values: a spec may be completed by defaults first). Raises ValueError naming the bad key."""
    fields = {k: v for k, v in data.items() if k not in ('method', 'type')}
    method = data.get('method') or data.get('type')
    if method is None:
        raise ValueError(f"adapter config needs a 'method' (or 'type') key, e.g. {{'method': 'FLoRA', 'r': 4}}; "
                         f'got keys {sorted(data)}')
    cls = get_config_class(method)
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - valid)
    if unknown:
        raise ValueError(f'unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(valid)}'
                         f'{_mpc_hint(cls, unknown)}')
    return cls


def config_from_dict(data: Mapping[str, Any]) -> AdapterConfig:
    """Build a config from ``{'method'|'type': name, **fields}`` (JSON files, mm configs)."""
    cls = check_spec_fields(data)
    return cls.from_dict({k: v for k, v in data.items() if k not in ('method', 'type')})


Defaults = Optional[Union[Mapping[str, Any], Callable[[Type[AdapterConfig]], Mapping[str, Any]]]]


def parse_adapter_spec(spec: AdapterSpec, defaults: Defaults = None) -> AdapterConfig:
    """The config for an adapter spec: an :class:`AdapterConfig` (returned as is), a method name, or a dict with a
    ``'method'`` (or ``'type'``) key and config fields.

    Args:
        spec: the spec.
        defaults: field values for fields a name or dict leaves out, or a function of the config class returning
            them (integrations use it for their targets, e.g. mmdet's ``include=['backbone.*']``). Fields the
            method does not have are ignored.
    Raises:
        ValueError naming the bad method or field; TypeError for another kind of spec.
    """
    if isinstance(spec, AdapterConfig):
        return spec
    if isinstance(spec, str):
        data: Dict[str, Any] = {'method': spec}
    elif isinstance(spec, Mapping):
        data = dict(spec)
        if 'method' not in data and 'type' not in data:
            raise ValueError(f"an adapter dict needs a 'method' (or 'type') key naming a visadapt method, e.g. "
                             f"{{'method': 'FLoRA', 'r': 4}}; got keys {sorted(data)}")
    else:
        raise TypeError(f'an adapter must be an AdapterConfig, a method name or a dict with a "method" key, got '
                        f'{type(spec).__name__}')
    cls = get_config_class(data.get('method', data.get('type')))
    extra = defaults(cls) if callable(defaults) else (defaults or {})
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in extra.items():
        if key in names and key not in data:
            data[key] = value
    return config_from_dict(data)
