# LoRA baseline of the FLoRA paper's COCO setup: same model, data and schedule, LoRA on the same layers.
# r = 42: 12,930,120 trainable backbone parameters (the paper reports 12.94M).
_base_ = './mask-rcnn_convnextv2-l_fpn_1x_coco_flora.py'
model = dict(adapter=dict(_delete_=True, type='LoRA', r=42, target_types=['Conv2d', 'Linear']))
