# DoRA baseline of the FLoRA paper's COCO setup (LoRA r = 42 plus one magnitude per output channel).
_base_ = './mask-rcnn_convnextv2-l_fpn_1x_coco_flora.py'
model = dict(adapter=dict(_delete_=True, type='DoRA', r=42, target_types=['Conv2d', 'Linear']))
