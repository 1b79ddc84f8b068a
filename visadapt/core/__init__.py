"""The core: every mechanism written once, for every method and every integration.

* geometry and the layer's own op: :mod:`.site`; the per-layer contract: :mod:`.adapter`; exact factored forms:
  :mod:`.factors`; the path choice: :mod:`.path_cost`; fused q/k/v slices: :mod:`.slices`;
* configs and the method registry (with the one adapter-spec parser): :mod:`.config`, :mod:`.registry`;
* target selection: :mod:`.selection`; adapted layers and their weights with adapters folded in: :mod:`.layer`,
  :mod:`.attention`;
* model-level operations: :mod:`.tuner` (inject, remove, enable/disable, summary), :mod:`.merging` (merge, unmerge);
* checkpoints (schema, validator, files): :mod:`.io`; fingerprints of frozen tensors: :mod:`.fingerprint`;
* built on those: :mod:`.analysis` (what an adapter learned), :mod:`.budget` (rank for a parameter budget).

Integrations and applications import from here (``from visadapt.core import ...``), never from a submodule.
"""
from . import analysis, budget
from . import attention as _attention  # noqa: F401  (registers the adapted nn.MultiheadAttention class)
from .adapter import FORWARD_PATHS, Adapter
from .config import AdapterConfig, check_positive_int
from .factors import Factors, stack_factors
from .fingerprints import fingerprint, fingerprint_mismatch
from .io import (
                 CONFIG_NAME,
                 WEIGHTS_NAME,
                 adapter_file_key,
                 adapter_metadata,
                 adapter_state_dict,
                 adapter_state_keys,
                 atomic_write_bytes,
                 atomic_write_files,
                 check_adapter_metadata,
                 check_state_dict,
                 load_adapter,
                 load_adapter_state_dict,
                 read_adapter,
                 read_state_dict,
                 save_adapter,
                 trained_file_key,
)
from .layer import ADAPTER_ATTR, fold_adapters, is_adapted, is_adapter_key, iter_adapted
from .registry import (
                 METHODS,
                 AdapterSpec,
                 check_spec_fields,
                 config_from_dict,
                 get_config_class,
                 method_names,
                 parse_adapter_spec,
                 register,
)
from .regularization import attach_regularizer, detach_regularizer, mpc_loss, regularization_loss
from .selection import matches, select_targets, select_train_modules
from .site import SUPPORTED_LAYER_TYPES, Site, base_bias, base_weight, is_plain_layer, site_from_module
from .tuner import (
                 Injection,
                 InjectReport,
                 Summary,
                 adapter_names,
                 adapters_disabled,
                 build_adapter,
                 count_parameters,
                 disable_adapter,
                 enable_adapter,
                 get_injection,
                 inject,
                 merge,
                 remove,
                 summary,
                 unmerge,
)

__all__ = [
    # model-level operations
    'inject', 'merge', 'unmerge', 'remove', 'enable_adapter', 'disable_adapter', 'adapters_disabled', 'summary',
    'Summary', 'InjectReport', 'Injection', 'get_injection', 'adapter_names', 'count_parameters', 'build_adapter',
    # configs, registry, specs
    'AdapterConfig', 'check_positive_int', 'METHODS', 'register', 'get_config_class', 'config_from_dict',
    'method_names', 'parse_adapter_spec', 'check_spec_fields', 'AdapterSpec',
    # layers, adapters, forms
    'Adapter', 'FORWARD_PATHS', 'Factors', 'stack_factors', 'Site', 'site_from_module', 'base_weight', 'base_bias',
    'is_plain_layer', 'SUPPORTED_LAYER_TYPES', 'ADAPTER_ATTR', 'is_adapter_key', 'is_adapted', 'iter_adapted',
    'fold_adapters', 'matches', 'select_targets', 'select_train_modules',
    # checkpoints
    'save_adapter', 'load_adapter', 'adapter_state_dict', 'adapter_state_keys', 'load_adapter_state_dict',
    'adapter_metadata', 'check_adapter_metadata', 'check_state_dict', 'adapter_file_key', 'trained_file_key',
    'read_adapter', 'read_state_dict', 'atomic_write_bytes', 'atomic_write_files', 'CONFIG_NAME', 'WEIGHTS_NAME',
    'fingerprint', 'fingerprint_mismatch',
    # built on the core
    'analysis', 'budget', 'regularization_loss', 'attach_regularizer', 'detach_regularizer', 'mpc_loss',
]
