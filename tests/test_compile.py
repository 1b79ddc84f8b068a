"""torch.compile as a supported path: a compiled adapted model equals eager (outputs and gradients), and merging or
unmerging after compiling changes the compiled model's outputs exactly as it changes the eager model's.

Two representative models, kept tiny so inductor's compile fits in CI: a conv net (FLoRA on every conv, grouped and
depthwise ones included, with both forward paths in play) and a ViT block (LoRA on the q/v slices of the fused qkv
projection, FLoRA on the MLP). The adapters are moved off their identity init first, so ΔW ≠ 0 and the checks are not
vacuous.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from visadapt_testing import randomize_adapters

import visadapt


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.grouped = nn.Conv2d(24, 24, 3, padding=1, groups=4)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pw(self.dw(x)))
        return self.head(self.grouped(x).mean(dim=(2, 3)))


def _vit() -> nn.Module:
    import timm
    return timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, depth=1,
                             embed_dim=48, num_heads=3, num_classes=5)


CASES = {
    'convnet': (ConvNet, lambda: visadapt.FLoRAConfig(r=4, r3=2, target_types=['Conv2d'], train_modules=['head']),
                (2, 3, 16, 16)),
    'vit': (_vit, lambda: visadapt.LoRAConfig(r=4, include=['attn.qkv'], slices=['q', 'v'], train_modules=['head']),
            (2, 3, 32, 32)),
}


def _grads(model: nn.Module):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize('case', sorted(CASES))
def test_compiled_equals_eager_and_follows_merge(case):
    factory, config, shape = CASES[case]
    torch.random.default_generator.manual_seed(0)
    model = factory().train()
    visadapt.inject(model, config())
    if case == 'vit':  # a second adapter of another method on the MLP
        visadapt.inject(model, visadapt.FLoRAConfig(r=4, include=['mlp.fc1', 'mlp.fc2']), name='mlp')
    randomize_adapters(model)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model)

    eager_out = model(x)
    eager_out.square().mean().backward()
    eager_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    compiled_out = compiled(x)
    compiled_out.square().mean().backward()
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-5)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)

    model.eval()
    with torch.no_grad():
        adapted = model(x)
        visadapt.merge(model)
        merged_eager, merged_compiled = model(x), compiled(x)
        visadapt.unmerge(model)
        unmerged_compiled = compiled(x)
        with visadapt.adapters_disabled(model):
            base_eager, base_compiled = model(x), compiled(x)
    torch.testing.assert_close(merged_eager, adapted, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged_compiled, merged_eager, rtol=1e-4, atol=1e-5)  # ΔW not applied twice
    torch.testing.assert_close(unmerged_compiled, adapted, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(base_compiled, base_eager, rtol=1e-4, atol=1e-5)
    assert (adapted - base_eager).abs().max() > 1e-3  # the adapters do change the output
