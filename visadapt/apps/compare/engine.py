"""The comparison protocol, the same for every setting: per method, a learning-rate sweep judged on a validation split
carved from the training data, then several seeds at the chosen rate, each run in its own forked process.

A *setting* (:class:`Setting`: the conv classification one in :mod:`.conv`, the retrieval one in :mod:`.attention`)
knows its data, model and methods; this module only schedules runs and keeps their results:

1. **sweep**: every method trains once (``sweep_seed``) at each rate of its grid (``points`` rates, ``factor`` apart,
   centred on the method's own centre) and is scored on the validation split only: a sweep run never evaluates the
   test split, so the choice cannot see it. The best rate wins; when it is at an end of the grid, the grid grows by
   one rate past that end (``extend`` times at most), so the chosen rate is not an artefact of the grid's range. A
   run whose loss became NaN/Inf is a finished run that *diverged* (never chosen).
2. **seeds**: the method trains once per seed at the chosen rate and is scored on the validation and test splits. A
   seed sets the initialization and the data order, the same for every method (the paired comparison relies on it).
3. **check** (rows whose seed runs record validation curves: the baselines whose convergence the schedule must
   show): one more run at the chosen rate with a schedule ``check_scale`` times as long (first seed, validation
   only), so the table can say how much a longer schedule would still have gained.

Every finished run leaves ``runs/<method>/<phase>-lr<rate>-seed<seed>/metrics.json`` (written atomically, with the
run's identity), so a killed comparison continues where it stopped: finished runs are reused, never retrained.
``--jobs`` runs go at a time, one forked child each (the parent's data and imports are shared; a crash or the memory
high-water mark stays in one run), with the child's output in ``run.log`` and a tqdm bar in the parent.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from visadapt.core import atomic_write_bytes

__all__ = ['Variant', 'Row', 'Protocol', 'Setting', 'Job', 'lr_grid', 'choose_lr', 'plan_rows', 'binned_mean', 'run_setting', 'slug',
           'settings_fingerprint']


@dataclass(frozen=True)
class Variant:
    """One method of a comparison: a label, its adapter spec, the centre of its learning-rate grid, and whether its
    rank is matched to the budget (``match=False``: it runs at the size its spec gives)."""
    label: str
    spec: Dict[str, Any]
    lr: float
    match: bool = True


@dataclass
class Row:
    """A variant as planned on the setting's model: the spec it runs with (the budget knob filled in) and its size,
    or why it does not apply (``skip``)."""
    label: str
    spec: Dict[str, Any]
    lr: float
    adapter_params: int = 0
    skip: Optional[str] = None


@dataclass
class Protocol:
    """How rates are swept and seeds run (see the module docstring)."""
    points: int = 3
    factor: float = 3.0
    extend: int = 1
    sweep_seed: int = 0
    seeds: Sequence[int] = (1, 2, 3, 4, 5)
    jobs: int = 2
    threads: int = 1
    check_scale: float = 2.0

    def __post_init__(self) -> None:
        if (self.points < 1 or self.factor <= 1.0 or self.extend < 0 or self.jobs < 1 or self.threads < 1
                or not (self.check_scale == 0 or self.check_scale > 1)):
            raise ValueError(f'protocol: points >= 1, factor > 1, extend >= 0, jobs >= 1, threads >= 1 and '
                             f'check_scale > 1 (or 0: no check) are needed; got points={self.points}, '
                             f'factor={self.factor}, extend={self.extend}, jobs={self.jobs}, threads={self.threads}, '
                             f'check_scale={self.check_scale}')
        if len(set(self.seeds)) != len(self.seeds) or len(self.seeds) < 2:
            raise ValueError(f'seeds: at least 2 distinct seeds are needed for an interval, got {list(self.seeds)}')
        if self.sweep_seed in self.seeds:
            raise ValueError(f'the sweep seed {self.sweep_seed} is also a reported seed {list(self.seeds)}: a run '
                             f'that chose the rate would be scored again; pick another --sweep-seed')


class Setting:
    """What a comparison setting provides (subclassed by :mod:`.conv` and :mod:`.attention`).

    Attributes:
        name: folder name of the setting's results.
        metric: the key of the score in a run's ``val``/``test`` results (higher is better).
        reference: label of the row every other row is compared with (LoRA).
    """
    name: str = ''
    metric: str = ''
    reference: str = ''

    def settings(self) -> Dict[str, Any]:
        """Everything that determines a run's result besides method, rate and seed (JSON-able)."""
        raise NotImplementedError

    def prepare(self, cache: Optional[str] = None) -> None:
        """Load data and models in the parent, once (forked runs inherit them); ``cache``: a folder for files worth
        keeping between invocations."""
        raise NotImplementedError

    def plan(self) -> Tuple[int, List[Row]]:
        """(budget, rows): the budget-matched spec of every variant."""
        raise NotImplementedError

    def train(self, row: Row, lr: float, seed: int, splits: Sequence[str], curve: bool, folder: str,
              scale: float = 1.0) -> Dict[str, Any]:
        """One run in a child process (its files in ``folder``; a schedule ``scale`` times as long as the
        setting's): ``{split: {metric: ...}}`` for each of ``splits``, ``adapter_params``, ``trainable_params``,
        ``steps``, and with ``curve`` the validation scores during training (``curve``: ``[{'step', 'val'}]``)."""
        raise NotImplementedError

    def wants_curve(self, row: Row) -> bool:
        """Whether this row's seed runs record a validation curve (evaluations during training)."""
        return False

    def withhold(self, split: str) -> None:
        """Drop ``split``'s data from this process (a sweep run's child drops the test split before training)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Job:
    """One run: a row at a rate and seed, in the sweep (validation only) or the seed phase (validation and test)."""
    label: str
    phase: str
    lr: float
    seed: int
    scale: float = 1.0

    @property
    def splits(self) -> Tuple[str, ...]:
        return ('val', 'test') if self.phase == 'seeds' else ('val',)

    def folder(self) -> str:
        phase = self.phase if self.scale == 1.0 else f'{self.phase}-x{self.scale:g}'
        return os.path.join('runs', slug(self.label), f'{phase}-lr{self.lr:.3g}-seed{self.seed}')


def slug(label: str) -> str:
    """A folder name for a label: lower case, runs of other characters as one '-'."""
    out = ''.join(c if c.isalnum() else '-' for c in label.lower())
    while '--' in out:
        out = out.replace('--', '-')
    return out.strip('-')


def settings_fingerprint(settings: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def lr_grid(centre: float, points: int, factor: float) -> List[float]:
    """``points`` rates ``factor`` apart, centred on ``centre`` (three significant digits)."""
    return [_round(centre * factor ** (i - (points - 1) / 2)) for i in range(points)]


def _round(lr: float) -> float:
    return float(f'{lr:.3g}')


def choose_lr(val_scores: Dict[float, Optional[float]]) -> Tuple[Optional[float], Optional[str]]:
    """The rate with the best validation score (ties: the smaller rate) and, when that rate is the smallest or the
    largest of several, which end of the grid it is at (``'low'``/``'high'``, else None). Diverged runs (None) never
    win; when all diverged the rate is None and the end is ``'low'`` (a smaller rate is the only way on).

    Only validation scores come in: the test split is not an argument.
    """
    rates = sorted(val_scores)
    finite = [(score, -lr) for lr, score in val_scores.items() if score is not None]
    if not finite:
        return None, 'low'
    best = -max(finite)[1]
    if len(rates) > 1 and best == rates[0]:
        return best, 'low'
    if len(rates) > 1 and best == rates[-1]:
        return best, 'high'
    return best, None


def binned_mean(values: Sequence[float], bins: int = 50) -> List[List[float]]:
    """``[[step, mean of the values in the bin], ...]``: a long per-step series (a training loss) kept short."""
    size = max(1, -(-len(values) // bins))
    return [[min(i + size, len(values)), sum(values[i:i + size]) / len(values[i:i + size])]
            for i in range(0, len(values), size)]


def plan_rows(model: Any, variants: Sequence[Variant], make_config: Any, budget: int) -> List[Row]:
    """Each variant's spec on ``model`` at ``budget`` adapter parameters: methods with a rank get the rank closest to
    it (:func:`visadapt.core.budget.match_budget`), the others run at their own fixed size; a method that cannot
    adapt the model is kept with ``skip`` (the reason).

    Args:
        make_config: ``spec -> AdapterConfig`` with the setting's targets (layers, trained modules).
    """
    from visadapt.core.budget import BudgetCounter, budget_field, match_budget
    counter = BudgetCounter(model)
    rows = []
    for variant in variants:
        row = Row(variant.label, dict(variant.spec), variant.lr)
        try:
            config = make_config(variant.spec)
            knob = budget_field(config) if variant.match else None
            if knob is not None:
                match = match_budget(model, config, budget, counter=counter)
                row.spec[knob], row.adapter_params = match.value, match.achieved
            elif getattr(config, 'adapts_layers', True):
                row.adapter_params = counter(config)
        except (ValueError, TypeError) as err:
            row.skip = str(err)
        rows.append(row)
    return rows


@dataclass
class _RowState:
    row: Row
    grid: List[float]
    extended: int = 0
    sweep_runs: Dict[float, Dict[str, Any]] = field(default_factory=dict)
    chosen: Optional[float] = None
    edge: Optional[str] = None
    runs: Dict[int, Dict[str, Any]] = field(default_factory=dict)
    check: Optional[Dict[str, Any]] = None
    failed: List[str] = field(default_factory=list)


def _child(setting: Setting, job: Job, row: Row, folder: str, threads: int, identity: Dict[str, Any]) -> None:
    """A forked run: output to ``run.log``; the result (or the divergence) to ``metrics.json``, atomically."""
    import torch
    log = open(os.path.join(folder, 'run.log'), 'w')
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    torch.set_num_threads(threads)
    if 'test' not in job.splits:  # a sweep run cannot read what it must not see
        setting.withhold('test')
    cpu, wall = time.process_time(), time.time()
    try:
        result = setting.train(row, job.lr, job.seed, job.splits, curve=job.phase != 'sweep' and
                               setting.wants_curve(row), folder=folder, scale=job.scale)
    except FloatingPointError as err:  # the trainers' signal for a NaN/Inf loss: a finished run that diverged
        result = {'diverged': str(err)}
    result.update(identity=identity, cpu_seconds=time.process_time() - cpu, wall_seconds=time.time() - wall)
    atomic_write_bytes(os.path.join(folder, 'metrics.json'), json.dumps(result, indent=1).encode())
    sys.stdout.flush()


class _Scheduler:
    """Runs the jobs of every row (module docstring), ``protocol.jobs`` at a time, and keeps their results."""

    def __init__(self, setting: Setting, protocol: Protocol, out_dir: str, rows: List[Row]):
        self.setting, self.protocol, self.out_dir = setting, protocol, out_dir
        self.fingerprint = settings_fingerprint(setting.settings())
        self.states = {r.label: _RowState(r, lr_grid(r.lr, protocol.points, protocol.factor))
                       for r in rows if r.skip is None}
        self.queue = [Job(s.row.label, 'sweep', lr, protocol.sweep_seed) for s in self.states.values() for lr in s.grid]
        self.reused = 0

    def _checked(self, state: _RowState) -> bool:
        return self.protocol.check_scale > 0 and self.setting.wants_curve(state.row)

    def total(self) -> int:
        return sum(len(s.grid) + (len(self.protocol.seeds) + self._checked(s) if not s.failed else len(s.runs))
                   for s in self.states.values())

    def identity(self, job: Job) -> Dict[str, Any]:
        return {'setting': self.fingerprint, 'label': job.label, 'spec': self.states[job.label].row.spec,
                'phase': job.phase, 'lr': job.lr, 'seed': job.seed, 'scale': job.scale}

    def _reuse(self, job: Job) -> Optional[Dict[str, Any]]:
        """The finished run's metrics, or None when it has not finished; another run's metrics are an error."""
        path = os.path.join(self.out_dir, job.folder(), 'metrics.json')
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            metrics = json.load(f)
        if metrics.get('identity') != self.identity(job):
            raise ValueError(f'{path} holds another run ({metrics.get("identity")}, expected {self.identity(job)}); '
                             f'use a new --output-dir for other settings')
        return metrics

    def _start(self, job: Job) -> mp.Process:
        folder = os.path.join(self.out_dir, job.folder())
        os.makedirs(folder, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        proc = mp.get_context('fork').Process(
            target=_child, args=(self.setting, job, self.states[job.label].row, folder, self.protocol.threads,
                                 self.identity(job)), daemon=True)
        proc.start()
        return proc

    def run(self) -> None:
        from tqdm import tqdm
        running: Dict[Any, Tuple[mp.Process, Job]] = {}
        with tqdm(total=self.total(), desc=self.setting.name, unit='run', dynamic_ncols=True, file=sys.stderr) as bar:
            while self.queue or running:
                while self.queue and len(running) < self.protocol.jobs:
                    job = self.queue.pop(0)
                    metrics = self._reuse(job)
                    if metrics is not None:
                        self.reused += 1
                        self._finish(job, metrics, bar)
                        continue
                    proc = self._start(job)
                    running[proc.sentinel] = (proc, job)
                for sentinel in mp.connection.wait(list(running)) if running else []:
                    proc, job = running.pop(sentinel)
                    proc.join()
                    metrics = self._reuse(job) if proc.exitcode == 0 else None
                    self._finish(job, metrics, bar, proc.exitcode)

    def _finish(self, job: Job, metrics: Optional[Dict[str, Any]], bar: Any, exitcode: int = 0) -> None:
        state = self.states[job.label]
        if metrics is None:
            log = os.path.join(self.out_dir, job.folder(), 'run.log')
            failure = f'{job.phase} run at lr {job.lr:g}, seed {job.seed} failed (exit {exitcode}; see {log})'
            bar.write(f'{self.setting.name}: {job.label}: {failure}')
            if job.phase == 'check':  # a diagnostic: the row's results stand without it
                state.check = {'failed': failure}
            else:
                state.failed.append(failure)
        elif job.phase == 'sweep':
            state.sweep_runs[job.lr] = metrics
        elif job.phase == 'check':
            state.check = metrics
        else:
            state.runs[job.seed] = metrics
        if job.phase == 'sweep' and all(lr in state.sweep_runs for lr in state.grid):
            self._advance(state)
        bar.total = self.total()
        score = '' if metrics is None else _score_text(metrics, job, self.setting.metric)
        bar.set_postfix_str(f'{job.label} {job.phase} lr {job.lr:g} seed {job.seed}{score}', refresh=False)
        bar.update(1)

    def _advance(self, state: _RowState) -> None:
        """After a row's sweep: grow the grid past the end that won, or choose the rate and queue the seeds."""
        if state.failed:
            return
        scores = {lr: _val_score(m, self.setting.metric) for lr, m in state.sweep_runs.items()}
        best, edge = choose_lr(scores)
        if edge is not None and state.extended < self.protocol.extend:
            grid = sorted(state.grid)
            new = _round(grid[0] / self.protocol.factor if edge == 'low' else grid[-1] * self.protocol.factor)
            state.grid.append(new)
            state.extended += 1
            self.queue.append(Job(state.row.label, 'sweep', new, self.protocol.sweep_seed))
            return
        if best is None:
            state.failed.append('every learning rate diverged')
            return
        state.chosen, state.edge = best, edge
        self.queue.extend(Job(state.row.label, 'seeds', best, seed) for seed in self.protocol.seeds)
        if self._checked(state):
            self.queue.append(Job(state.row.label, 'check', best, self.protocol.seeds[0], self.protocol.check_scale))


