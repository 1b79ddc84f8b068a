"""The cost model behind ``forward_path='auto'``: weight path (build ΔW, run the layer with W + ΔW) or bypass (run
the adapter's chain on the activations), whichever is predicted cheaper for an input shape.

Both paths are exact; only speed differs. Costs are in multiply-accumulate equivalents (MACs):

* training on the weight path pays the layer's weight gradient (one more op of the layer's size) and three passes
  (forward, and backward twice) of building ΔW: ``delta_macs``, ``delta_ops`` matmul calls and moving |W|-sized
  tensors (ΔW, W + ΔW, their gradients: ``weight_elem_macs`` per weight element);
* training on the bypass pays its chain for the forward, the parameter gradients and, when the input needs a
  gradient, the input gradient (each pass: ``bypass_macs``, ``bypass_ops`` conv or matmul calls, and
  ``bypass_elem_macs`` per activation element (input and output) the chain reads or writes once the activations no
  longer fit in the caches: a rank-r chain does ~r MACs per element, so on large activations it is bound by memory
  traffic; below ``cached_elems`` elements the charge ramps up from 0). A conv reading ≤ ``narrow_channels``
  channels (RGB) pays ``narrow_input_grad`` for its input-gradient pass;
* at inference only the forward work counts.

The fixed cost per call matters on CPU: one training pass of a tiny conv took ~470 µs here (mkldnn), of a tiny
matmul ~60 µs, so a three-conv chain on a 6×6 feature map costs more than building a 80×240 ΔW.

The constants of :data:`CPU` were chosen by hand against per-layer timings of one training step of every distinct
FLoRA and SVFT layer of ConvNeXt-T/atto, EfficientNet-Lite0, ViT-S and an SDXL down block (the per-layer path
timings of ``visadapt-bench`` on the project's 2-core AMD EPYC machine, docs/bench.md): with them the chosen path
is within 10% of the faster one on all 374 measurements of three runs; the model before (MACs plus traffic only)
got 356 (misses: EfficientNet-Lite0's pointwise convs on 6×6 maps, ConvNeXt-atto's stage-2 layers, ViT-S's patch
embedding, up to 1.45× slower). The CUDA constants are estimates from an H100's published figures (~200 TMAC/s
bf16, ~3 TB/s, ~5 µs per launched kernel in eager mode) and have not been measured: no GPU was available. Another
device type uses :data:`CPU`. :func:`set_cost_model` replaces a device type's constants (e.g. after measuring your
hardware's per-layer path timings with ``visadapt-bench``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Sequence

from .site import Site, base_flops, output_positions

__all__ = ['PathCost', 'CPU', 'CUDA', 'cost_model', 'set_cost_model']


@dataclass(frozen=True)
class PathCost:
    """MAC-equivalent charges of the path choice beyond the MACs themselves.

    Attributes:
        bypass_elem_macs: per activation element (input and output) one pass of the bypass moves, out of cache.
        cached_elems: below about this many activation elements, moving them is nearly free (the charge per element
            ramps up linearly from 0 to ``bypass_elem_macs`` here).
        weight_elem_macs: per weight element the weight path moves in one pass (ΔW, W + ΔW and, backward, their
            gradients; the layer's op re-reads a weight that changed).
        conv_op_macs: fixed cost of one conv call of a conv layer's bypass chain.
        matmul_op_macs: fixed cost of one matmul call (a Linear's chain, building ΔW).
        narrow_input_grad: cost of the chain's input-gradient pass relative to its forward for a conv that reads at
            most ``narrow_channels`` channels per group (RGB stems, patch embeddings): on CPU (mkldnn) that
            gradient ran 5.0-5.2× its forward, 0.9-1.6× for wider inputs.
        narrow_channels: see ``narrow_input_grad``.
    """
    bypass_elem_macs: float = 32.0
    cached_elems: int = 1 << 18
    weight_elem_macs: float = 2.0
    conv_op_macs: float = 2e6
    matmul_op_macs: float = 4e5
    narrow_input_grad: float = 5.0
    narrow_channels: int = 4

    def weight_cost(self, adapter, x_shape: Sequence[int], training: bool) -> float:
        site: Site = adapter.site
        weight_elems = 1
        for size in site.weight_shape:
            weight_elems *= size
        one_pass = adapter.delta_macs() + adapter.delta_ops() * self.matmul_op_macs + self.weight_elem_macs * weight_elems
        return base_flops(site, x_shape) + 3 * one_pass if training else one_pass

    def bypass_cost(self, adapter, x_shape: Sequence[int], training: bool, input_grad: bool = True) -> float:
        site: Site = adapter.site
        elements = 1
        for size in x_shape:
            elements *= size
        elements += output_positions(site, x_shape) * site.out_features
        traffic = self.bypass_elem_macs * elements * min(1.0, elements / self.cached_elems)
        op = self.conv_op_macs if site.is_conv else self.matmul_op_macs
        one_pass = adapter.bypass_macs(x_shape) + traffic + adapter.bypass_ops() * op
        if not training:
            return one_pass
        # forward and parameter gradients, plus the input gradient when x needs one (not for a stem reading images)
        narrow = site.is_conv and site.in_features <= self.narrow_channels
        return (2 + (0 if not input_grad else self.narrow_input_grad if narrow else 1)) * one_pass

    def prefers_bypass(self, adapter, x_shape: Sequence[int], training: bool, input_grad: bool = True) -> bool:
        return (self.bypass_cost(adapter, x_shape, training, input_grad)
                < self.weight_cost(adapter, x_shape, training))


#: fitted on the project's 2-core CPU machine (see the module docstring)
CPU = PathCost()
#: estimates for a datacenter GPU in eager mode (bf16): launches dominate small chains, bandwidth large activations;
#: not measured (no GPU was available)
CUDA = PathCost(bypass_elem_macs=128.0, cached_elems=1 << 24, weight_elem_macs=64.0, conv_op_macs=1e9,
                matmul_op_macs=1e9, narrow_input_grad=1.0)

_MODELS: Dict[str, PathCost] = {'cpu': CPU, 'cuda': CUDA}


def cost_model(device_type: str) -> PathCost:
    """The constants used for tensors on ``device_type`` (``'cpu'``, ``'cuda'``, ...; others get :data:`CPU`)."""
    return _MODELS.get(device_type, CPU)


def set_cost_model(device_type: str, model: PathCost) -> None:
    """Use ``model`` for tensors on ``device_type`` from now on. Adapters cache their choice per input shape, so
    set it before the first forward (or re-inject)."""
    if not isinstance(model, PathCost):
        raise TypeError(f'set_cost_model needs a visadapt.core.path_cost.PathCost, got {type(model).__name__}')
    bad = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
           if not getattr(model, f.name) >= 0}
    if bad:
        raise ValueError(f'PathCost fields must be finite numbers >= 0, got {bad}')
    _MODELS[device_type] = model
