# FLoRA paper (Si et al., "Maintaining Structural Integrity in Parameter Spaces for Parameter Efficient Fine-tuning",
# Table 9): Mask R-CNN + FPN on COCO with a ConvNeXt-V2-L backbone, 12 epochs, AdamW lr 1e-4, weight decay 0.05,
# batch 32 (8 GPUs x 4 images); FLoRA with r3 = 2 and s = 4 on every backbone convolution. Everything else is
# MMDetection's default (mask-rcnn_r50_fpn, coco_instance, schedule_1x, default_runtime).
#
# ConvNeXt-V2's pointwise 1x1 convolutions are nn.Linear layers (as in the official code), so "all convolutions"
# means Conv2d (stem, downsampling, 7x7 depthwise) + Linear (pointwise): 112 layers. With r = 42 for every method,
# the trainable backbone parameters are (visadapt count; paper's Table 1 in brackets): FLoRA 12,840,493 (12.77M),
# LoRA 12,930,120 (12.94M), DoRA 13,095,432 (13.07M), BitFit 165,312 (0.2M), full fine-tuning 196M (196M).
#
# Weights: timm's convnextv2_large.fcmae_ft_in22k_in1k (model.safetensors from the HF hub repo
# timm/convnextv2_large.fcmae_ft_in22k_in1k), saved under checkpoints/, or set
#   --cfg-options model.backbone.pretrained=/path/to/convnextv2_large.safetensors
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
# visadapt: import the integration; model type AdaptedModel builds model_type, loads the pretrained weights, then
# injects the adapter (every runner, tools/test.py and the inference APIs build it so)
custom_imports = dict(imports=['visadapt.integrations.openmmlab'], allow_failed_imports=False)
pretrained = 'checkpoints/convnextv2_large.fcmae_ft_in22k_in1k.safetensors'

model = dict(
    type='AdaptedModel',
    model_type='MaskRCNN',
    adapter=dict(type='FLoRA', r=42, r3=2, scale=4.0, target_types=['Conv2d', 'Linear']),
    backbone=dict(
        _delete_=True,
        type='TimmBackbone',
        model_name='convnextv2_large',
        out_indices=(0, 1, 2, 3),
        pretrained=pretrained,
        grad_checkpointing=False),
    neck=dict(in_channels=[192, 384, 768, 1536]))

train_dataloader = dict(batch_size=4, num_workers=4)  # x 8 GPUs = 32
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05))
auto_scale_lr = dict(enable=False, base_batch_size=32)
