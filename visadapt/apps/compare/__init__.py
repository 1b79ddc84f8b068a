"""``visadapt-compare``: comparisons that can tell PEFT methods apart (docs/compare.md).

Per method: a learning-rate sweep judged on a validation split carved from the training data (never the test split),
then several seeds at the chosen rate; the table gives each method's test mean with its 95% t-interval and its
difference from LoRA at an equal trainable budget, paired by seed, with that difference's interval and the paired
t-test p-value. Two settings:

* ``conv`` (:mod:`.conv`): a pretrained timm CNN (EfficientNet-Lite0, MobileNetV2: packaged weights, offline) on an
  in-memory image set (Fashion-MNIST), every conv adapted: full fine-tuning, head-only, BitFit, LoRA (chain and
  reshape), DoRA, FLoRA, FLoRA + MPC_o, SVFT; also k-shot (``--shots``);
* ``attention`` (:mod:`.attention`): two-tower image–text retrieval (packaged EfficientNet-Lite0 + packaged MiniLM) on
  openclipart images and their titles, adapters on the text tower's query and value: LoRA, SeRA, MELoRA, MoSLoRA,
  VeRA, SVFT (plain, banded), LoRA + MPC_o / MPC_d; the SeRA paper's Sum of R@1/5/10 both ways.

``study`` runs every setting at the study's sizes (:mod:`.study`) and ``docs`` writes a finished study's tables and
the verdicts on the papers' claims into README.md and docs/compare.md (:mod:`.report`). Runs are resumable
(:mod:`.engine`); statistics in :mod:`.stats`.
"""
from __future__ import annotations

from .cli import build_parser, main

__all__ = ['main', 'build_parser']
