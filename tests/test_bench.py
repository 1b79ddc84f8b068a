"""Smoke test of visadapt-bench (visadapt.apps.bench): a --quick run on ConvNeXt-atto checks the outputs' schema and the merge check.

Timings are never asserted (performance is measured by the benchmark, not by tests).
"""
from __future__ import annotations

import json
import math

import pytest

from visadapt.apps import bench

METHODS = ['base', 'limit', 'peft', 'lycoris-locon', 'lycoris-tucker-bypass', 'FLoRA', 'LoRA', 'SVFT', 'BitFit']
CONFIG_KEYS = {'name', 'kind', 'trainable', 'step_ms', 'step_ms_all', 'step_vs_base', 'step_vs_peft', 'peak_mb',
               'static_mb', 'peak_vs_base', 'peak_vs_peft', 'infer_ms', 'infer_vs_base', 'top_ops', 'notes'}
PATH_KEYS = {'method', 'layer', 'n_layers', 'weight_shape', 'groups', 'input_shape', 'weight_ms', 'bypass_ms',
             'auto_path', 'best_path', 'chosen_vs_best', 'ok'}


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    argv = ['--quick', '--methods', ','.join(METHODS), '--path-methods', 'FLoRA', '--path-layers', '2',
            '--threads', '1', '--out', str(out)]
    result = bench.main(argv)
    return out, result


def test_quick_outputs_and_schema(quick_run):
    out, result = quick_run
    with open(out / 'bench.json') as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(result))  # the file holds exactly what main returned
    meta = saved['meta']
    assert meta['quick'] and meta['steps'] == 3 and meta['device'] == 'cpu'
    assert {'command', 'device_name', 'threads', 'dtype', 'versions', 'date', 'memory_method', 'wall_s'} <= set(meta)
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


def test_quick_path_choice_and_reports(quick_run):
    out, result = quick_run
    paths = result['models'][0]['path_choice']
    assert len(paths) == 2 and all(PATH_KEYS <= set(p) for p in paths)
    assert {p['method'] for p in paths} == {'FLoRA'}
    for p in paths:
        assert p['auto_path'] in ('weight', 'bypass') and p['best_path'] in ('weight', 'bypass')
        assert p['chosen_vs_best'] >= 1.0 and isinstance(p['ok'], bool)
    text = (out / 'bench.md').read_text()
    assert '| configuration | trainable | step ms |' in text and 'forward-path choice per layer' in text
    for row in result['models'][0]['configs']:
        assert f"| {row['name']} |" in text
    png = (out / 'bench.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000


@pytest.mark.parametrize('argv, message', [
    (['--models', 'resnet9000'], "--models entry 'resnet9000' is not valid"),
    (['--models', 'vit_small@4x100'], 'size a positive multiple of 32'),
    (['--methods', 'FLoRA,NoSuchMethod'], "['NoSuchMethod'] unknown"),
    (['--steps', '0'], '--steps must be ≥ 1'),
    (['--clock', 'cpu', '--device', 'cuda'], '--clock cpu measures host CPU time'),
])
def test_bad_arguments_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        bench.parse_args(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_model_overrides_parse():
    args = bench.parse_args(['--models', 'convnext_atto,unet_down@2x64', '--batch-size', '4', '--image-size', '96'])
    assert args.model_list == [('convnext_atto', 4, 96), ('unet_down', 2, 64)]
