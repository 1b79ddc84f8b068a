"""Test helper for tests/integrations/test_mm.py: a hook that writes what a training or test process holds in memory.

The stock ``tools/train.py`` / ``tools/test.py`` processes import it through ``custom_imports`` (the test puts this
folder on PYTHONPATH); the test process imports :func:`prediction_tensors` to compare its own predictions the same way.
"""
import json
import os
from itertools import chain
from typing import Dict, List, Optional

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

__all__ = ['RankDumpHook', 'prediction_tensors']


def prediction_tensors(samples: List, prefix: str = '') -> Dict[str, torch.Tensor]:
    """The predicted tensors of mmdet/mmseg data samples: boxes, scores, labels and masks, or the segmentation
    logits and map, under ``<prefix><i>.<name>``."""
    out = {}
    for i, sample in enumerate(samples):
        if 'pred_instances' in sample:
            pred = sample.pred_instances
            fields = {'bboxes': pred.bboxes, 'scores': pred.scores, 'labels': pred.labels}
            if 'masks' in pred:
                fields['masks'] = pred.masks.to(torch.uint8)
        else:
            fields = {'seg_logits': sample.seg_logits.data, 'pred_sem_seg': sample.pred_sem_seg.data}
        out.update({f'{prefix}{i}.{k}': v.detach().cpu().contiguous() for k, v in fields.items()})
    return out


@HOOKS.register_module()
class RankDumpHook(Hook):
    """Writes into the work dir:

    * ``before_train`` / ``after_train``: every parameter and buffer of this rank's model (non-persistent buffers such
      as SVFT's bases included) to ``{start,end}_rank<r>.safetensors``, and the runner's model class to
      ``rank<r>.wrapped``;
    * after a validation or test epoch: its metrics (``<mode>_metrics.json``) and predictions
      (``<mode>_outputs.safetensors``);
    * after training, on rank 0, with ``probe_image``: the predictions of the model in memory through mmdet's
      ``inference_detector`` or mmseg's ``inference_model`` (``memory_outputs.safetensors``).
    """

    def __init__(self, probe_image: Optional[str] = None):
        self.probe_image = probe_image
        self._outputs: Dict[str, torch.Tensor] = {}

    def _save(self, runner, name: str, tensors: Dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file
        save_file(tensors, os.path.join(runner.work_dir, name))

    def _dump_model(self, runner, stage: str) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        tensors = {k: v.detach().cpu().clone().contiguous()
                   for k, v in chain(model.named_parameters(), model.named_buffers())}
        self._save(runner, f'{stage}_rank{runner.rank}.safetensors', tensors)
        with open(os.path.join(runner.work_dir, f'rank{runner.rank}.wrapped'), 'w') as f:
            f.write(type(runner.model).__name__)

    def before_train(self, runner) -> None:
        self._dump_model(runner, 'start')

    def after_train(self, runner) -> None:
        self._dump_model(runner, 'end')
        if self.probe_image is None or runner.rank != 0:
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        model.cfg = runner.cfg  # what init_detector / init_model set, and the inference functions read
        model.eval()  # as init_detector / init_model leave it
        if runner.cfg.get('default_scope') == 'mmdet':
            from mmdet.apis import inference_detector
            sample = inference_detector(model, self.probe_image)
        else:
            from mmseg.apis import inference_model
            sample = inference_model(model, self.probe_image)
        self._save(runner, 'memory_outputs.safetensors', prediction_tensors([sample]))

    def _record(self, batch_idx: int, outputs) -> None:
        self._outputs.update(prediction_tensors(outputs, prefix=f'{batch_idx}.'))

    def after_val_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._record(batch_idx, outputs)

    def after_test_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._record(batch_idx, outputs)

    def _epoch_done(self, runner, mode: str, metrics) -> None:
        if runner.rank == 0:
            with open(os.path.join(runner.work_dir, f'{mode}_metrics.json'), 'w') as f:
                json.dump({k: float(v) for k, v in (metrics or {}).items()}, f)
            self._save(runner, f'{mode}_outputs.safetensors', self._outputs)
        self._outputs = {}

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._epoch_done(runner, 'val', metrics)

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._epoch_done(runner, 'test', metrics)
