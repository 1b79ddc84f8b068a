# Full fine-tuning baseline of the FLoRA paper's COCO setup: every parameter trains; checkpoints hold everything.
_base_ = './mask-rcnn_convnextv2-l_fpn_1x_coco_flora.py'
model = dict(adapter=dict(_delete_=True, type='FullFinetune'))
