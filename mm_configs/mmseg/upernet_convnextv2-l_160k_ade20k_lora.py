# LoRA baseline of the FLoRA paper's ADE20K setup (same layers, r = 42).
_base_ = './upernet_convnextv2-l_160k_ade20k_flora.py'
model = dict(adapter=dict(_delete_=True, type='LoRA', r=42, target_types=['Conv2d', 'Linear']))
