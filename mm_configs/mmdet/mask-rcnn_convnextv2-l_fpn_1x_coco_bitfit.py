# BitFit baseline of the FLoRA paper's COCO setup: only the backbone's biases train (plus neck and heads).
_base_ = './mask-rcnn_convnextv2-l_fpn_1x_coco_flora.py'
model = dict(adapter=dict(_delete_=True, type='BitFit'))
