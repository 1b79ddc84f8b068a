"""Adapter methods. Importing a method module registers it; add new methods to ``_METHOD_MODULES``."""
from importlib import import_module

_METHOD_MODULES = ('flora', 'lora', 'dora', 'vera', 'ia3', 'ssl', 'ssb', 'bitfit', 'melora', 'moslora', 'full',
                  'sera', 'svft')

for _name in _METHOD_MODULES:
    import_module(f'{__name__}.{_name}')

from .flora import FLoRAConfig  # noqa: E402
from .lora import LoRAConfig  # noqa: E402
from .dora import DoRAConfig  # noqa: E402
from .vera import VeRAConfig  # noqa: E402
from .ia3 import IA3Config  # noqa: E402
from .ssl import SSLConfig  # noqa: E402
from .ssb import SSBConfig  # noqa: E402
from .bitfit import BitFitConfig  # noqa: E402
from .melora import MELoRAConfig  # noqa: E402
from .moslora import MoSLoRAConfig  # noqa: E402
from .full import FullFinetuneConfig, HeadOnlyConfig  # noqa: E402
from .sera import SeRAConfig  # noqa: E402
from .svft import SVFTConfig  # noqa: E402
