# BitFit baseline of the FLoRA paper's ADE20K setup: only the backbone's biases train (plus the heads).
_base_ = './upernet_convnextv2-l_160k_ade20k_flora.py'
model = dict(adapter=dict(_delete_=True, type='BitFit'))
