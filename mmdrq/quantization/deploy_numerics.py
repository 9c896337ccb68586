"""Deploy numerics: PyTorch's eval computing what the exported ONNX graph
computes in ONNX Runtime's exact sessions, float operation for float
operation, so both give the same bits.

A quantized conv/linear with an activation quantizer sums integers: the
input's integers ``clamp(round(x / s_a))`` times the weight's integers (as
the ONNX int8 container holds them), every partial sum an exact integer
while it stays below 2**24 in magnitude, whatever order a library sums in.
One per-channel multiply by ``alpha = s_a * s_w * BN factor`` and one add of
``beta`` (the bias through the BN) follow, each rounded once, as separate
elementwise ops on both sides. ``alpha`` is rounded to float32 from the
float32 scales the ONNX file holds, which ONNX Runtime recomputes the same
way (``mmdrq_runtime.session``). A BN that only follows a conv is folded
into it, as the exporter folds it; a conv kept FP then runs with the folded
float32 weight and bias (only its summation order still differs).

Training is unchanged: this is a context for evaluation only.
"""
import contextlib
import warnings
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

from .functional import quantize_int
from .graph import conv_bn_pairs
from .integers import (CONTAINER_BIT, bn_affine, folded_bias, int_range,
                       integer_alpha, scale_at, weight_integers)
from .forms import form_of
from .layers import BitSwitchable, QConv2d, QuantLayer
from .per_level import EXPORT_REFUSAL, PerLevel

# float32 holds every integer up to 2**24 exactly
EXACT_SUM = 2**24


def active_norm(norm: nn.Module) -> nn.Module:
    """The BN a (switchable, transitional or plain) BN runs now."""
    return norm.active() if isinstance(norm, BitSwitchable) else norm


def _channels(t: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Per-output-channel values shaped to broadcast on the layer's output
    (conv: channels on dim 1; linear: the last dim)."""
    return t.view(-1, 1, 1) if isinstance(layer, nn.Conv2d) else t


class _Numerics:
    """The per-layer forwards of ``deploy_numerics``; constants cached per
    (layer, bit, BN copy) for the context's lifetime."""

    def __init__(self, pairs: Dict[str, str], modules: dict):
        self.pairs, self.modules = pairs, modules
        self.cache = {}

    def fold(self, name: str):
        """(factor, shift, BN copy) of the BN folded into ``name``."""
        bn = self.pairs.get(name)
        if bn is None:
            out = self.modules[name].weight.shape[0]
            return torch.ones(out, dtype=torch.float64), \
                torch.zeros(out, dtype=torch.float64), None
        norm = active_norm(self.modules[bn])
        return (*bn_affine(norm), norm)

    def quantized(self, name: str, layer, x: torch.Tensor) -> torch.Tensor:
        bit = layer.bit
        act = layer.act_quantizer
        act_scale = scale_at(act, bit)
        factor, shift, norm = self.fold(name)
        key = (name, bit, id(norm))
        if key not in self.cache:
            q, scale = weight_integers(layer, bit)
            weight_scale = (scale * factor).float()
            self.cache[key] = (
                layer.from_channel_major(q.float()),
                integer_alpha(act_scale, weight_scale),
                folded_bias(layer, factor, shift))
            check_exact_sums(name, act, bit, q)
        weight, alpha, beta = self.cache[key]
        lo, hi = int_range(act, bit)
        x_int = quantize_int(x, act_scale, (lo, hi), 0,
                             (lo, hi), 'half_even', 'double_rounding')
        if isinstance(layer, QConv2d):
            y = nn.Conv2d._conv_forward(layer, x_int, weight, None)
        else:
            y = F.linear(x_int, weight)
        return y * _channels(alpha, layer) + _channels(beta, layer)

    def fp_conv(self, name: str, layer, x: torch.Tensor) -> torch.Tensor:
        factor, shift, norm = self.fold(name)
        key = (name, None, id(norm))
        if key not in self.cache:
            weight = layer.weight.detach().double() * \
                factor.view(-1, 1, 1, 1)
            self.cache[key] = (weight.float(),
                               folded_bias(layer, factor, shift))
        weight, bias = self.cache[key]
        return layer._conv_forward(x, weight, bias)


def check_exact_sums(name: str, act, bit: int, q: torch.Tensor):
    """Warn when a layer's integer sums may exceed 2**24 (largest input
    integer times the largest per-channel sum of |weight integers|; the
    container's factor 2**(8 - bit) scales every term alike, so it does not
    count): then float32 may round them and the summation order matters
    again."""
    lo, hi = int_range(act, bit)
    weight_sum = float(q.double().abs().flatten(1).sum(1).max())
    bound = max(-lo, hi) * weight_sum / 2**(CONTAINER_BIT - bit)
    if bound >= EXACT_SUM:
        warnings.warn(f'deploy numerics: layer {name!r} at {bit} bits may '
                      f'sum integers up to {bound:.3g} >= 2**24; its sums '
                      'can round, and ONNX Runtime may differ there')


def _exact_layer(module: nn.Module) -> bool:
    return isinstance(module, QuantLayer) and form_of(module).sums_integers \
        and module.act_quantizer is not None


@contextlib.contextmanager
def deploy_numerics(model: nn.Module,
                    run_forward: Callable[[nn.Module], object]):
    """Within the block, ``model``'s eval forward computes as the exported
    ONNX graph does in ONNX Runtime's exact sessions (module docstring):
    quantized Conv2d/Linear layers with an input quantizer sum integers
    and then scale; a BN that is its conv's only consumer is folded into
    it (and runs as identity). ``run_forward(model)`` runs one forward (any
    input of the right shape) to find those conv -> BN pairs.

    Layers of other types, and weight-only quantized ones, run as usual.
    """
    if model.training:
        raise RuntimeError('deploy_numerics is for evaluation: call '
                           'model.eval() first')
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(getattr(module, 'act_quantizer', None), PerLevel):
            raise ValueError(f'deploy numerics: layer {name!r}: '
                             f'{EXPORT_REFUSAL}')
    pairs = conv_bn_pairs(model, run_forward)
    numerics = _Numerics(pairs, modules)
    patched = []
    for name, module in modules.items():
        if _exact_layer(module):
            forward = lambda x, n=name, m=module: numerics.quantized(n, m, x)
        elif type(module) is nn.Conv2d and name in pairs:
            forward = lambda x, n=name, m=module: numerics.fp_conv(n, m, x)
        else:
            pairs.pop(name, None)  # runs as usual: its BN too
            continue
        patched.append((module, forward))
    for bn in set(pairs.values()):
        patched.append((modules[bn], nn.Identity.forward.__get__(
            modules[bn])))
    for module, forward in patched:
        module.forward = forward
    try:
        yield model
    finally:
        for module, _ in patched:
            del module.forward
