"""visadapt: parameter-efficient fine-tuning for vision models (FLoRA, SeRA, SVFT, LoRA and friends).

The public API::

    report = visadapt.inject(model, visadapt.FLoRAConfig(r=8, r3=2, scale=4.0, train_modules=['head']))
    ...train...
    visadapt.save_adapter(model, 'out/adapter')
    visadapt.merge(model)      # inference at exactly the base model's cost
"""
__version__ = '0.1.0'

from .config import AdapterConfig, METHODS, config_from_dict, get_config_class, register  # noqa: E402
from .adapter import Adapter  # noqa: E402
from .site import Site  # noqa: E402
from .tuner import (inject, merge, unmerge, remove, enable_adapter, disable_adapter, adapters_disabled,  # noqa: E402
                    summary, count_parameters, adapter_names, InjectReport)
from .io import save_adapter, load_adapter, adapter_state_dict, load_adapter_state_dict  # noqa: E402
from .methods import *  # noqa: E402,F401,F403
from .methods import FLoRAConfig, LoRAConfig  # noqa: E402
from .methods import (DoRAConfig, VeRAConfig, IA3Config, SSLConfig, SSBConfig, BitFitConfig, MELoRAConfig,  # noqa: E402
                      MoSLoRAConfig, FullFinetuneConfig, HeadOnlyConfig, SeRAConfig, SVFTConfig)
from .mpc import regularization_loss  # noqa: E402
from . import analysis, mpc  # noqa: E402

__all__ = ['inject', 'merge', 'unmerge', 'remove', 'enable_adapter', 'disable_adapter', 'adapters_disabled',
           'summary', 'save_adapter', 'load_adapter', 'adapter_state_dict', 'load_adapter_state_dict',
           'count_parameters', 'adapter_names', 'InjectReport', 'AdapterConfig', 'Adapter', 'Site', 'METHODS',
           'register', 'get_config_class', 'config_from_dict', 'FLoRAConfig', 'LoRAConfig',
           'DoRAConfig', 'VeRAConfig', 'IA3Config', 'SSLConfig', 'SSBConfig', 'BitFitConfig', 'MELoRAConfig',
           'MoSLoRAConfig', 'FullFinetuneConfig', 'HeadOnlyConfig', 'SeRAConfig', 'SVFTConfig', 'regularization_loss',
           'mpc', 'analysis']
