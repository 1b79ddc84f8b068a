"""``--compile``: every configuration's model through ``torch.compile`` (inductor by default), checked against eager
and timed round-robin like the eager steps.

For each configuration: one eager forward + backward at the current parameters gives the reference output and
gradients (parameters and input); the first compiled forward + backward (which compiles the forward and, via
AOTAutograd, the backward) is timed as the **compile time** and its output and gradients are compared with the
reference (``compiled_equals_eager``, like merged = unmerged); then the optimizer steps. The compiled steps are
timed round-robin after ``--warmup`` repeats, interleaved with eager steps of the same configurations
(``eager_step_ms_paired``), so compiled ÷ eager compares steps of the same minutes. The optimizer step and merged
inference stay eager.

All configurations of a model compile the same top-level ``forward`` code object, each with its own guards, so
Dynamo's recompile limit (8 entries per code object) is raised for the duration: past it Dynamo would silently run
the remaining configurations eager. Inductor's FX-graph and AOTAutograd caches are off, so the compile time does not
depend on an earlier run (compiled C++ kernels already on disk are still reused).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch

from .configurations import Candidate
from .measure import sync, time_round_robin, train_step, zero_grads
from .workloads import Workload

__all__ = ['BACKENDS', 'compile_tolerance', 'compile_and_time']

#: ``--compile-backend``: inductor (the real thing), or the tracing-only backends for fast checks of the plumbing
BACKENDS = ('inductor', 'aot_eager', 'eager')


def compile_tolerance(args: argparse.Namespace) -> float:
    """Largest relative difference compiled vs eager: inductor fuses ops and reorders reductions, so float32 sums
    differ in rounding; reduced precision (bf16/fp16 weights or autocast) far more."""
    return 1e-3 if args.dtype == 'float32' and args.amp == 'none' else 5e-2


@contextlib.contextmanager
def _compile_settings(n_configs: int, backend: str) -> Iterator[None]:
    import torch._dynamo
    limit = max(torch._dynamo.config.recompile_limit, 2 * n_configs + 8)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch._dynamo.config.patch(recompile_limit=limit, accumulated_recompile_limit=max(
            torch._dynamo.config.accumulated_recompile_limit, 4 * limit)))
        if backend == 'inductor':
            import torch._functorch.config
            import torch._inductor.config
            stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
            stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
        yield


def _forward_backward(work: Workload, cand: Candidate, model: torch.nn.Module) -> List[Optional[torch.Tensor]]:
    """Output and gradients (trainable parameters, then the input) of one forward + backward, no optimizer step."""
    zero_grads(work, cand)
    out = work.forward(model).float()
    out.mean().backward()
    grads = [p.grad for p in cand.params] + [work.inputs[0].grad]
    return [out.detach()] + [None if g is None else g.detach().clone() for g in grads]


def _max_rel_diff(ref: List[Optional[torch.Tensor]], got: List[Optional[torch.Tensor]]) -> float:
    """Largest per-tensor max|Δ| / max|ref| (a tensor's scale floored at 1e-6 of the largest, so exact zeros in
    one gradient are judged against the others); inf when one side has a gradient the other lacks."""
    scales = [0.0 if r is None else r.abs().max().item() for r in ref]
    floor = 1e-6 * max(scales + [1e-30])
    worst = 0.0
    for r, g, scale in zip(ref, got, scales):
        if (r is None) != (g is None) or (r is not None and r.shape != g.shape):
            return float('inf')
        if r is not None:
            worst = max(worst, (g.float() - r.float()).abs().max().item() / max(scale, floor))
    return worst


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters
    return sum(counters['graph_break'].values())


def compile_one(work: Workload, cand: Candidate, args: argparse.Namespace) -> None:
    """Compile ``cand.model``, time its first (compiling) step and check it against eager (see the module doc)."""
    ref = _forward_backward(work, cand, cand.model)
    breaks = _graph_breaks()
    cand.compiled = torch.compile(cand.model, backend=args.compile_backend)
    sync(args.device)
    t0 = time.perf_counter()
    try:
        got = _forward_backward(work, cand, cand.compiled)
    except Exception as err:  # recorded in the row and the markdown; the other configurations still run
        cand.compiled = None
        cand.info['compile_error'] = f'{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}'
        return
    sync(args.device)
    cand.info['compile_s'] = time.perf_counter() - t0
    if cand.optimizer is not None:
        cand.optimizer.step()
    diff = _max_rel_diff(ref, got)
    cand.info['compiled_graph_breaks'] = _graph_breaks() - breaks
    cand.info['compiled_max_rel_diff'] = diff
    cand.info['compiled_equals_eager'] = bool(diff <= compile_tolerance(args))


def _time_paired(work: Workload, cands: List[Candidate], args: argparse.Namespace, clock: Callable[[], float]
                 ) -> None:
    """Compiled steps round-robin together with eager steps of the same configurations, so compiled ÷ eager
    compares steps taken in the same minutes (the eager phase ran earlier, under whatever load the host had then)."""
    if not cands:
        return
    eager: Dict[int, List[float]] = {id(c): [] for c in cands}
    pairs = [(c, False) for c in cands] + [(c, True) for c in cands]
    time_round_robin(pairs, lambda pc: train_step(work, pc[0], pc[0].compiled if pc[1] else None),
                     lambda pc: pc[0].compiled_step_s if pc[1] else eager[id(pc[0])],
                     args.warmup, args.steps, args.device, clock)
    for cand in cands:
        cand.info['eager_step_ms_paired'] = 1e3 * statistics.median(eager[id(cand)])


def compile_and_time(work: Workload, cands: List[Candidate], args: argparse.Namespace,
                     clock: Callable[[], float], log: Callable[[str], None]) -> Dict[str, Any]:
    """Compile every configuration, check it, time the compiled steps round-robin; returns the model-level facts."""
    import torch._dynamo
    torch._dynamo.reset()
    t_all = time.perf_counter()
    with _compile_settings(len(cands), args.compile_backend):
        for cand in cands:
            compile_one(work, cand, args)
            log(f"[{work.name}] compiled {cand.name}: " + (
                f"{cand.info['compile_s']:.1f}s, {cand.info['compiled_graph_breaks']} graph breaks, "
                f"max rel diff vs eager {cand.info['compiled_max_rel_diff']:.1e}" if 'compile_s' in cand.info
                else cand.info['compile_error']))
        _time_paired(work, [c for c in cands if c.compiled is not None], args, clock)
    for cand in cands:
        cand.compiled = None  # the merge check changes the weights in place: no compiled step after this point
    torch._dynamo.reset()
    return {'backend': args.compile_backend, 'wall_s': time.perf_counter() - t_all,
            'tolerance': compile_tolerance(args)}
