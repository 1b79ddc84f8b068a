"""Saving and loading adapters: the file format, every bad-file error (one clear error, model unchanged, nothing
unpickled) and atomic writes."""
from __future__ import annotations

import builtins
import json
import os
import pickle
import stat

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from visadapt_testing import SmallCNN, assert_unchanged, randomize_adapters, small_cnn, state_snapshot

import visadapt
from visadapt.core.io import CONFIG_NAME, WEIGHTS_NAME, atomic_write_bytes
from visadapt.core.tuner import get_injection

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


@pytest.fixture
def saved(tmp_path):
    """A FLoRA adapter with a trained head, saved to tmp_path/'ad'; returns (directory, model)."""
    model = small_cnn()
    visadapt.inject(model, visadapt.FLoRAConfig(r=2, r3=1, scale=2.0, target_types=['Conv2d'], train_modules=['head']))
    randomize_adapters(model)
    with torch.no_grad():
        model.head.weight.mul_(-1)
    visadapt.save_adapter(model, tmp_path / 'ad')
    return tmp_path / 'ad', model


# ---- the format ------------------------------------------------------------------------------------------------------
def test_files_and_keys(saved):
    directory, model = saved
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, WEIGHTS_NAME]
    tensors = load_file(directory / WEIGHTS_NAME)
    assert sorted(tensors) == sorted(
        [f'adapter.{layer}.{t}' for layer in ('stem', 'dw', 'pw') for t in ('G', 'factors.0', 'factors.1',
                                                                              'factors.2', 'factors.3')]
        + ['trained.head.weight', 'trained.head.bias'])
    assert torch.equal(tensors['adapter.pw.G'], model.pw.visadapt['default'].G.detach())
    meta = json.loads((directory / CONFIG_NAME).read_text())
    assert meta['adapter_name'] == 'default' and meta['layers'] == ['stem', 'dw', 'pw']
    assert meta['train_modules'] == ['head'] and meta['visadapt_version'] == visadapt.__version__
    assert visadapt.config_from_dict(meta['config']) == get_injection(model, 'default').config
    assert meta['config']['method'] == 'FLoRA' and meta['config']['r'] == 2 and meta['config']['scale'] == 2.0


def test_roundtrip_under_another_name_and_alongside_another_adapter(saved):
    directory, model = saved
    fresh = small_cnn()
    visadapt.inject(fresh, visadapt.LoRAConfig(r=2, include=['fc']), name='other')
    cfg = visadapt.load_adapter(fresh, directory, name='task')
    assert cfg.method == 'FLoRA' and visadapt.adapter_names(fresh) == ['other', 'task']
    with visadapt.adapters_disabled(fresh, 'other'):
        assert torch.equal(_out(fresh), _out(model))
    assert torch.equal(fresh.head.weight, model.head.weight)


def test_bf16_adapter_roundtrip(tmp_path):
    model = small_cnn()
    visadapt.inject(model, visadapt.LoRAConfig(r=2, adapter_dtype='bfloat16'))
    randomize_adapters(model)
    visadapt.save_adapter(model, tmp_path)
    assert load_file(tmp_path / WEIGHTS_NAME)['adapter.pw.A'].dtype == torch.bfloat16
    fresh = small_cnn()
    visadapt.load_adapter(fresh, tmp_path)
    assert fresh.pw.visadapt['default'].A.dtype == torch.bfloat16
    assert torch.equal(_out(fresh), _out(model))


def test_save_unknown_adapter_name(tmp_path):
    model = small_cnn()
    visadapt.inject(model, visadapt.FLoRAConfig(r=2))
    with pytest.raises(ValueError, match=r"no adapter named 'x' in this model; adapters present: \['default'\]"):
        visadapt.save_adapter(model, tmp_path, name='x')
    assert os.listdir(tmp_path) == []


# ---- bad files: one clear error, the model unchanged --------------------------------------------------------------
def _tamper_tensors(fn):
    def tamper(directory):
        tensors = load_file(directory / WEIGHTS_NAME)
        fn(tensors)
        save_file(tensors, directory / WEIGHTS_NAME)
    return tamper


def _write(name, data):
    def tamper(directory):
        (directory / name).write_bytes(data(directory) if callable(data) else data)
    return tamper


def _set_nan(t):
    t['adapter.dw.G'] = t['adapter.dw.G'].clone()
    t['adapter.dw.G'].view(-1)[0] = float('nan')


def _set_inf(t):
    t['trained.head.weight'] = t['trained.head.weight'].clone()
    t['trained.head.weight'][1, 2] = -float('inf')


