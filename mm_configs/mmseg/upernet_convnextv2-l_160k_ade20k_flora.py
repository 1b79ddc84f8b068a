# FLoRA paper (Table 9): UperNet on ADE20K with a ConvNeXt-V2-L backbone, 160k iterations, AdamW lr 1e-4, weight
# decay 0.05, batch 16 (8 GPUs x 2 images); FLoRA with r3 = 2 and s = 4 on every backbone convolution (Conv2d +
# the pointwise Linear layers, see the mmdet config). Everything else is MMSegmentation's default
# (upernet_convnext, ade20k 512x512, schedule_160k, default_runtime).
#
# Weights: timm's convnextv2_large.fcmae_ft_in22k_in1k (model.safetensors), saved under checkpoints/, or set
#   --cfg-options model.backbone.pretrained=/path/to/convnextv2_large.safetensors
_base_ = [
    'mmseg::_base_/models/upernet_convnext.py',
    'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_160k.py',
]
# visadapt: import the integration; model type AdaptedModel builds model_type, loads the pretrained weights, then
# injects the adapter (every runner, tools/test.py and the inference APIs build it so)
custom_imports = dict(imports=['visadapt.integrations.openmmlab'], allow_failed_imports=False)
pretrained = 'checkpoints/convnextv2_large.fcmae_ft_in22k_in1k.safetensors'
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)

model = dict(
    type='AdaptedModel',
    model_type='EncoderDecoder',
    adapter=dict(type='FLoRA', r=42, r3=2, scale=4.0, target_types=['Conv2d', 'Linear']),
    data_preprocessor=data_preprocessor,
    backbone=dict(
        _delete_=True,
        type='TimmBackbone',
        model_name='convnextv2_large',
        out_indices=(0, 1, 2, 3),
        pretrained=pretrained,
        grad_checkpointing=False),
    decode_head=dict(in_channels=[192, 384, 768, 1536], num_classes=150),
    auxiliary_head=dict(in_channels=768, num_classes=150),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

train_dataloader = dict(batch_size=2, num_workers=4)  # x 8 GPUs = 16
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=160000),
]
