"""One model through every phase of the bench: build the configurations, time eager steps round-robin, measure
memory, profile (``--profile``), compile and time (``--compile``), check merged = unmerged and time merged inference,
then time the per-layer path choice; and the rows of the JSON/markdown tables.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import visadapt
from visadapt.core.budget import BudgetCounter

from .breakdown import profile_step
from .compiled import compile_and_time
from .configurations import Candidate, build_candidates, model_budget
from .measure import CLOCKS, check_merge, memory_and_top_ops, time_inference, time_round_robin, train_step
from .paths import path_choice
from .workloads import Workload, build_workload

__all__ = ['bench_model', 'config_rows', 'profiled']

Log = Callable[[str], None]


def _time_eager(work: Workload, cands: List[Candidate], args: argparse.Namespace, log: Log) -> None:
    log(f'[{work.name}] timing {len(cands)} configurations: {args.warmup} warm-up + {args.steps} steps, round-robin')
    t0 = time.perf_counter()
    time_round_robin(cands, lambda c: train_step(work, c), lambda c: c.step_s, args.warmup, args.steps, args.device,
                     CLOCKS[args.clock])
    log(f'[{work.name}] training steps done ({time.perf_counter() - t0:.1f}s)')
    for cand in cands:
        memory_and_top_ops(work, cand, args.device)


def profiled(cands: List[Candidate], wanted: List[str]) -> List[Candidate]:
    """The configurations ``--profile`` names (by ``--methods`` key or table label, case-insensitive), in that
    order."""
    out = []
    for name in wanted:
        out += [c for c in cands if name.lower() in (c.key.lower(), c.name.lower()) and c not in out]
    return out


def _profiles(work: Workload, cands: List[Candidate], args: argparse.Namespace, log: Log) -> List[Dict[str, Any]]:
    chosen = profiled(cands, args.profile_list)
    found = {n for n in args.profile_list if any(n.lower() in (c.key.lower(), c.name.lower()) for c in chosen)}
    missing = [n for n in args.profile_list if n not in found]
    if missing:
        log(f'[{work.name}] --profile: {missing} not among this model\'s configurations (a method that cannot adapt '
            f'its layers is skipped)')
    out = []
    for cand in chosen:
        t0 = time.perf_counter()
        out.append(profile_step(work, cand, args))
        log(f'[{work.name}] profiled {cand.name} ({time.perf_counter() - t0:.1f}s)')
    return out


def _merged_inference(work: Workload, cands: List[Candidate], args: argparse.Namespace, log: Log) -> None:
    rtol = 1e-4 if args.dtype == 'float32' and args.amp == 'none' else 2e-2
    infer = [c for c in cands if c.merge is not None]
    for cand in infer:
        check_merge(work, cand, rtol)
    time_inference(work, infer, args, CLOCKS[args.clock])
    log(f'[{work.name}] memory, merge check and inference done')


def _path_rows(work: Workload, matched: Dict[str, visadapt.AdapterConfig], args: argparse.Namespace,
               log: Log) -> List[Dict[str, Any]]:
    if args.no_path_choice:
        return []
    wanted = {m.strip().lower() for m in args.path_methods.split(',')}
    rows: List[Dict[str, Any]] = []
    for m, config in matched.items():
        cls = visadapt.get_config_class(m)
        if ('all' in wanted or m in wanted) and cls.adapter_cls.has_bypass and cls.adapter_cls.has_weight_path:
            t0 = time.perf_counter()
            rows += path_choice(work, m, config, args)
            log(f'[{work.name}] path choice for {cls.method} ({time.perf_counter() - t0:.1f}s)')
    return rows


def bench_model(key: str, args: argparse.Namespace, log: Log) -> Dict[str, Any]:
    """Every phase for model ``key`` (at ``args.batch_size`` × ``args.image_size``); returns its JSON entry."""
    work = build_workload(key, args)
    counter = BudgetCounter(work.model)
    budget, budget_from = model_budget(work, args, counter)
    log(f'[{key}] {len(work.targets)} target layers, budget {budget:,} trainable ({budget_from})')
    cands, matched = build_candidates(work, args, budget, counter, log)
    _time_eager(work, cands, args, log)
    profiles = _profiles(work, cands, args, log) if args.profile_list else []
    compiled = compile_and_time(work, cands, args, CLOCKS[args.clock], log) if args.compile else None
    _merged_inference(work, cands, args, log)
    path_rows = _path_rows(work, matched, args, log)
    return {'model': key, 'batch_size': args.batch_size, 'image_size': args.image_size,
            'inputs': {n: list(t.shape) for n, t in zip(work.input_names, work.inputs)}, 'targets': len(work.targets),
            'budget': budget, 'budget_from': budget_from, 'configs': config_rows(cands), 'compile': compiled,
            'profile': profiles, 'path_choice': path_rows}


def _median_ms(xs: List[float]) -> Optional[float]:
    return 1e3 * statistics.median(xs) if xs else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def config_rows(cands: List[Candidate]) -> List[Dict[str, Any]]:
    """One JSON row per configuration: its facts, medians and ratios to the frozen base and PEFT LoRA (eager and
    compiled each against its own kind; compiled ÷ eager against the eager steps timed alongside the compiled ones)."""
    ref = {c.kind: c for c in cands if c.kind in ('base', 'peft')}
    base, peft = ref['base'], ref.get('peft')
    base_step, base_infer = _median_ms(base.step_s), _median_ms(base.infer_s)
    base_compiled = _median_ms(base.compiled_step_s)
    rows = []
    for c in cands:
        step, infer, compiled = _median_ms(c.step_s), _median_ms(c.infer_s), _median_ms(c.compiled_step_s)
        row = {'name': c.name, 'kind': c.kind, 'key': c.key, **c.info, 'step_ms': step,
               'step_ms_all': [1e3 * s for s in c.step_s], 'step_vs_base': step / base_step,
               'step_vs_peft': _ratio(step, _median_ms(peft.step_s)) if peft else None,
               'peak_vs_base': c.info['peak_mb'] / base.info['peak_mb'],
               'peak_vs_peft': c.info['peak_mb'] / peft.info['peak_mb'] if peft else None,
               'infer_ms': infer, 'infer_vs_base': _ratio(infer, base_infer)}
        if c.compiled_step_s or 'compile_error' in c.info:
            row.update({'compiled_step_ms': compiled, 'compiled_step_ms_all': [1e3 * s for s in c.compiled_step_s],
                        'compiled_vs_base': _ratio(compiled, base_compiled),
                        'compiled_vs_eager': _ratio(compiled, c.info.get('eager_step_ms_paired'))})
        row.setdefault('notes', [])
        rows.append(row)
    return rows