BAD_FILES = [
    ('missing-key', _tamper_tensors(lambda t: t.pop('adapter.pw.factors.1')),
     ValueError, r"does not match the model: key 'adapter\.pw\.factors\.1' is missing from the file"),
    ('unexpected-key', _tamper_tensors(lambda t: t.update({'adapter.fc.G': torch.zeros(2, 2)})),
     ValueError, r"does not match the model: key 'adapter\.fc\.G' is not in the model"),
    ('wrong-shape', _tamper_tensors(lambda t: t.update({'adapter.stem.factors.0': torch.zeros(16, 3)})),
     ValueError, r"tensor 'adapter\.stem\.factors\.0' has shape \(16, 3\) in the file but \(16, 2\) in the model"),
    ('wrong-dtype-kind', _tamper_tensors(lambda t: t.update({'adapter.dw.G': t['adapter.dw.G'].long()})),
     ValueError, r"tensor 'adapter\.dw\.G' has dtype torch\.int64 in the file but torch\.float32 in the model"),
    ('nan', _tamper_tensors(_set_nan), ValueError, r"tensor 'adapter\.dw\.G' contains NaN or Inf values"),
    ('inf-in-trained-module', _tamper_tensors(_set_inf), ValueError,
     r"tensor 'trained\.head\.weight' contains NaN or Inf values"),
    ('not-safetensors', _write(WEIGHTS_NAME, b'\x89PNG\r\n\x1a\n' + bytes(200)), ValueError,
     'is not a valid safetensors file'),
    ('empty', _write(WEIGHTS_NAME, b''), ValueError, 'is not a valid safetensors file'),
    ('truncated-half', _write(WEIGHTS_NAME, lambda d: (d / WEIGHTS_NAME).read_bytes()[:300]), ValueError,
     r'is not a valid safetensors file \(truncated or another format\?\)'),
    ('truncated-tail', _write(WEIGHTS_NAME, lambda d: (d / WEIGHTS_NAME).read_bytes()[:-4]), ValueError,
     'is not a valid safetensors file'),
    ('torch-save-zip', lambda d: torch.save(load_file(d / WEIGHTS_NAME), d / WEIGHTS_NAME), ValueError,
     'is not a valid safetensors file'),
    ('config-not-json', _write(CONFIG_NAME, b'{"config": {"method": "FLoRA"'), ValueError, 'is not valid JSON'),
    ('config-binary', _write(CONFIG_NAME, b'\xff\xfe\x00\x01'), ValueError, 'is not valid JSON'),
    ('config-no-config', _write(CONFIG_NAME, b'{"layers": []}'), ValueError,
     "is not a visadapt adapter config \\(no 'config' object\\)"),
    ('config-not-object', _write(CONFIG_NAME, b'{"config": 5}'), ValueError, "no 'config' object"),
    ('config-unknown-method', _write(CONFIG_NAME, b'{"config": {"method": "NoSuch"}}'), ValueError,
     rf"{CONFIG_NAME}': unknown adapter method 'NoSuch'; registered methods"),
    ('config-bad-rank', _write(CONFIG_NAME, b'{"config": {"method": "FLoRA", "r": 0}}'), ValueError,
     rf"{CONFIG_NAME}': FLoRA rank r must be a positive integer, got 0"),
    ('config-layers-differ', lambda d: (d / CONFIG_NAME).write_text(json.dumps(
        {**json.loads((d / CONFIG_NAME).read_text()), 'layers': ['stem', 'dw', 'pw', 'gone']})), ValueError,
     "was saved for layers that differ from those its config selects in this model \\(first difference: 'gone'\\)"),
    ('no-weights-file', lambda d: os.remove(d / WEIGHTS_NAME), FileNotFoundError,
     f"adapter file .*{WEIGHTS_NAME}' not found"),
]


@pytest.mark.parametrize('tamper,exc,match', [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_bad_adapter_files_raise_one_clear_error_and_change_nothing(saved, tamper, exc, match):
    directory, _ = saved
    tamper(directory)
    model = small_cnn()
    visadapt.inject(model, visadapt.LoRAConfig(r=2, include=['fc'], train_modules=['ln']), name='other')
    model.norm.bias.requires_grad_(True)  # a user's own flag, next to the other adapter's
    randomize_adapters(model)
    before = state_snapshot(model)
    out = _out(model)
    with pytest.raises(exc, match=match):
        visadapt.load_adapter(model, directory)
    assert_unchanged(model, before)
    assert torch.equal(_out(model), out)


def test_shape_mismatch_with_another_architecture(saved):
    """An adapter saved for one model and loaded into a model whose layer has another kernel size."""
    directory, _ = saved

    class Wider(SmallCNN):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(16, 32, 3, padding=1)

    model = Wider().eval()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=r"tensor 'adapter\.pw\.factors\.2' has shape \(1, 1\) in the file but "
                                         r"\(3, 1\) in the model"):
        visadapt.load_adapter(model, directory)
    assert_unchanged(model, before)


def test_loading_twice_under_the_same_name(saved):
    directory, _ = saved
    model = small_cnn()
    visadapt.load_adapter(model, directory)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="an adapter named 'default' is already injected"):
        visadapt.load_adapter(model, directory)
    assert_unchanged(model, before)


