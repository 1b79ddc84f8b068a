"""visadapt.core.analysis and visadapt-analyze (visadapt.apps.analyze) on adapters trained for real (sklearn digits, timm backbone)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from visadapt_testing import TinyNet, randomize_adapters

import visadapt
from visadapt.core.analysis import amplification_factor, analyze, delta_weight, subspace_similarity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ['conv_head', 'blocks.5.*.conv_pw', 'blocks.6.0.conv_pwl']


# ---- the pure functions -------------------------------------------------------------------------------------------
def test_subspace_similarity_bounds_and_identity():
    gen = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(20, 6, generator=gen, dtype=torch.float64))[0]
    phi = subspace_similarity(U, U)
    torch.testing.assert_close(phi.diagonal(), torch.ones(6, dtype=torch.float64))
    assert phi.min() >= 0 and phi.max() <= 1 + 1e-12
    # disjoint coordinate subspaces have similarity 0; nested ones 1
    eye = torch.eye(10, dtype=torch.float64)
    assert subspace_similarity(eye[:, :3], eye[:, 3:6]).abs().max() == 0
    assert torch.all(subspace_similarity(eye[:, :2], eye[:, :5]) == 1)
    with pytest.raises(ValueError, match='same length'):
        subspace_similarity(eye[:, :2], torch.eye(8)[:, :2])


def test_amplification_factor_of_a_known_update():
    W = torch.diag(torch.tensor([4.0, 2.0, 1.0])).double()
    delta = torch.zeros(3, 3, dtype=torch.float64)
    delta[2, 2] = 3.0  # amplifies W's weakest direction (σ = 1) by 3
    assert amplification_factor(delta, W, 1) == pytest.approx(3.0)
    assert amplification_factor(delta * 0, W, 1) != amplification_factor(delta * 0, W, 1)  # nan for ΔW = 0


def test_analyze_covers_multiplicative_methods_and_refuses_merged_or_mpc_n():
    torch.manual_seed(0)
    model = TinyNet(nn.Conv2d(8, 6, 3, groups=2))
    visadapt.inject(model, visadapt.IA3Config(include=['layer']))
    randomize_adapters(model, std=0.5)
    W = model.layer.weight.detach().double()
    l = model.layer.visadapt['default'].l.detach().double().view(-1, 1, 1, 1)
    torch.testing.assert_close(delta_weight(model.layer), (l - 1) * W)
    (result,) = analyze(model)
    assert result.matrix_shape == [6, 4 * 9] and result.numerical_rank == 6
    assert result.frobenius_norm == pytest.approx(float(((l - 1) * W).norm()))
    visadapt.merge(model)
    with pytest.raises(ValueError, match='unmerge'):
        analyze(model)
    n_model = TinyNet(nn.Linear(8, 8))
    visadapt.inject(n_model, visadapt.LoRAConfig(r=2, mpc='n', include=['layer']))
    with pytest.raises(ValueError, match='no weight form'):
        analyze(n_model)


# ---- two real adapters and the command -------------------------------------------------------------------------------
def _digits(n: int = 160):
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode='bilinear', align_corners=False).repeat(1, 3, 1, 1)
    return x, torch.tensor(data.target[:n])


def _base() -> nn.Module:
    from visadapt.integrations.timm_models import create_model
    torch.manual_seed(0)  # the command rebuilds the same random-init base with --seed 0
    return create_model('efficientnet_lite0', pretrained=False, num_classes=10).eval()


def _train(path, config: visadapt.AdapterConfig, steps: int = 5) -> None:
    model = _base()
    visadapt.inject(model, config)
    x, y = _digits()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        idx = torch.arange(step * 32, step * 32 + 32) % x.shape[0]
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    visadapt.save_adapter(model, path)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp('adapters')
    _train(root / 'lora_r4', visadapt.LoRAConfig(r=4, include=TARGETS, train_modules=['classifier']))
    _train(root / 'lora_r8', visadapt.LoRAConfig(r=8, include=TARGETS, train_modules=['classifier']))
    return root


def _run(*args: str) -> subprocess.CompletedProcess:
    """The installed command (``visadapt-analyze`` is ``python -m visadapt.apps.analyze``)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MPLBACKEND='Agg')
    return subprocess.run([sys.executable, '-m', 'visadapt.apps.analyze', *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)


def _main(*args: str):
    """The command's main() in this process (saves the interpreter start-up; the subprocess test covers the CLI)."""
    from visadapt.apps import analyze
    return analyze.run(list(args))


def test_command_on_two_trained_adapters(trained, tmp_path):
    out = tmp_path / 'analysis'
    proc = _run(str(trained / 'lora_r4'), str(trained / 'lora_r8'), '--model', 'efficientnet_lite0',
                '--num-classes', '10', '--seed', '0', '--out', str(out))
    assert proc.returncode == 0, proc.stderr
    assert 'φ computed for 6 common layers' in proc.stdout
    for name in ('analysis.json', 'spectra.png', 'norms.png', 'similarity.png'):
        assert (out / name).stat().st_size > 1000, name
        if name.endswith('.png'):
            assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    report = json.loads((out / 'analysis.json').read_text())
    first, second = report['adapters']
    assert [l['layer'] for l in first['layers']] == [l['layer'] for l in second['layers']]
    assert len(first['layers']) == 6  # 4 blocks.5.*.conv_pw + blocks.6.0.conv_pwl + conv_head
    for adapter, r in ((first, 4), (second, 8)):
        for layer in adapter['layers']:
            s = layer['singular_values']
            assert layer['numerical_rank'] == r and layer['rank'] == r, layer['layer']
            assert all(a >= b for a, b in zip(s, s[1:])) and s[r] < 1e-4 * s[0]
            assert layer['frobenius_norm'] == pytest.approx(sum(v * v for v in s) ** 0.5, rel=1e-6)
            assert layer['amplification_factor'] > 0
    for layer, phi in report['similarity'].items():
        phi = torch.tensor(phi)
        assert phi.shape == (4, 8), layer
        assert phi.min() >= -1e-9 and phi.max() <= 1 + 1e-9
        # ‖U_1^(i)ᵀ U_2^(j)‖²_F = φ·min(i, j) grows with j: more directions of ΔW_2 never overlap less
        unnormalized = phi * torch.minimum(torch.arange(1, 5).unsqueeze(1), torch.arange(1, 9).unsqueeze(0))
        assert torch.all(unnormalized.diff(dim=1) >= -1e-9), layer


def test_command_with_an_adapter_and_itself(trained, tmp_path):
    out = tmp_path / 'self'
    _main(str(trained / 'lora_r4'), str(trained / 'lora_r4'), '--model', 'efficientnet_lite0', '--num-classes', '10',
          '--out', str(out), '--layers', 'conv_head', '--max-heatmaps', '1')
    report = json.loads((out / 'analysis.json').read_text())
    phi = torch.tensor(report['similarity']['conv_head'])
    torch.testing.assert_close(phi.diagonal(), torch.ones(4, dtype=phi.dtype))
    assert report['similarity_plotted'] == ['conv_head']


def test_command_bad_input(trained, tmp_path, capsys):
    with pytest.raises(SystemExit, match="--factory must look like 'module:function'"):
        _main(str(trained / 'lora_r4'), '--factory', 'no_colon', '--out', str(tmp_path / 'x'))
    with pytest.raises(SystemExit) as exit_info:
        _main(str(trained / 'lora_r4'), str(trained / 'lora_r4'), str(trained / 'lora_r8'),
              '--model', 'efficientnet_lite0', '--out', str(tmp_path / 'x'))
    assert exit_info.value.code == 2 and 'give one or two adapter directories' in capsys.readouterr().err
    with pytest.raises(ValueError, match='shape'):  # another base model than the one trained on
        _main(str(trained / 'lora_r4'), '--model', 'efficientnet_lite0', '--num-classes', '7', '--out',
              str(tmp_path / 'x'))
