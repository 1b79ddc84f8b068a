#!/usr/bin/env python
"""Fine-tune a timm image classifier with any visadapt method (also installed as ``visadapt-train-classifier``).

The main job (``make demo``): pretrained EfficientNet-Lite0 (packaged weights) + FLoRA on all its convs, on a
Fashion-MNIST subset, on CPU in a few minutes; prints trainable parameters, accuracy before/after and time::

    python tools/train_classifier.py --preset demo

Other examples (see docs/timm.md)::

    python tools/train_classifier.py --data digits --image-size 32 --model convnext_atto --pretrained none \\
        --method LoRA --rank 4 --epochs 3 --output-dir runs/digits-lora
    python tools/train_classifier.py --data path/to/imagefolder --method SVFT --model mobilenetv2_100 --budget 50000

Everything (data loading, training, checkpoints, outputs) lives in :mod:`visadapt.classify`.
"""
import os
import sys

if __package__ in (None, ''):  # run from a source checkout without installing: make `visadapt` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from visadapt.classify import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