class _Exploit:
    def __reduce__(self):
        return exec, ('import builtins; builtins._visadapt_unpickled = True',)


def test_a_pickle_is_never_unpickled(saved):
    directory, _ = saved
    (directory / WEIGHTS_NAME).write_bytes(pickle.dumps({'adapter.pw.G': _Exploit()}))
    model = small_cnn()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match='is not a valid safetensors file'):
        visadapt.load_adapter(model, directory)
    assert not hasattr(builtins, '_visadapt_unpickled')
    assert_unchanged(model, before)


def test_missing_directory():
    model = small_cnn()
    with pytest.raises(FileNotFoundError, match=f"adapter file '/no/such/dir/{CONFIG_NAME}' not found; an adapter "
                                                f"directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"):
        visadapt.load_adapter(model, '/no/such/dir')


# ---- atomic writes ---------------------------------------------------------------------------------------------------
def _dir_bytes(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


@pytest.mark.parametrize('fail', ['replace', 'fsync-second-file', 'write'])
def test_failed_save_leaves_previous_files_intact_and_no_temp_files(saved, monkeypatch, fail):
    directory, model = saved
    previous = _dir_bytes(directory)
    with torch.no_grad():
        model.pw.visadapt['default'].G.add_(1.0)
    import visadapt.core.io as vio
    if fail == 'replace':
        def boom(*args, **kwargs):
            raise OSError('disk full (simulated)')
        monkeypatch.setattr(vio.os, 'replace', boom)
    elif fail == 'fsync-second-file':
        real_fsync, calls = os.fsync, []

        def boom(fd):
            calls.append(fd)
            if len(calls) == 2:
                raise OSError('disk full (simulated)')
            real_fsync(fd)
        monkeypatch.setattr(vio.os, 'fsync', boom)
    else:
        real_fdopen = os.fdopen

        class Failing:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[:10])
                raise OSError('disk full (simulated)')
        monkeypatch.setattr(vio.os, 'fdopen', lambda fd, mode: Failing(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match='simulated'):
        visadapt.save_adapter(model, directory)
    monkeypatch.undo()
    assert _dir_bytes(directory) == previous  # no temp files, old bytes
    fresh = small_cnn()
    visadapt.load_adapter(fresh, directory)
    assert not torch.equal(fresh.pw.visadapt['default'].G, model.pw.visadapt['default'].G)


def test_save_overwrites_and_creates_directories_with_normal_permissions(saved, tmp_path):
    directory, model = saved
    with torch.no_grad():
        model.pw.visadapt['default'].G.add_(1.0)
    visadapt.save_adapter(model, directory)
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, WEIGHTS_NAME]
    fresh = small_cnn()
    visadapt.load_adapter(fresh, directory)
    assert torch.equal(_out(fresh), _out(model))
    nested = tmp_path / 'a' / 'b' / 'c'
    visadapt.save_adapter(model, nested)
    umask = os.umask(0)
    os.umask(umask)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert stat.S_IMODE(os.stat(nested / name).st_mode) == 0o666 & ~umask


def test_atomic_write_bytes(tmp_path):
    target = tmp_path / 'x.bin'
    atomic_write_bytes(str(target), b'one')
    atomic_write_bytes(str(target), b'two')
    assert target.read_bytes() == b'two' and os.listdir(tmp_path) == ['x.bin']


def test_train_modules_may_name_a_parameter(tmp_path):
    """A parameter held directly by a module (open_clip's root ``logit_scale``) trains, saves and loads like a
    train module, and is one of the adapter's state keys."""
    def build():
        torch.random.default_generator.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        model.register_parameter('temperature', nn.Parameter(torch.tensor(2.0)))
        return model
    model = build()
    visadapt.inject(model, visadapt.LoRAConfig(r=2, include=['0'], train_modules=['temperature']))
    assert model.temperature.requires_grad and not model[1].weight.requires_grad
    assert 'temperature' in visadapt.core.adapter_state_keys(model)
    with torch.no_grad():
        model.temperature.fill_(3.5)
    visadapt.save_adapter(model, tmp_path / 'a')
    fresh = build()
    visadapt.load_adapter(fresh, tmp_path / 'a')
    assert fresh.temperature.item() == 3.5 and fresh.temperature.requires_grad
    with pytest.raises(ValueError, match="'nothing' matches no module with parameters.*names no parameter"):
        visadapt.inject(build(), visadapt.LoRAConfig(r=2, include=['0'], train_modules=['nothing']))
