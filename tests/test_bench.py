"""Smoke tests of visadapt-bench (visadapt.apps.bench): a --quick run on ConvNeXt-atto checks the outputs' schema and
the merge check; a second tiny run checks --optimizer, --profile, --refit and --compile (with the tracing-only
``eager`` backend: an inductor compile takes minutes on a 2-core CPU); a tiny SDXL-architecture UNet run checks the
UNet workload with --amp bf16 and --grad-checkpointing; the GPU workloads are built on the meta device.

Timings are never asserted (performance is measured by the benchmark, not by tests).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from visadapt.apps import bench
from visadapt.apps.bench.breakdown import CATEGORIES, classify
from visadapt.apps.bench.configurations import check_optimizer, make_optimizer
from visadapt.apps.bench.paths import LINEAR_FIELDS
from visadapt.apps.bench.refit import refit
from visadapt.apps.bench.workloads import MODELS
from visadapt.core.path_cost import cost_model

METHODS = ['base', 'limit', 'peft', 'lycoris-locon', 'lycoris-tucker-bypass', 'FLoRA', 'LoRA', 'SVFT', 'BitFit']
CONFIG_KEYS = {'name', 'kind', 'trainable', 'step_ms', 'step_ms_all', 'step_vs_base', 'step_vs_peft', 'peak_mb',
               'static_mb', 'peak_vs_base', 'peak_vs_peft', 'infer_ms', 'infer_vs_base', 'top_ops', 'notes'}
PATH_KEYS = {'method', 'layer', 'n_layers', 'weight_shape', 'groups', 'input_shape', 'weight_ms', 'bypass_ms',
             'auto_path', 'best_path', 'chosen_vs_best', 'ok', 'cost_terms'}


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    argv = ['--quick', '--methods', ','.join(METHODS), '--path-methods', 'FLoRA', '--path-layers', '2',
            '--threads', '1', '--out', str(out)]
    result = bench.run(argv)
    return out, result


def test_quick_outputs_and_schema(quick_run):
    out, result = quick_run
    with open(out / 'bench.json') as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(result))  # the file holds exactly what run returned
    meta = saved['meta']
    assert meta['quick'] and meta['steps'] == 3 and meta['device'] == 'cpu'
    assert {'command', 'device_name', 'threads', 'dtype', 'versions', 'date', 'memory_method', 'wall_s'} <= set(meta)
    assert set(meta['load_average']) == {'start', 'end'} and meta['load_average']['end'] >= 0  # how busy the host was
    (model,) = saved['models']
    assert model['model'] == 'convnext_atto' and model['inputs']['x'] == [2, 3, 32, 32]
    assert model['budget'] > 0 and model['targets'] == 40
    names = [c['name'] for c in model['configs']]
    assert names == ['base (frozen)', 'weight-grad limit', 'PEFT LoRA', 'LyCORIS LoCon', 'LyCORIS Tucker bypass',
                     'FLoRA', 'LoRA', 'SVFT', 'BitFit',  # baselines first, then methods in the order asked
                     'FLoRA (PEFT layers)']  # PEFT refused the depthwise convs: FLoRA again on PEFT's own layers
    for row in model['configs']:
        assert CONFIG_KEYS <= set(row), row['name']
        assert len(row['step_ms_all']) == 3 and all(t > 0 for t in row['step_ms_all'])
        assert math.isfinite(row['step_vs_base']) and row['peak_mb'] >= row['static_mb'] > 0
        assert row['top_ops'] and 0 < row['top_ops'][0]['share'] <= 1
        assert 'compiled_step_ms' not in row  # no --compile
    rows = {c['name']: c for c in model['configs']}
    assert rows['base (frozen)']['trainable'] == 0 and rows['base (frozen)']['step_vs_base'] == 1.0
    assert rows['PEFT LoRA']['step_vs_peft'] == 1.0
    # PEFT refuses ConvNeXt's depthwise convs; the bench records it instead of failing
    assert any('depthwise' in n for n in rows['PEFT LoRA']['notes'])
    assert any('rebuild' in n for n in rows['LyCORIS Tucker bypass']['notes'])
    # the budget matcher brought the rank methods to the budget; LoRA defines it
    assert rows['LoRA']['trainable'] == model['budget']
    assert abs(rows['FLoRA']['trainable'] - model['budget']) / model['budget'] < 0.1
    on_peft = rows['FLoRA (PEFT layers)']
    assert on_peft['layers'] == rows['PEFT LoRA']['layers'] < model['targets']
    assert abs(on_peft['trainable'] - rows['PEFT LoRA']['trainable']) / rows['PEFT LoRA']['trainable'] < 0.1
    assert 'refit' not in saved and model['profile'] == [] and model['compile'] is None


def test_quick_merge_verified(quick_run):
    _, result = quick_run
    rows = {c['name']: c for c in result['models'][0]['configs']}
    for name in ('FLoRA', 'LoRA', 'SVFT', 'BitFit', 'FLoRA (PEFT layers)', 'PEFT LoRA', 'LyCORIS LoCon',
                 'LyCORIS Tucker bypass'):
        assert rows[name]['merged_equals_unmerged'] is True, (name, rows[name].get('merge_max_abs_diff'))
        assert rows[name]['infer_ms'] > 0
    for name in ('FLoRA', 'LoRA', 'SVFT', 'BitFit'):
        # the adapters were trained for the timed steps, so ΔW ≠ 0 and the merge check compares different models
        assert rows[name]['delta_vs_base'] > 0, name
    assert 'merged_equals_unmerged' not in rows['weight-grad limit']
    assert bench.cli.failed_checks(result) == []


def test_quick_path_choice_and_reports(quick_run):
    out, result = quick_run
    paths = result['models'][0]['path_choice']
    assert len(paths) == 2 and all(PATH_KEYS <= set(p) for p in paths)
    assert {p['method'] for p in paths} == {'FLoRA'}
    for p in paths:
        assert p['auto_path'] in ('weight', 'bypass') and p['best_path'] in ('weight', 'bypass')
        assert p['chosen_vs_best'] >= 1.0 and isinstance(p['ok'], bool)
        assert len(p['cost_terms']['weight']) == len(p['cost_terms']['bypass']) == 1 + len(LINEAR_FIELDS)
    text = (out / 'bench.md').read_text()
    assert '| configuration | trainable | step ms |' in text and 'forward-path choice per layer' in text
    assert 'compiled ms' not in text and 'AdamW step (fused)' in text
    for row in result['models'][0]['configs']:
        assert f"| {row['name']} |" in text
    png = (out / 'bench.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000


# ---- --optimizer, --profile, --refit, --compile on one tiny run ------------------------------------------------------
@pytest.fixture(scope='module')
def extras_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench_extras')
    argv = ['--quick', '--methods', 'base,limit,FLoRA', '--on-peft-layers', '', '--path-methods', 'FLoRA',
            '--path-layers', '3', '--optimizer', 'foreach', '--profile', 'FLoRA,limit', '--profile-steps', '2',
            '--refit', '--compile', '--compile-backend', 'eager', '--threads', '1', '--out', str(out)]
    status = bench.main(argv)  # the console script: an exit status, the results in the files
    with open(out / 'bench.json') as f:
        return status, out, json.load(f)


def test_main_returns_an_exit_status(extras_run):
    status, _, result = extras_run
    assert status == 0 and bench.cli.failed_checks(result) == []


def test_optimizer_choice_is_recorded_and_used(extras_run):
    _, out, result = extras_run
    assert result['meta']['optimizer'] == 'foreach' and 'AdamW step (foreach)' in (out / 'bench.md').read_text()
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert make_optimizer(params, 'fused').defaults['fused'] is True
    assert make_optimizer(params, 'foreach').defaults['foreach'] is True
    loop = make_optimizer(params, 'loop').defaults
    assert loop['foreach'] is False and not loop['fused']
    assert make_optimizer([], 'fused') is None
    with pytest.raises(ValueError, match='no fused AdamW on meta'):
        check_optimizer('fused', 'meta')


def test_profile_breakdown(extras_run):
    _, out, result = extras_run
    (model,) = result['models']
    profiles = {p['config']: p for p in model['profile']}
    assert list(profiles) == ['FLoRA', 'weight-grad limit']  # in the order asked
    for p in profiles.values():
        assert set(p['categories']) == set(CATEGORIES) and p['steps'] == 2 and p['threads'] == 1
        assert p['op_ms'] == pytest.approx(sum(c['ms'] for c in p['categories'].values()))
        assert p['overhead_ms'] == pytest.approx(p['step_ms_profiled'] - p['op_ms'])
        assert p['calls'] > 0 and p['categories']['conv forward']['calls'] > 0
        # every target layer was labelled; the limit trains every layer's weight, so each has a backward
        assert [r['layer'] for r in p['layers']] == [r['layer'] for r in profiles['FLoRA']['layers']]
        assert len(p['layers']) == model['targets']
    assert all(r['backward_ms'] > 0 and r['forward_ms'] > 0 for r in profiles['weight-grad limit']['layers'])
    flora, limit = profiles['FLoRA']['categories'], profiles['weight-grad limit']['categories']
    assert flora['optimizer']['ms'] > 0 and limit['optimizer']['calls'] == 0  # the limit steps no optimizer
    assert flora['matmul forward']['calls'] > limit['matmul forward']['calls']  # FLoRA's mode products
    text = (out / 'bench.md').read_text()
    assert "where a training step's time goes" in text and '| Python/dispatch overhead (wall − Σ ops) |' in text
    assert '| category | FLoRA | weight-grad limit |' in text


def test_classify_op_names():
    assert classify('aten::convolution_backward') == 'conv backward' == classify('ConvolutionBackward0')
    assert classify('aten::conv2d') == 'conv forward' and classify('aten::_convert_indices_from_coo_to_csr') != \
        'conv forward'
    assert classify('aten::bmm') == 'matmul forward' and classify('MmBackward0') == 'matmul backward'
    assert classify('autograd::engine::evaluate_function: AddmmBackward0') == 'matmul backward'
    assert classify('aten::_to_copy') == 'copies/views' == classify('PermuteBackward0')
    assert classify('aten::native_layer_norm') == 'normalization' and classify('aten::gelu') == 'elementwise'
    assert classify('Optimizer.step#AdamW.step') == 'optimizer'
    assert classify('MulBackward0') is None  # an autograd node of an elementwise op: its children decide


def test_refit_in_the_run(extras_run):
    _, out, result = extras_run
    fit = result['refit']
    rows = result['models'][0]['path_choice']
    assert fit['device_type'] == 'cpu' and fit['layers'] == len(rows) == 3
    # the stored cost terms reproduce the choice auto made with the current constants on every layer
    assert fit['current_terms_agree'] == 3
    assert fit['current_ok'] == sum(r['ok'] for r in rows)
    if 'error' not in fit:
        assert 0 <= fit['refit_ok'] <= 3 and fit['refit_repr'].startswith('PathCost(')
    assert '## Path-cost refit' in (out / 'bench.md').read_text()


def test_refit_from_earlier_runs(extras_run, tmp_path, capsys):
    _, out, result = extras_run
    args = bench.parse_args(['--refit', '--refit-from', str(out / 'bench.json'), '--no-path-choice'])
    assert args.earlier_rows == result['models'][0]['path_choice']
    moved = json.loads((out / 'bench.json').read_text())
    moved['meta']['device'] = 'cuda'
    (tmp_path / 'cuda.json').write_text(json.dumps(moved))
    for files, message in ((str(tmp_path / 'none.json'), 'not a readable visadapt-bench JSON'),
                           (str(tmp_path / 'cuda.json'), 'was measured on cuda, this run refits cpu')):
        with pytest.raises(SystemExit):
            bench.parse_args(['--refit', '--refit-from', files])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(['--refit-from', str(out / 'bench.json')])
    assert '--refit-from adds earlier path timings to the refit: add --refit' in capsys.readouterr().err


def test_refit_recovers_known_constants():
    """Timings generated by a known PathCost (times = s · cost) give back its linear fields exactly."""
    rng = np.random.default_rng(0)
    truth = dict(zip(LINEAR_FIELDS, (3e5, 1.5, 20.0, 1e6)))
    theta = np.array([1.0] + [truth[f] for f in LINEAR_FIELDS])
    rows = []
    for _ in range(12):
        weight = [rng.uniform(1e6, 1e8), rng.integers(1, 4) * 3.0, rng.uniform(1e3, 1e6) * 3, 0.0, 0.0]
        bypass = [rng.uniform(1e5, 1e8), rng.integers(0, 2) * 3.0, 0.0, rng.uniform(1e3, 1e6) * 3,
                  rng.integers(1, 4) * 3.0]
        ms = {p: 1e3 * 2e-10 * float(np.dot(t, theta)) for p, t in (('weight', weight), ('bypass', bypass))}
        auto = min(ms, key=ms.get)  # pretend auto chose right
        rows.append({'cost_terms': {'weight': weight, 'bypass': bypass}, 'weight_ms': ms['weight'],
                     'bypass_ms': ms['bypass'], 'auto_path': auto, 'ok': True})
    fit = refit(rows, 'cpu')
    for name, value in truth.items():
        assert fit['refit'][name] == pytest.approx(value, rel=1e-4), name
    assert fit['seconds_per_mac'] == pytest.approx(2e-10, rel=1e-4)
    assert fit['refit_ok'] == 12 and fit['median_rel_error'] < 1e-6
    assert fit['current'] == {k: v for k, v in cost_model('cpu').__dict__.items()}
    assert refit([], 'cpu')['error'].startswith('no per-layer path timings')


def test_compile_plumbing(extras_run):
    """--compile (eager backend here): every configuration compiled, checked against eager and timed."""
    _, out, result = extras_run
    (model,) = result['models']
    assert model['compile']['backend'] == 'eager' and model['compile']['tolerance'] == 1e-3
    for row in model['configs']:
        assert row['compiled_equals_eager'] is True, (row['name'], row['compiled_max_rel_diff'])
        assert row['compile_s'] > 0 and row['compiled_graph_breaks'] == 0
        assert len(row['compiled_step_ms_all']) == 3 and row['compiled_step_ms'] > 0
        # compiled ÷ eager is against eager steps timed in the same round-robin
        assert row['compiled_vs_eager'] == pytest.approx(row['compiled_step_ms'] / row['eager_step_ms_paired'])
    assert model['configs'][0]['compiled_vs_base'] == 1.0
    text = (out / 'bench.md').read_text()
    assert '| compiled ms | compiled × base | compiled ÷ eager | compile s |' in text and 'torch.compile(eager)' in text


# ---- the UNet workloads -------------------------------------------------------------------------------------------
def test_sdxl_unet_workload_with_amp_and_checkpointing(tmp_path):
    """The SDXL UNet calling convention (timesteps, text and size conditioning) on the tiny SDXL-architecture UNet,
    with bf16 autocast and gradient checkpointing."""
    result = bench.run(['--models', 'sdxl_tiny@1x64', '--methods', 'base,FLoRA', '--steps', '1', '--warmup', '0',
                        '--no-path-choice', '--amp', 'bf16', '--grad-checkpointing', '--threads', '1',
                        '--out', str(tmp_path)])
    assert result['meta']['amp'] == 'bf16' and result['meta']['grad_checkpointing'] == ['sdxl_tiny']
    (model,) = result['models']
    assert model['inputs'] == {'x': [1, 4, 8, 8], 'timestep': [1], 'context': [1, 77, 64], 'text_embeds': [1, 32],
                               'time_ids': [1, 6]}
    rows = {r['name']: r for r in model['configs']}
    assert rows['FLoRA']['merged_equals_unmerged'] is True and rows['FLoRA']['step_ms'] > 0
    assert 'autocast bf16, gradient checkpointing in sdxl_tiny' in (tmp_path / 'bench.md').read_text()


def test_sdxl_unet_full_size_on_meta():
    """The full SDXL UNet workload (GPU command) builds from SDXL base 1.0's config and runs on the meta device."""
    with torch.device('meta'):
        work = MODELS['sdxl_unet']('sdxl_unet', 1, 1024)
        out = work.call(work.model, work.inputs)
    assert tuple(out.shape) == (1, 4, 128, 128) and len(work.targets) > 700
    assert sum(p.numel() for p in work.model.parameters()) > 2.5e9


