"""Weight perturbation per layer and bit: what quantizing costs a layer.

With the per-parameter Hessian trace, ``trace * ||Q_b(W) - W||^2`` is the
loss increase a second-order expansion predicts for running that layer at
b bits (HAWQ-V2); the SubNet search can minimise its sum.
"""
from typing import Dict

import torch
from torch import nn

from mmdrq.quantization.layers import quantized_layers


@torch.no_grad()
def weight_perturbations(model: nn.Module) -> Dict[str, Dict[int, float]]:
    """``{layer: {bit: ||Q_b(W) - W||^2}}`` for every quantized layer, with
    the layer's own (trained) scales, summed in float64."""
    result = {}
    for name, module in quantized_layers(model).items():
        weight = module.weight_to_quantize().detach()
        result[name] = {
            bit: float((module.weight_quantizer(weight, bit).double() -
                        weight.double()).square().sum())
            for bit in module.bits}
    return result
