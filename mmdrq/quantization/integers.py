"""The public integer view of a converted model: what a deployment reads.

Every number an exported graph holds comes from here: a weight's integers
at a bit in the int8 container, the container's width, an activation's
scale, sign and integer range at a bit, and a BN's affine folded into the
layer before it. Deploy code reads these, never a quantizer's internals.
"""
from typing import Tuple

import torch
from torch import nn

# ONNX's int8/uint8 containers: a b-bit integer is held as q * 2**(8 - b);
# one name for the export and the deploy host's reader (torch-free)
from mmdrq_runtime.artifact import CONTAINER_BIT
from .bitwidths import signed_range, unsigned_range
from .functional import requantize


def check_container(bit: int) -> int:
    """``bit`` if the int8/uint8 container holds it."""
    if bit > CONTAINER_BIT:
        raise ValueError(f'bit {bit} does not fit the int8/uint8 containers '
                         f'(at most {CONTAINER_BIT})')
    return bit


def container_integers(quantizer: nn.Module, weight: torch.Tensor,
                       bit: int):
    """(integers in the int8 container, float64 per-channel scale of the
    container) of ``weight`` (output channels first) at ``bit``: the stored
    INT-h integers after the second rounding, ``q * 2**(8 - bit)`` with
    scale ``s * 2**(h - bit) * 2**-(8 - bit)`` (the same weights exactly;
    the alignment keeps ONNX Runtime's int32 bias as fine as at 8 bits)."""
    check_container(bit)
    q_h = quantizer.integers(weight)  # the stored INT-h integers
    shift = quantizer.shift(bit)  # h - bit (+ the bit's step shift)
    q = requantize(q_h, shift, *signed_range(bit), quantizer.rounding,
                   second_rounding_mode(quantizer))
    align = CONTAINER_BIT - bit
    scale = quantizer.scale[0].detach().double().expand(weight.shape[0]) * \
        2.0**(shift - align)
    return (q * 2**align).to(torch.int8), scale


def second_rounding_mode(quantizer: nn.Module) -> str:
    """How a weight quantizer derives a lower bit from the stored integers:
    ``double_rounding`` (round by ``rounding``) or ``floor`` (shift)."""
    return 'floor' if quantizer.variant == 'floor' else 'double_rounding'


def weight_integers(layer: nn.Module, bit: int):
    """``container_integers`` of a QConv2d/QLinear's weight."""
    return container_integers(layer.weight_quantizer, layer.weight, bit)


def uninitialised_quantizers(layer: nn.Module) -> list:
    """Names of ``layer``'s quantizers whose scales were never set (a layer
    converted but never run: its integers and activation scales would be
    placeholders)."""
    return [type(part).__name__ for part in layer.quantizers()
            if not bool(part.initialized.all())]


def is_signed(act: nn.Module) -> bool:
    """Whether an activation quantizer is signed; an error before its
    first forward decided it."""
    sign = int(act.signed)
    if sign < 0:
        raise ValueError('activation sign undecided (the model never ran a '
                         'forward)')
    return bool(sign)


def int_range(act: nn.Module, bit: int) -> Tuple[int, int]:
    """The integer range of an activation quantizer when its layer runs
    at ``bit``."""
    bit, _ = act.grid(bit)
    return signed_range(bit) if is_signed(act) else unsigned_range(bit)


def scale_at(act: nn.Module, bit: int) -> torch.Tensor:
    """An activation quantizer's scale when its layer runs at ``bit``
    (detached)."""
    return act.scale[act.grid(bit)[1]].detach()


def bn_affine(bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(factor, shift) of an eval BN in float64: ``y * factor + shift``."""
    var = bn.running_var.double()
    factor = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        factor = factor * bn.weight.double()
    shift = -bn.running_mean.double() * factor
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return factor, shift


def folded_bias(layer: nn.Module, factor, shift) -> torch.Tensor:
    """The layer's bias through the BN ``(factor, shift)``, float32."""
    bias = layer.bias.detach().double() if layer.bias is not None else \
        torch.zeros(layer.weight.shape[0], dtype=torch.float64)
    return (bias * factor + shift).float()


def integer_alpha(act_scale: torch.Tensor,
                  weight_scale: torch.Tensor) -> torch.Tensor:
    """``s_a * s_w`` of float32 scales, rounded once to float32."""
    return (act_scale.double() * weight_scale.double()).float()
