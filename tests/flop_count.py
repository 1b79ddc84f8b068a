"""Measured FLOPs of a forward (and backward) pass, for testing the automatic forward-path choice.

``torch.utils.flop_counter`` counts ``convolution_backward`` of grouped convs as if ``groups`` were 1 (torch 2.14:
a depthwise 3×3 backward is reported 9× too high), so its formula is replaced here by the exact one: each requested
gradient (input, weight) costs as many multiply-accumulates as the forward.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask, out_shape=None, **_) -> int:
    forward = 2 * math.prod(grad_out_shape) * math.prod(w_shape[1:])
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def measured_flops(fn: Callable[[], None]) -> int:
    """Total FLOPs (2 per multiply-accumulate) of the matmuls and convolutions ``fn`` runs."""
    with FlopCounterMode(display=False, custom_mapping={aten.convolution_backward: _conv_backward_flop}) as counter:
        fn()
    return counter.get_total_flops()


def layer_flops(layer: torch.nn.Module, x_shape, training: bool, config=None) -> int:
    """FLOPs of one forward (and, when ``training``, backward with an input that needs a gradient) of ``layer``.

    With ``config`` the layer is adapted first (adapter tensors perturbed to non-zero values); without it the layer
    runs frozen, which is the work every path shares.
    """
    from visadapt_testing import randomize_adapters

    import visadapt
    model = torch.nn.Sequential(layer)
    if config is None:
        model.requires_grad_(False)
    else:
        visadapt.inject(model, config)
        randomize_adapters(model)
    x = torch.randn(x_shape, requires_grad=training)

    def run():
        if training:
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)
    return measured_flops(run)
