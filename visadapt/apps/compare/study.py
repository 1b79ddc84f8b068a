"""The study (``visadapt-compare study``, ``make study``): every setting at the sizes chosen to fit about an hour of
wall time on 2 CPU cores (measured: 72.7 min, 114 CPU-minutes of runs; docs/compare.md has the pilots behind them).

All settings share :data:`STUDY_PROTOCOL`: 3 rates ×3 apart (+1 past a winning end), chosen with seed 0 on the
validation split, then seeds 1-5, and the 2× convergence check of the baselines. Sizes:

* ``conv-efficientnet_lite0`` / ``conv-mobilenetv2_100``: Fashion-MNIST at 48×48, 500 training images, 500
  validation images (from the rest of the training set), 1,000 test images, 6 epochs of batch 32 (90 steps);
* ``conv-efficientnet_lite0-10shot``: 10 images per class (100), the same validation and test images, 12 epochs of
  batch 20 (60 steps);
* ``attention``: openclipart titles, 1,500 training / 500 validation / 1,000 test images, 2 epochs of batch 32
  (92 steps).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from .engine import Setting

__all__ = ['STUDY_PROTOCOL', 'study_settings', 'STUDY_SETTINGS']

STUDY_PROTOCOL: Dict[str, Any] = dict(points=3, factor=3.0, extend=1, sweep_seed=0, seeds=(1, 2, 3, 4, 5), threads=1)

_CONV = dict(image_size=48, val_size=500, test_size=1000, data_seed=0)
#: name -> (kind, settings)
STUDY_SETTINGS: Dict[str, Dict[str, Any]] = {
    'conv-efficientnet_lite0': dict(kind='conv', model='efficientnet_lite0', train_size=500, batch_size=32,
                                    epochs=6, **_CONV),
    'conv-mobilenetv2_100': dict(kind='conv', model='mobilenetv2_100', train_size=500, batch_size=32, epochs=6,
                                 **_CONV),
    'conv-efficientnet_lite0-10shot': dict(kind='conv', model='efficientnet_lite0', shots=10, batch_size=20,
                                           epochs=12, **_CONV),
    'attention': dict(kind='attention', train_images=1500, val_images=500, test_images=1000, batch_size=32,
                      epochs=2),
}


def study_settings(captions: str, only: Optional[Sequence[str]] = None) -> List[Setting]:
    """The study's settings (all, or those named in ``only``), in order."""
    from .attention import RetrievalSetting, RetrievalSettings
    from .conv import ConvSetting, ConvSettings
    unknown = sorted(set(only or ()) - set(STUDY_SETTINGS))
    if unknown:
        raise ValueError(f'--only {unknown}: not settings of the study; valid: {list(STUDY_SETTINGS)}')
    out: List[Setting] = []
    for name, spec in STUDY_SETTINGS.items():
        if only and name not in only:
            continue
        fields = {k: v for k, v in spec.items() if k != 'kind'}
        if spec['kind'] == 'conv':
            out.append(ConvSetting(ConvSettings(**{'train_size': None, **fields}), name=name))
        else:
            out.append(RetrievalSetting(RetrievalSettings(captions=captions, **fields), name=name))
    return out
