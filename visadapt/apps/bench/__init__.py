"""``visadapt-bench``: every registered visadapt method against the frozen base, the weight-gradient limit, PEFT and
LyCORIS, on the same layers at matched trainable budgets (issues 8 and 18). docs/bench.md has the results.

For each model (:mod:`.workloads`) and each configuration (:mod:`.configurations`):

* **training step** time: forward + backward + AdamW step (``--optimizer``: fused by default), median of ``--steps``
  timed steps after ``--warmup``, all configurations stepped round-robin (:mod:`.measure`);
* **compiled** training step (``--compile``): the same, through ``torch.compile``, with the compile time and a
  compiled = eager check of outputs and gradients (:mod:`.compiled`);
* **peak memory** of one training step and its top ops (:mod:`.measure`);
* **profile** (``--profile``): self time per op category and per adapted layer, op calls, Python/dispatch overhead
  (:mod:`.breakdown`);
* **merged inference** latency and the merged = unmerged check (:mod:`.measure`);
* **forward-path choice per layer** for methods with a weight path and a bypass (:mod:`.paths`), and ``--refit`` of
  the path-cost constants to those timings (:mod:`.refit`).

Reference configurations on the same layers: ``base`` (frozen; the input requires grad so the backward runs
through every layer), ``weight-grad limit`` (only the adapted layers' weights get gradients, no optimizer step: the
least any adapter that materializes ΔW pays), ``PEFT LoRA`` (depthwise convs it refuses are left out and recorded),
``LyCORIS LoCon`` / ``Tucker`` in rebuild and bypass mode. Visadapt methods come from ``visadapt.METHODS``, each
matched to the budget by ``visadapt.core.budget.match_budget``.

Outputs in ``--out``: ``bench.json``, ``bench.md`` (tables, :mod:`.report`) and ``bench.png``. :func:`main` is the
console script (exit status 1 when a correctness check failed); :func:`run` returns the JSON content.
"""
from __future__ import annotations

from .cli import main, parse_args, run
from .runner import bench_model

__all__ = ['main', 'run', 'parse_args', 'bench_model']
