"""visadapt: parameter-efficient fine-tuning for vision models (FLoRA, SeRA, SVFT, LoRA and friends).

The public API::

    report = visadapt.inject(model, visadapt.FLoRAConfig(r=8, r3=2, scale=4.0, train_modules=['head']))
    ...train...
    visadapt.save_adapter(model, 'out/adapter')
    visadapt.merge(model)      # inference at exactly the base model's cost

Layers: :mod:`visadapt.core` (mechanisms), :mod:`visadapt.methods` (one file per method), :mod:`visadapt.integrations`
(timm, OpenMMLab, diffusers, open_clip, PEFT glue) and :mod:`visadapt.apps` (the console scripts). Every registered
method's config class is a top-level name (``visadapt.FLoRAConfig``, ...), derived from the registry.
"""
from . import core, methods  # noqa: F401  (importing methods registers every method)
from ._version import __version__
from .core import (
                   METHODS,
                   Adapter,
                   AdapterConfig,
                   InjectReport,
                   Site,
                   adapter_names,
                   adapter_state_dict,
                   adapters_disabled,
                   analysis,
                   budget,
                   config_from_dict,
                   count_parameters,
                   disable_adapter,
                   enable_adapter,
                   get_config_class,
                   inject,
                   load_adapter,
                   load_adapter_state_dict,
                   merge,
                   parse_adapter_spec,
                   register,
                   regularization_loss,
                   remove,
                   save_adapter,
                   summary,
                   unmerge,
)
from .methods import mpc

__all__ = ['inject', 'merge', 'unmerge', 'remove', 'enable_adapter', 'disable_adapter', 'adapters_disabled',
               'summary', 'save_adapter', 'load_adapter', 'adapter_state_dict', 'load_adapter_state_dict',
               'count_parameters', 'adapter_names', 'InjectReport', 'AdapterConfig', 'Adapter', 'Site', 'METHODS',
               'register', 'get_config_class', 'config_from_dict', 'parse_adapter_spec', 'regularization_loss',
               'mpc', 'analysis', 'budget', 'core', 'methods', '__version__']

# every registered method's config class, e.g. FLoRAConfig (derived from the registry: @register is the only step)
globals().update({cls.__name__: cls for cls in METHODS.values()})
__all__ += sorted(cls.__name__ for cls in METHODS.values())
