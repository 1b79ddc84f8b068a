"""Test helper for the torchrun test of test_timm.py: train with visadapt-train-classifier arguments, then write this
rank's model state (adapters, weights and buffers) to ``DUMP_DIR/rank<r>.safetensors``.

Usage: ``torchrun --nproc_per_node 2 _timm_rank_dump.py DUMP_DIR [visadapt-train-classifier arguments]``.
"""
import os
import sys

import torch
from safetensors.torch import save_file

from visadapt.apps import train_classifier as classify


def main() -> None:
    dump_dir, argv = sys.argv[1], sys.argv[2:]
    args = classify.parse_args(argv)
    trainer = classify.train(args)
    state = {k: v.detach().to('cpu', copy=True).contiguous() for k, v in trainer.model.state_dict().items()}
    save_file(state, os.path.join(dump_dir, f'rank{args.rank}.safetensors'))
    classify.finish(trainer, 0.0)
    torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()