# ---- arguments ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('argv, message', [
    (['--models', 'resnet9000'], "--models entry 'resnet9000' is not valid"),
    (['--models', 'vit_small@4x100'], 'size a positive multiple of 32'),
    (['--methods', 'FLoRA,NoSuchMethod'], "['NoSuchMethod'] unknown"),
    (['--steps', '0'], '--steps must be ≥ 1'),
    (['--clock', 'cpu', '--device', 'cuda'], '--clock cpu measures host CPU time'),
    (['--device', 'meta'], 'no fused AdamW on meta'),
    (['--optimizer', 'sgd'], "invalid choice: 'sgd'"),
    (['--methods', 'base,FLoRA', '--profile', 'limit'], "--profile ['limit']: not among the configurations"),
    (['--profile', 'NoSuch'], "--profile ['NoSuch']"),
    (['--refit', '--no-path-choice'], '--refit fits the path-cost constants'),
    (['--profile-steps', '0'], '--profile-steps must be ≥ 1'),
    (['--models', 'vit_base', '--grad-checkpointing', 'sdxl_unet'], "--grad-checkpointing ['sdxl_unet']: not in"),
])
def test_bad_arguments_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        bench.parse_args(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_model_overrides_parse():
    args = bench.parse_args(['--models', 'convnext_atto,unet_down@2x64', '--batch-size', '4', '--image-size', '96'])
    assert args.model_list == [('convnext_atto', 4, 96), ('unet_down', 2, 64)]
    args = bench.parse_args(['--profile', '--methods', 'base,limit,peft,FLoRA'])
    assert args.profile_list == ['FLoRA', 'limit']  # the default of a bare --profile
    args = bench.parse_args(['--profile', 'PEFT LoRA,FLoRA (PEFT layers)', '--methods', 'peft'])
    assert args.profile_list == ['PEFT LoRA', 'FLoRA (PEFT layers)'] and args.optimizer == 'fused'
    args = bench.parse_args(['--models', 'vit_base,sdxl_unet@1x1024', '--grad-checkpointing', 'sdxl_unet'])
    assert args.checkpointed == ['sdxl_unet'] and bench.parse_args(['--grad-checkpointing']).checkpointed == [
        'convnext_atto', 'convnext_tiny', 'efficientnet_lite0', 'vit_small', 'unet_down']
