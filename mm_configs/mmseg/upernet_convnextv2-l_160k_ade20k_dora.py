# DoRA baseline of the FLoRA paper's ADE20K setup (LoRA r = 42 plus one magnitude per output channel).
_base_ = './upernet_convnextv2-l_160k_ade20k_flora.py'
model = dict(adapter=dict(_delete_=True, type='DoRA', r=42, target_types=['Conv2d', 'Linear']))
