# Full fine-tuning baseline of the FLoRA paper's ADE20K setup: every parameter trains.
_base_ = './upernet_convnextv2-l_160k_ade20k_flora.py'
model = dict(adapter=dict(_delete_=True, type='FullFinetune'))
