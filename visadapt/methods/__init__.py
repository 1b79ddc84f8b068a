"""Adapter methods. Importing a method module registers it; add new methods to ``_METHOD_MODULES``."""
from importlib import import_module

_METHOD_MODULES = ('flora', 'lora')

for _name in _METHOD_MODULES:
    import_module(f'{__name__}.{_name}')

from .flora import FLoRAConfig  # noqa: E402
from .lora import LoRAConfig  # noqa: E402
