"""Test helper for the DDP test of test_mm.py: a hook that writes each rank's adapter tensors after training.

Imported by the training processes through ``custom_imports`` (the test puts this folder on PYTHONPATH).
"""
import os

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class RankDumpHook(Hook):
    """After training, save ``adapter_state_dict(model)`` of this rank to ``<work_dir>/rank<r>.safetensors``."""

    def after_train(self, runner) -> None:
        from safetensors.torch import save_file

        import visadapt
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        state = {k: v.cpu().contiguous() for k, v in visadapt.adapter_state_dict(model).items()}
        save_file(state, os.path.join(runner.work_dir, f'rank{runner.rank}.safetensors'))
        with open(os.path.join(runner.work_dir, f'rank{runner.rank}.wrapped'), 'w') as f:
            f.write(type(runner.model).__name__)