def _val_score(metrics: Dict[str, Any], metric: str) -> Optional[float]:
    return None if 'diverged' in metrics else float(metrics['val'][metric])


def _score_text(metrics: Dict[str, Any], job: Job, metric: str) -> str:
    if 'diverged' in metrics:
        return ': diverged'
    return f": val {metrics['val'][metric]:.2f}" + (f", test {metrics['test'][metric]:.2f}" if 'test' in metrics else '')


def _check_settings(out_dir: str, settings: Dict[str, Any]) -> None:
    """``settings.json`` of the output folder must match (finished runs are reused only under the same settings)."""
    path = os.path.join(out_dir, 'settings.json')
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != settings:
            diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            raise ValueError(f'{out_dir!r} holds runs made with other settings ('
                             + ', '.join(f'{k}: {saved.get(k)!r} there, {settings.get(k)!r} now' for k in diff)
                             + '); use another --output-dir, or the same settings to continue those runs')
        return
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_bytes(path, json.dumps(settings, indent=1, sort_keys=True).encode())


def _row_result(state: _RowState, protocol: Protocol) -> Dict[str, Any]:
    sweep = [{'lr': lr, 'val': None if 'diverged' in m else m['val'], 'diverged': m.get('diverged'),
              'cpu_seconds': m['cpu_seconds']} for lr, m in sorted(state.sweep_runs.items())]
    return {**dataclasses.asdict(state.row), 'sweep': sweep, 'chosen_lr': state.chosen, 'edge': state.edge,
            'extended': state.extended, 'runs': [state.runs[s] for s in protocol.seeds if s in state.runs],
            'check': state.check, 'failed': state.failed}


def run_setting(setting: Setting, protocol: Protocol, out_dir: str, plan_only: bool = False,
                announce: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Prepare the setting, plan its rows (passed to ``announce``), run or reuse every job (none with
    ``plan_only``); returns the raw result (see :mod:`.report`)."""
    settings = setting.settings()
    start = time.time()
    setting.prepare(out_dir)
    budget, rows = setting.plan()
    result: Dict[str, Any] = {'setting': setting.name, 'settings': settings, 'metric': setting.metric,
                              'reference': setting.reference, 'budget': budget,
                              'protocol': dataclasses.asdict(protocol)}
    if announce is not None:
        announce({**result, 'rows': [dataclasses.asdict(r) for r in rows]})
    if plan_only:
        return {**result, 'rows': [dataclasses.asdict(r) for r in rows]}
    _check_settings(out_dir, settings)
    scheduler = _Scheduler(setting, protocol, out_dir, rows)
    scheduler.run()
    states = scheduler.states
    result['rows'] = [_row_result(states[r.label], protocol) if r.label in states else dataclasses.asdict(r)
                      for r in rows]
    result['reused_runs'] = scheduler.reused
    result['wall_seconds'] = time.time() - start
    return result
