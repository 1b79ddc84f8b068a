"""visadapt-compare: statistics against scipy, the rate sweep (validation only, grid growth, divergence), resume after
a kill, and tiny real comparisons in both settings (conv: packaged MobileNetV2 on Fashion-MNIST through the
classification trainer; attention: the packaged two-tower model on a small synthetic caption set)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from visadapt.apps.compare import main
from visadapt.apps.compare.engine import Protocol, Row, Setting, choose_lr, lr_grid, run_setting, slug
from visadapt.apps.compare.report import BEGIN, END, claim_lines, summarize, update_marked_section
from visadapt.apps.compare.stats import VERDICTS, mean_ci, paired_difference, verdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
scipy_stats = pytest.importorskip('scipy.stats')


# ---- statistics -----------------------------------------------------------------------------------------------------
def test_mean_ci_is_the_t_interval_on_known_numbers():
    ci = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # s = sqrt(2.5), t(0.975, 4) = 2.7764451; half width = 2.7764451 * sqrt(2.5) / sqrt(5) = 1.9632432
    assert ci['mean'] == 3.0 and ci['std'] == pytest.approx(math.sqrt(2.5))
    assert ci['half_width'] == pytest.approx(1.9632432, abs=1e-6)
    low, high = scipy_stats.t.interval(0.95, 4, loc=3.0, scale=scipy_stats.sem([1, 2, 3, 4, 5]))
    assert (ci['low'], ci['high']) == (pytest.approx(low), pytest.approx(high))
    ninety = mean_ci([0.3, -1.2, 2.5, 0.7], confidence=0.9)
    low, high = scipy_stats.t.interval(0.9, 3, loc=0.575, scale=scipy_stats.sem([0.3, -1.2, 2.5, 0.7]))
    assert (ninety['low'], ninety['high']) == (pytest.approx(low), pytest.approx(high))


def test_paired_difference_matches_scipy_ttest_rel():
    a, b = [10.0, 12.0, 11.0, 14.0, 13.0], [9.0, 11.0, 11.0, 12.0, 12.0]
    d = paired_difference(a, b)        # differences 1, 1, 0, 2, 1: mean 1, s = sqrt(0.5), t = sqrt(10)
    assert d['mean'] == pytest.approx(1.0) and d['n'] == 5
    assert d['p'] == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue)
    assert d['p'] == pytest.approx(2 * scipy_stats.t.sf(math.sqrt(10), 4))
    low, high = scipy_stats.t.interval(0.95, 4, loc=1.0, scale=math.sqrt(0.5) / math.sqrt(5))
    assert (d['low'], d['high']) == (pytest.approx(low), pytest.approx(high))
    assert verdict(d) == VERDICTS[0]                       # [0.12, 1.88] lies above 0
    assert verdict(paired_difference(b, a)) == VERDICTS[1]
    same = paired_difference([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    assert same['std'] == 0.0 and same['p'] == 0.0 and verdict(same) == VERDICTS[0]
    assert paired_difference([1.0, 2.0], [1.0, 2.0])['p'] == 1.0


def test_statistics_refuse_bad_input():
    with pytest.raises(ValueError, match='at least 2'):
        mean_ci([1.0])
    with pytest.raises(ValueError, match='finite'):
        mean_ci([1.0, float('nan')])
    with pytest.raises(ValueError, match='same seeds'):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match='confidence'):
        mean_ci([1.0, 2.0], confidence=95)


def test_verdict_comes_from_the_interval_not_the_means():
    """A large mean difference with a wide interval is 'not distinguishable'; a small one with a tight interval is
    'reproduced' (claim lines are decided the same way)."""
    noisy = paired_difference([90.0, 50.0, 88.0], [60.0, 70.0, 61.0])    # mean +12.3, interval holds 0
    tight = paired_difference([80.3, 80.4, 80.2], [80.1, 80.2, 80.0])    # mean +0.2, interval above 0
    assert noisy['mean'] > tight['mean'] and verdict(noisy) == VERDICTS[2] and verdict(tight) == VERDICTS[0]
    result = _result('conv', {'FLoRA': [90.0, 50.0, 88.0], 'LoRA (chain)': [60.0, 70.0, 61.0]})
    line = claim_lines([result])[0]
    assert line.startswith('- **FLoRA beats LoRA on convs') and 'not distinguishable at this size' in line
    shots = _result('shots', {'SVFT (banded, d=2)': [50.0, 52.0, 51.0], 'LoRA (chain)': [55.0, 56.0, 57.0]})
    assert ': *not reproduced*.' in claim_lines([shots])[1]
    assert ': not run (this study has no setting for it).' in claim_lines([shots])[2]      # no retrieval setting


def _result(kind, scores):
    """A finished comparison result as the engine writes it, with the given test scores for seeds 1, 2, 3."""
    settings = {'kind': 'attention' if kind == 'attention' else 'conv', 'shots': 10 if kind == 'shots' else None}
    rows = [{'label': label, 'spec': {'method': label}, 'adapter_params': 100, 'skip': None, 'failed': [],
             'sweep': [], 'chosen_lr': 1e-3, 'edge': None, 'extended': 0,
             'runs': [{'identity': {'seed': s}, 'test': {'accuracy': v}, 'trainable_params': 110, 'cpu_seconds': 1.0}
                      for s, v in zip((1, 2, 3), values)]} for label, values in scores.items()]
    return {'setting': f'fake-{kind}', 'settings': settings, 'metric': 'accuracy', 'reference': 'LoRA (chain)',
            'protocol': {'seeds': [1, 2, 3]}, 'rows': rows, 'budget': 100}


# ---- the protocol on a synthetic setting --------------------------------------------------------------------------
class Parabola(Setting):
    """Validation score peaks at rate ``best`` (test score peaks elsewhere); rates above ``diverge`` blow up."""
    name, metric, reference = 'parabola', 'score', 'A'

    def __init__(self, best=1e-2, diverge=1.0):
        self.best, self.diverge, self.data = best, diverge, {}

    def settings(self):
        return {'best': self.best, 'diverge': self.diverge}

    def prepare(self, cache=None):
        self.data = {'val': 'validation images', 'test': 'test images'}

    def plan(self):
        return 10, [Row('A', {'method': 'LoRA'}, 1e-3, 10), Row('B', {'method': 'DoRA'}, 1e-2, 10)]

    def withhold(self, split):
        self.data.pop(split)

    def train(self, row, lr, seed, splits, curve, folder, scale=1.0):
        if lr > self.diverge:
            raise FloatingPointError(f'the training loss is nan (lr {lr})')
        val = -(math.log10(lr) - math.log10(self.best)) ** 2 + 0.01 * seed
        out = {'val': {'score': val}, 'saw': sorted(self.data), 'adapter_params': 10, 'trainable_params': 12}
        if 'test' in splits:
            out['test'] = {'score': -val + (row.label == 'B')}
        return out


def test_choose_lr_and_grid():
    assert lr_grid(3e-3, 3, 3.0) == [0.001, 0.003, 0.009]
    assert choose_lr({1e-3: 0.5, 3e-3: 0.7, 1e-2: 0.6}) == (3e-3, None)
    assert choose_lr({1e-3: 0.7, 3e-3: 0.7, 1e-2: 0.6}) == (1e-3, 'low')     # a tie goes to the smaller rate
    assert choose_lr({1e-3: 0.5, 3e-3: None, 1e-2: 0.6}) == (1e-2, 'high')
    assert choose_lr({1e-3: None, 3e-3: None}) == (None, 'low')
    assert choose_lr({1e-3: 0.5}) == (1e-3, None)


def test_sweep_reads_only_validation_grows_the_grid_and_skips_divergence(tmp_path):
    setting = Parabola(best=0.1, diverge=0.5)
    protocol = Protocol(points=3, factor=3.0, extend=2, seeds=(1, 2, 3), jobs=2)
    result = run_setting(setting, protocol, str(tmp_path))
    a, b = result['rows']
    # A: grid 3.33e-4, 1e-3, 3e-3 -> the high end wins twice -> 9e-3, 0.027 added (extend=2): chosen 0.027
    assert [s['lr'] for s in a['sweep']] == [0.000333, 0.001, 0.003, 0.009, 0.027]
    assert a['chosen_lr'] == 0.027 and a['edge'] == 'high' and a['extended'] == 2
    # B: grid 3.33e-3, 0.01, 0.03 -> 0.03 wins at the end: 0.09 added, wins at the end again: 0.27 added, and 0.09
    # is now inside the grid: chosen
    assert [s['lr'] for s in b['sweep']] == [0.00333, 0.01, 0.03, 0.09, 0.27]
    assert b['chosen_lr'] == 0.09 and b['extended'] == 2 and b['edge'] is None
    for row in (a, b):
        assert all(s['val'] is not None for s in row['sweep'])
        assert all(run['saw'] == ['test', 'val'] and 'test' in run for run in row['runs'])
    sweep_metrics = [json.load(open(os.path.join(d, 'metrics.json'))) for d, _, files in os.walk(tmp_path)
                     if 'metrics.json' in files and os.path.basename(d).startswith('sweep')]
    assert len(sweep_metrics) == 10 and all(m['saw'] == ['val'] and 'test' not in m for m in sweep_metrics)
    summary = {s['label']: s for s in summarize(result)}
    assert summary['B']['diff']['mean'] == pytest.approx(summary['B']['test']['mean'] - summary['A']['test']['mean'])

    diverging = run_setting(Parabola(best=0.1, diverge=0.02), Protocol(points=3, extend=1, seeds=(1, 2)),
                            str(tmp_path / 'diverging'))
    b = diverging['rows'][1]                      # B's grid 3.33e-3, 0.01, 0.03: 0.03 diverged, 0.01 chosen
    assert [s['diverged'] is not None for s in b['sweep']] == [False, False, True] and b['chosen_lr'] == 0.01


def test_protocol_and_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match='sweep seed 1 is also a reported seed'):
        Protocol(sweep_seed=1, seeds=(1, 2))
    with pytest.raises(ValueError, match='at least 2 distinct seeds'):
        Protocol(seeds=(1,))
    run_setting(Parabola(), Protocol(points=1, extend=0, seeds=(1, 2), jobs=1), str(tmp_path))
    with pytest.raises(ValueError, match=r"other settings \(best: 0.01 there, 0.1 now\)"):
        run_setting(Parabola(best=0.1), Protocol(points=1, extend=0, seeds=(1, 2)), str(tmp_path))


def test_docs_generator_fills_the_marked_block(tmp_path):
    path = tmp_path / 'README.md'
    path.write_text(f'# title\n\n{BEGIN}\nold table\n{END}\n\nrest\n')
    update_marked_section(str(path), 'new table\n')
    assert path.read_text() == f'# title\n\n{BEGIN}\nnew table\n{END}\n\nrest\n'
    (tmp_path / 'plain.md').write_text('no markers\n')
    with pytest.raises(ValueError, match='needs exactly one'):
        update_marked_section(str(tmp_path / 'plain.md'), 'x')


# ---- tiny real comparisons ---------------------------------------------------------------------------------------
CONV_ARGS = ['conv', '--model', 'mobilenetv2_100', '--pretrained', 'packaged', '--data', 'fashion-mnist',
             '--image-size', '32', '--train-size', '48', '--val-size', '32', '--test-size', '32', '--batch-size', '16',
             '--epochs', '1', '--methods', 'head-only', '--points', '2', '--extend', '0', '--seeds', '1', '2',
             '--jobs', '2']


def _finished(folder):
    return {os.path.relpath(d, folder): open(os.path.join(d, 'metrics.json'), 'rb').read()
            for d, _, files in os.walk(folder) if 'metrics.json' in files}


def _kill_after(cmd, folder, runs, timeout=300):
    """Start ``cmd`` in its own process group and SIGKILL the group once ``runs`` runs have finished."""
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while len(_finished(folder)) < runs and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_conv_comparison_resumes_after_a_kill(tmp_path, capsys):
    """Two methods (LoRA chain, head-only), two rates, two seeds through the classification trainer: killed after
    two runs, the same command finishes the rest and reuses those two unchanged; sweep runs never score the test
    split; the table, plots and paired statistics are written; other settings in the same folder are refused."""
    out = str(tmp_path / 'conv')
    _kill_after([sys.executable, '-m', 'visadapt.apps.compare', *CONV_ARGS, '--output-dir', out], out, runs=2)
    before = _finished(out)
    assert 2 <= len(before) < 9
    assert main([*CONV_ARGS, '--output-dir', out]) == 0
    after = _finished(out)                           # 2 x (2 rates + 2 seeds) + head-only's convergence check
    assert len(after) == 9 and all(after[k] == v for k, v in before.items())
    result = json.load(open(os.path.join(out, 'results.json')))
    assert result['reused_runs'] == len(before)
    for row in result['rows']:
        sweep = [json.loads(v) for k, v in after.items() if k.startswith(f"runs/{slug(row['label'])}/sweep-")]
        assert len(sweep) == 2 and all(set(m) & {'val', 'test'} == {'val'} for m in sweep)
        best = max(sweep, key=lambda m: (m['val']['accuracy'], -m['identity']['lr']))
        assert row['chosen_lr'] == best['identity']['lr']
        assert [r['identity']['seed'] for r in row['runs']] == [1, 2] and all('test' in r for r in row['runs'])
    head = next(s for s in result['summary'] if s['label'] == 'head-only')
    lora = next(s for s in result['summary'] if s['label'] == 'LoRA (chain)')
    assert head['adapter_params'] == 0 and lora['adapter_params'] > 0 and lora['diff'] is None
    assert head['diff']['mean'] == pytest.approx(head['test']['mean'] - lora['test']['mean'])
    head_row = next(r for r in result['rows'] if r['label'] == 'head-only')
    assert all([p['step'] for p in r['curve']] == [0, 3] for r in head_row['runs'])    # curves: before and after
    check = head_row['check']                        # twice the schedule, first seed, validation only
    assert check['steps'] == 6 and check['identity']['scale'] == 2.0 and 'test' not in check
    assert head['check']['gain'] == pytest.approx(check['val']['accuracy'] - head_row['runs'][0]['val']['accuracy'])
    assert os.path.getsize(os.path.join(out, 'results.png')) > 0 and os.path.isfile(os.path.join(out, 'curves.png'))
    table = open(os.path.join(out, 'results.md')).read()
    assert '| head-only |' in table and 'Δ vs LoRA (chain)' in table and 'Convergence check' in table
    capsys.readouterr()
    changed = list(CONV_ARGS)
    changed[changed.index('--epochs') + 1] = '2'
    assert main([*changed, '--output-dir', out]) == 2
    assert 'epochs: 1 there, 2 now' in capsys.readouterr().err


def _caption_set(folder, n=24):
    """Synthetic clip art: a coloured shape on white per image, two captions each (JSONL as the clipart tool writes)."""
    from PIL import Image, ImageDraw
    colours = {'red': (220, 30, 30), 'green': (30, 180, 60), 'blue': (40, 60, 220), 'black': (0, 0, 0)}
    shapes = ('circle', 'square', 'triangle')
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(n):
        colour, shape = list(colours)[i % 4], shapes[(i // 4) % 3]
        image = Image.new('RGB', (48, 48), 'white')
        draw = ImageDraw.Draw(image)
        box = (6 + i % 5, 6 + i % 7, 40, 42)
        {'circle': draw.ellipse, 'square': draw.rectangle}.get(shape, lambda b, fill: draw.polygon(
            [(b[0], b[3]), (b[2], b[3]), ((b[0] + b[2]) // 2, b[1])], fill=fill))(box, fill=colours[colour])
        image.save(os.path.join(folder, f'{i:03d}.png'))
        rows += [{'image': f'{i:03d}.png', 'caption': f'a {colour} {shape}'},
                 {'image': f'{i:03d}.png', 'caption': f'{colour} {shape}, shapes {i}'}]
    path = os.path.join(folder, 'captions.jsonl')
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
    return path


def test_attention_comparison_on_the_two_tower_model(tmp_path):
    """LoRA and SeRA on the text tower's q/v of the packaged two-tower model: budget-matched, every run scored with
    the SeRA paper's recall sum; the cached image-trunk features give exactly the model's image embeddings, and
    dropping all-padding token columns leaves the caption embeddings unchanged."""
    import torch.nn.functional as F

    from visadapt.apps import retrieval
    from visadapt.apps.compare.attention import RetrievalSetting, RetrievalSettings, _embed_texts, _trim
    captions = _caption_set(str(tmp_path / 'art'))
    out = str(tmp_path / 'att')
    args = ['attention', '--captions', captions, '--captions-per-image', '0', '--image-size', '48', '--train-images', '12', '--val-images', '6',
            '--test-images', '6', '--batch-size', '8', '--epochs', '1', '--warmup', '0', '--methods', 'SeRA',
            '--points', '1', '--extend', '0', '--seeds', '1', '2', '--jobs', '2', '--output-dir', out]
    assert main(args) == 0
    result = json.load(open(os.path.join(out, 'results.json')))
    lora, sera = result['rows']
    assert (lora['label'], sera['label']) == ('LoRA', 'SeRA') and result['budget'] == lora['adapter_params'] == 73_728
    assert sera['spec']['method'] == 'SeRA' and 0 < sera['adapter_params'] <= 2 * result['budget']
    for row in (lora, sera):
        assert [r['identity']['seed'] for r in row['runs']] == [1, 2]
        for run in row['runs']:
            assert 0.0 <= run['test']['sum'] <= 600.0 and run['steps'] == 3
            assert run['counts']['train'] == {'images': 12, 'captions': 24}
    assert all(len(r['curve']) >= 2 for r in lora['runs']) and not any(r['curve'] for r in sera['runs'])
    assert next(s for s in result['summary'] if s['label'] == 'SeRA')['diff'] is not None

    setting = RetrievalSetting(RetrievalSettings(captions=captions, captions_per_image=None, image_size=48,
                                                 train_images=12, val_images=6, test_images=6))
    setting.prepare(out)                        # reads the cached trunk features written by the run above
    from PIL import Image
    with open(captions) as f:
        first = {json.loads(line)['image'] for line in f}
    paths = [p for p, _ in setting._splits()['val']]
    assert len(paths) == 6 and all(os.path.basename(p) in first for p in paths)
    images = torch.stack([setting.preprocess(Image.open(p)) for p in paths])
    model = setting.model.eval()
    with torch.no_grad():
        direct = F.normalize(model.encode_image(images), dim=-1)
        cached = F.normalize(model.visual.head(setting.data['val'][0]), dim=-1)
        tokens = setting.data['val'][1]
        assert _trim(tokens, setting.pad).shape[1] < tokens.shape[1]
        torch.testing.assert_close(_embed_texts(model, tokens, setting.pad, batch_size=5),
                                   retrieval.embed_texts(model, tokens), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached, direct, atol=1e-5, rtol=1e-5)

    # the shared projection start is the ridge solution: (XᵀX + λI) Wᵀ = XᵀY on the training captions
    feats, tokens, text_image = setting.data['train']
    x = feats[text_image].double()
    with torch.no_grad():
        y = _embed_texts(model, tokens, setting.pad).double()
    gram = x.t() @ x
    ridge = 0.1 * gram.diagonal().mean().clamp_min(1e-6)
    w = setting.projection.double().t()
    residual = gram @ w + ridge * w - x.t() @ y
    assert x.abs().max() > 0 and w.abs().max() > 0
    assert residual.abs().max() <= 1e-4 * (x.t() @ y).abs().max()
    with pytest.raises(ValueError, match="projection 'zero' is not valid; use one of"):
        RetrievalSettings(captions=captions, projection='zero')
