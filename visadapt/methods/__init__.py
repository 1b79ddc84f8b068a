"""Adapter methods: one module per method, each registering itself with ``@register`` (the only step to add one).

Every module of this package is imported here, so a new ``methods/<name>.py`` is found without editing any list.
Modules starting with ``_`` hold math shared by several methods.
"""
import pkgutil
from importlib import import_module

__all__ = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith('_'))

for _name in __all__:
    import_module(f'{__name__}.{_name}')
