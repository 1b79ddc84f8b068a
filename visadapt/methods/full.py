"""Full fine-tuning and head-only training as configs, so the baselines go through the same API and tools.

Neither adapts a layer (``adapts_layers = False``): ``visadapt.inject`` only sets which base parameters train, and
``save_adapter`` / ``load_adapter`` store and restore exactly those (keys ``trained.<base key>``), so a comparison
script can switch between LoRA, FLoRA, ..., full fine-tuning and a linear probe by changing the config alone.

* :class:`FullFinetuneConfig`: every parameter of the model trains. Trainable = all parameters. Its saved "adapter"
  is a full checkpoint of the model (parameters and buffers). Use it on a model without other adapters.
* :class:`HeadOnlyConfig`: only ``train_modules`` (e.g. ``['head']``, the classifier) train; a linear probe when
  the head is one Linear. Trainable = the parameters of those modules.

ΔW = 0 for both (the output is unchanged at step 0 because no weight changes until the optimizer steps).
``merge``/``unmerge`` have nothing to do; ``remove`` restores the requires_grad flags but not trained values.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.config import AdapterConfig
from ..core.registry import register

__all__ = ['FullFinetuneConfig', 'HeadOnlyConfig']


def _no_targeting(config: AdapterConfig) -> None:
    if config.include is not None or config.exclude or config.target_types is not None:
        raise ValueError(f'{config.method} adapts no layer, so include/exclude/target_types must stay unset; got '
                         f'include={config.include}, exclude={config.exclude}, target_types={config.target_types}')


@dataclass
class FullFinetuneConfig(AdapterConfig):
    """Train every parameter (the full fine-tuning baseline). ``train_modules`` must be empty (everything trains)."""
    method = 'FullFinetune'
    supported_types = ()
    adapts_layers = False
    trains_all = True

    def validate(self) -> None:
        _no_targeting(self)
        if self.train_modules:
            raise ValueError(f'FullFinetune trains every parameter; train_modules must be empty, got '
                             f'{self.train_modules}')


@dataclass
class HeadOnlyConfig(AdapterConfig):
    """Train only ``train_modules`` (e.g. ``['head']``): the head-only / linear-probe baseline."""
    method = 'HeadOnly'
    supported_types = ()
    adapts_layers = False

    def validate(self) -> None:
        _no_targeting(self)
        if not self.train_modules:
            raise ValueError("HeadOnly needs train_modules, the module-name patterns to train (e.g. ['head']); "
                             "got none")


# no per-layer adapter class: register the configs so config_from_dict / load_adapter know the names
register(FullFinetuneConfig)(None)
register(HeadOnlyConfig)(None)
