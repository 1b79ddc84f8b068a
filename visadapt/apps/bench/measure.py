"""Measurements of one model's configurations: training steps timed round-robin, peak memory and top ops of one
profiled step, the merged = unmerged check and merged inference.

Round-robin timing: all configurations of a model live in memory at once and are stepped in turn, the starting
configuration rotating every repeat, with Python's GC paused, so slow drifts of a shared machine hit every
configuration alike.

Peak memory of one training step = the bytes held before the step (parameters, buffers, optimizer state, the input)
+ the high-water mark of what the step allocates on top. On CPU the step's allocations and frees are read from
``torch.profiler`` (``profile_memory=True``: every allocation of PyTorch's CPU allocator, inside ops and autograd
included) and replayed in time order; a process RSS high-water mark cannot be used because it is per-process and
monotonic, and every configuration lives in the same process. On CUDA the same quantity comes from
``torch.cuda.max_memory_allocated`` (reset before the step) minus what was allocated when the step started.
"""
from __future__ import annotations

import contextlib
import gc
import time
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn

import visadapt

from .configurations import Candidate
from .workloads import Workload

__all__ = ['CLOCKS', 'sync', 'zero_grads', 'train_step', 'time_round_robin', 'static_bytes', 'event_tree',
           'is_op', 'memory_and_top_ops', 'check_merge', 'time_inference']

#: ``--clock``: wall time, or process CPU time (robust to other processes with ``--threads 1``)
CLOCKS: Dict[str, Callable[[], float]] = {'wall': time.perf_counter, 'cpu': time.process_time}


def sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def zero_grads(work: Workload, cand: Candidate) -> None:
    if cand.optimizer is not None:
        cand.optimizer.zero_grad(set_to_none=True)
    else:
        for p in cand.params:
            p.grad = None
    work.inputs[0].grad = None


def train_step(work: Workload, cand: Candidate, model: nn.Module = None) -> None:
    """Forward + backward (+ optimizer step): the unit every ratio is about. ``model``: run this module (e.g. the
    compiled one) instead of ``cand.model``; it must share ``cand``'s parameters."""
    zero_grads(work, cand)
    loss = work.forward(cand.model if model is None else model).float().mean()
    loss.backward()
    if cand.optimizer is not None:
        cand.optimizer.step()


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def time_round_robin(cands: Sequence[Any], run: Callable[[Any], None], sink: Callable[[Any], List[float]],
                     warmup: int, steps: int, device: str, clock: Callable[[], float] = time.perf_counter) -> None:
    """Run every candidate once per repeat, rotating the starting one; keep the timings after ``warmup`` repeats."""
    cands = list(cands)
    with _no_gc():
        for rep in range(warmup + steps):
            k = rep % len(cands)
            for cand in cands[k:] + cands[:k]:
                sync(device)
                t0 = clock()
                run(cand)
                sync(device)
                if rep >= warmup:
                    sink(cand).append(clock() - t0)


def _storage_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def static_bytes(work: Workload, cand: Candidate) -> int:
    """Parameters, buffers, optimizer state and inputs held before a step."""
    tensors = [t for m in [cand.model, *cand.extra] for t in (*m.parameters(), *m.buffers())]
    if cand.optimizer is not None:
        tensors += [v for state in cand.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return _storage_bytes(tensors + list(work.inputs))


def event_tree(prof: torch.profiler.profile) -> List[Any]:
    """The roots of the profiler's raw event tree (much faster to walk than ``prof.key_averages()``)."""
    return list(prof.profiler.kineto_results.experimental_event_tree())


def is_op(node: Any) -> bool:
    """An operator or autograd-node event (not a ``record_function`` range such as ``Optimizer.step``)."""
    from torch._C._profiler import RecordScope, _EventType
    return node.tag == _EventType.TorchOp and node.extra_fields.scope != RecordScope.USER_SCOPE


def _walk_profile(prof: torch.profiler.profile) -> Tuple[int, Dict[str, List[float]]]:
    """The high-water mark of bytes allocated minus freed during the profiled region (allocation events replayed in
    time order), and each op's self time (ns) and call count."""
    from torch._C._profiler import _EventType
    allocations, ops = [], {}
    stack = event_tree(prof)
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
        elif node.tag == _EventType.TorchOp:
            child_ns = sum(c.duration_time_ns for c in node.children if c.tag == _EventType.TorchOp)
            entry = ops.setdefault(node.name, [0.0, 0])
            entry[0] += max(node.duration_time_ns - child_ns, 0)
            entry[1] += 1
        stack.extend(node.children)
    allocations.sort(key=lambda e: e[0])
    live = peak = 0
    for _, size in allocations:
        live += size
        peak = max(peak, live)
    return peak, ops


def memory_and_top_ops(work: Workload, cand: Candidate, device: str, top: int = 5) -> None:
    """One profiled training step: peak memory (see the module docstring) and the ops that dominate its time
    (self CPU time; on CUDA the host-side view, which is what the launch overheads show up in)."""
    gc.collect()
    zero_grads(work, cand)
    static = static_bytes(work, cand)
    cuda = device.startswith('cuda')
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=not cuda) as prof:
        train_step(work, cand)
        sync(device)
    step_peak, ops = _walk_profile(prof)
    if cuda:
        step_peak = torch.cuda.max_memory_allocated() - start
    total = sum(ns for ns, _ in ops.values()) or 1.0
    ranked = sorted(ops.items(), key=lambda kv: kv[1][0], reverse=True)[:top]
    cand.info['static_mb'] = static / 2 ** 20
    cand.info['peak_mb'] = (static + step_peak) / 2 ** 20
    cand.info['top_ops'] = [{'op': name, 'self_ms': ns / 1e6, 'share': ns / total, 'calls': calls}
                            for name, (ns, calls) in ranked]


def within(err: float, scale: float, rtol: float) -> bool:
    """``err`` ≤ ``rtol`` relative to the reference's scale (at least 1: absolute near zero)."""
    return bool(err <= rtol * max(scale, 1.0))


def check_merge(work: Workload, cand: Candidate, rtol: float) -> None:
    """Merged output == unmerged output (relative to the output's scale); record the distance to the base output."""
    cand.model.eval()
    inputs = tuple(t.detach() for t in work.inputs)
    with torch.no_grad():
        adapted = work.forward(cand.model, inputs).float()
        if cand.info.get('merge_check'):
            with visadapt.adapters_disabled(cand.model, 'bench'):
                base = work.forward(cand.model, inputs).float()
            cand.info['delta_vs_base'] = (adapted - base).abs().max().item()
        cand.infer_model = cand.merge()
        cand.infer_model.eval()
        merged = work.forward(cand.infer_model, inputs).float()
    if cand.kind == 'base' or cand.info.get('merge_check') is False:
        return
    err = (merged - adapted).abs().max().item()
    cand.info['merge_max_abs_diff'] = err
    cand.info['merged_equals_unmerged'] = within(err, adapted.abs().max().item(), rtol)


def time_inference(work: Workload, cands: List[Candidate], args: Any, clock: Callable[[], float]) -> None:
    """Merged inference (eval, no grad) of every mergeable configuration, round-robin, eager."""
    inputs = tuple(t.detach() for t in work.inputs)

    def infer_step(cand: Candidate) -> None:
        with torch.no_grad():
            work.forward(cand.infer_model, inputs)

    time_round_robin(cands, infer_step, lambda c: c.infer_s, 1, args.steps, args.device, clock)
