"""Quantized Conv2d and Linear: drop-in subclasses of the torch layers."""
import contextlib
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmengine.registry import DefaultScope

from mmdrq.registry import MODELS
from .bitwidths import check_bit, check_bits
from .per_level import PerLevel, last_called


def build_in_scope(cfg: dict) -> nn.Module:
    """Build from mmdrq's registry whatever the caller's default scope:
    ``type='ActQuantizer'`` must resolve inside an mmdet or mmseg run too."""
    with DefaultScope.overwrite_default_scope('mmdrq'):
        return MODELS.build(cfg)


class BitSwitchable:
    """Mixin for modules that run at one bit of ``bits`` at a time.

    Switching is one attribute write: whatever depends on the bit reads
    ``self.bit`` in the forward.
    """
    bits: tuple
    bit: int

    def set_bit(self, bit: int):
        """Run at ``bit``, one of ``bits``: the one writer of ``self.bit``
        (bit control calls it)."""
        self.bit = check_bit(bit, self.bits)


class QuantLayer(BitSwitchable):
    """Shared behaviour of quantized layers: build from a float layer,
    quantize the input and the weight, cache the weight in eval mode.
    Subclasses put it before the torch layer (``QConv2d(QuantLayer,
    nn.Conv2d)``) and add ``forward`` and ``_empty_like``."""

    # What the rest of mmdrq asks of a form (forms.py names each float
    # type's form): a weight row counts once per input element (transposed
    # convs scatter each input) rather than per output element; deploy
    # numerics computes the form as integer sums, then a scale, as ONNX
    # Runtime's exact sessions do.
    macs_per_input = False
    sums_integers = False

    def __init__(self, *args, bits=(8, 6, 4, 2),
                 weight_quantizer=dict(type='DoubleRoundingQuantizer'),
                 act_quantizer=dict(type='ActQuantizer'), **kwargs):
        super().__init__(*args, **kwargs)  # the torch layer's
        self._setup(bits, weight_quantizer, act_quantizer)

    def extra_repr(self):
        return super().extra_repr() + f', bit={self.bit}'

    def macs(self, args: tuple, kwargs: dict, out) -> int:
        """MACs per image of one call: a weight row (dim 0 of the
        parameter) is one output element's dot product (or one input
        element's scatter, ``macs_per_input``)."""
        x = args[0] if args else next(iter(kwargs.values()))
        xs = x if isinstance(x, (list, tuple)) else [x]  # TridentConv
        outs = out if isinstance(out, (list, tuple)) else [out]
        batch = xs[0].shape[0] if xs[0].dim() > 1 else 1
        counted = xs if self.macs_per_input else outs
        return sum(t.numel() for t in counted) // batch * \
            self.float_weight[0].numel()

    def _setup(self, bits, weight_quantizer: dict,
               act_quantizer: Optional[dict]):
        self.bits = check_bits(bits)
        self.bit = self.bits[0]
        with torch.no_grad():
            channels = self.weight_to_quantize().shape[0]
        self.weight_quantizer = build_in_scope(
            dict(weight_quantizer, bits=self.bits, num_channels=channels))
        self.act_quantizer = None if act_quantizer is None else \
            build_in_scope(dict(act_quantizer, bits=self.bits))
        self._cache_key = None
        self._cache_weight = None

    @classmethod
    def from_float(cls, module, bits: Sequence[int],
                   weight_quantizer: dict = dict(type='DoubleRoundingQuantizer'),
                   act_quantizer: Optional[dict] = dict(type='ActQuantizer')):
        """Wrap ``module``'s own parameters (no copy) in a quantized layer."""
        with torch.device('meta'):
            new = cls._empty_like(module)
        new.weight = module.weight
        new.bias = module.bias
        new.train(module.training)
        with torch.device(module.weight.device):
            new._setup(bits, weight_quantizer, act_quantizer)
        return new

    def train(self, mode: bool = True):
        self._cache_key = self._cache_weight = None
        return super().train(mode)

    # The parameter the weight quantizer reads (its state-dict name), and
    # whether the integers of ``weight_to_quantize`` restore it exactly
    # (``from_channel_major`` of them is the parameter): not so for a
    # weight the layer transforms before use (weight standardization).
    weight_name = 'weight'
    integer_weight = True
    _swapped_weight = None  # the weight ``quantized_parameter`` swapped in

    @property
    def float_weight(self) -> nn.Parameter:
        """The stored FP parameter the quantizer reads (whatever a forward
        of the layer sees as its weight)."""
        return self._parameters[self.weight_name]

    def weight_to_quantize(self) -> torch.Tensor:
        """The FP tensor the weight quantizer sees, output channels on dim
        0 (per-channel scales)."""
        return self.to_channel_major(self.float_weight)

    def to_channel_major(self, weight: torch.Tensor) -> torch.Tensor:
        """The parameter's layout -> output channels on dim 0."""
        return weight

    def from_channel_major(self, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of ``to_channel_major``."""
        return weight

    @contextlib.contextmanager
    def quantized_parameter(self):
        """Within the block, the weight attribute is the fake-quantized
        weight of the current bit (what a forward reading ``self.weight``,
        or an owner reading ``child.weight``, then uses), as
        ``torch.func.functional_call`` swaps parameters. Nested (an owner
        reading a child's weight and calling the child), the weight is
        already the quantized one: it is not quantized again."""
        if self._swapped_weight is not None:
            yield self._swapped_weight
            return
        quantized = self.quantized_weight()
        param = self._parameters[self.weight_name]
        self._parameters[self.weight_name] = self._swapped_weight = quantized
        try:
            yield quantized
        finally:
            self._parameters[self.weight_name] = param
            self._swapped_weight = None

    def quantizers(self) -> list:
        """This layer's own quantizers (not those of quantized children),
        each level's copy of a ``PerLevel`` one."""
        from .learned_scale import LearnedScaleQuantizer
        parts = [copy_ for m in self.children() for copy_ in
                 (m.levels if isinstance(m, PerLevel) else (m, ))]
        return [m for m in parts if isinstance(m, LearnedScaleQuantizer)]

    def _quantize_weight(self) -> torch.Tensor:
        return self.from_channel_major(
            self.weight_quantizer(self.weight_to_quantize(), self.bit))

    def quantized_weight(self) -> torch.Tensor:
        """Fake-quantized weight of the current bit, in the layout the
        layer's op uses.

        In eval mode without autograd it is cached and recomputed only when
        the bit, the weight or the scale changed: tensor version counters
        catch in-place updates (optimizer steps, ``load_state_dict``) at no
        cost. Writes through ``.data`` (MMEngine's EMA swap) bypass them;
        ``train()`` / ``eval()`` drop the cache, and MMEngine's loops call
        ``eval()`` after their hooks have swapped weights. Within
        ``quantized_parameter`` it is the swapped-in weight.
        """
        if self._swapped_weight is not None:
            return self._swapped_weight
        weight = self.float_weight
        scale = self.weight_quantizer.scale
        # a cached tensor must not carry a graph (frozen weights with a
        # trainable scale would be backpropagated through twice)
        if self.training or (torch.is_grad_enabled() and
                             (weight.requires_grad or scale.requires_grad)):
            return self._quantize_weight()
        key = (self.bit, weight.data_ptr(), weight._version,
               scale.data_ptr(), scale._version)
        if key != self._cache_key:
            self._cache_weight = self._quantize_weight()
            # initialisation may have written the scale: key after the call
            self._cache_key = (self.bit, weight.data_ptr(), weight._version,
                               scale.data_ptr(), scale._version)
        return self._cache_weight

    def quantize_input(self, x):
        """``x`` fake-quantized at the layer's bit (each tensor of a list
        or tuple: TridentConv's branches)."""
        if self.act_quantizer is None:
            return x
        if isinstance(x, (list, tuple)):
            return type(x)(self.act_quantizer(t, self.bit) for t in x)
        return self.act_quantizer(x, self.bit)

    def saved_as_recipes(self, x: torch.Tensor, x_q: torch.Tensor,
                         w_q: torch.Tensor):
        """Context for the layer's own op: autograd keeps recipes for the
        quantized input ``x_q`` and weight ``w_q`` instead of the tensors,
        and the backward redoes the fake quantization from ``x`` (which the
        act quantizer keeps anyway) and the weight. An activation and a
        weight copy less per layer in eager training, for two extra fused
        kernels in the backward. A no-op for what is not saved as such:
        under torch.compile (Inductor chooses what to recompute) and for an
        op that saves casts (autocast)."""
        if not self.training or not torch.is_grad_enabled() \
                or torch.compiler.is_compiling():
            return contextlib.nullcontext()
        bit = self.bit
        recipes = {}
        if x_q is not x:
            act = last_called(self.act_quantizer)  # PerLevel: this call's
            recipes[_tensor_key(x_q)] = (act, x)
        # a weight shared between bits (``shared_rounding``) is kept anyway
        if w_q is not self.weight and \
                not getattr(self.weight_quantizer, 'sharing', False):
            recipes[_tensor_key(w_q)] = (self.weight_quantizer, self.weight)

        def pack(tensor):  # the tensor or a view of it (linear: w_q.t())
            recipe = recipes.get(_tensor_key(tensor))
            if recipe is None:
                return tensor
            return _Recipe(*recipe, tensor.shape, tensor.stride(),
                           tensor.storage_offset())

        def unpack(saved):  # in the backward's grad mode: with a graph
            if not isinstance(saved, _Recipe):  # only under create_graph
                return saved
            return saved.quantizer(saved.source, bit).as_strided(
                saved.shape, saved.stride, saved.offset)
        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _tensor_key(tensor):
    """Storage identity: a recomputed tensor has the same layout, so views
    of it are rebuilt with ``as_strided``."""
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes(), tensor.dtype


class _Recipe:
    """A saved fake-quantized tensor (or view), kept as its quantizer,
    source and view geometry."""
    __slots__ = ('quantizer', 'source', 'shape', 'stride', 'offset')

    def __init__(self, quantizer, source, shape, stride, offset):
        self.quantizer, self.source = quantizer, source
        self.shape, self.stride, self.offset = shape, stride, offset


def quantizers_ready(model: nn.Module, ignore=()) -> bool:
    """Whether every quantizer of ``model`` (but those of the layers named
    in ``ignore``) has initialised all its scales.

    Until then a forward may read the device (lazy initialisation), which
    breaks a ``torch.compile`` graph; callers run eagerly before that.
    """
    return all(quantizer.ready
               for name, module in quantized_layers(model).items()
               if name not in ignore
               for quantizer in module.quantizers())


def owner_weight_reads(model: nn.Module) -> Dict[str, str]:
    """Quantized layers whose weight an owner's own code reads
    (``WeightReadingOwner.mmdrq_weight_reads``: BEiT's
    ``F.linear(x, self.qkv.weight)``) -> the owner's name ('' for the
    model itself)."""
    return {f'{owner}.{child}' if owner else child: owner
            for owner, module in model.named_modules()
            for child in getattr(module, 'mmdrq_weight_reads', ())}


@contextlib.contextmanager
def recording_calls(model: nn.Module):
    """Yields the set of quantized layers' names whose forward runs in the
    block. A layer converted but never called runs in full precision: its
    owner reads ``.weight`` directly (BEiT's ``F.linear(x, qkv.weight)``),
    which only a forward can reveal."""
    called = set()
    handles = [module.register_forward_pre_hook(
        lambda *args, name=name: called.add(name))
        for name, module in quantized_layers(model).items()]
    # an owner reading a layer's quantized weight directly uses the layer
    used = {}
    for layer, owner in owner_weight_reads(model).items():
        used.setdefault(owner, set()).add(layer)
    for owner, layers in used.items():
        handles.append(model.get_submodule(owner).register_forward_pre_hook(
            lambda *args, layers=layers: called.update(layers)))
    try:
        yield called
    finally:
        for handle in handles:
            handle.remove()


def not_quantized_error(model: nn.Module) -> ValueError:
    """The one error for a model that has not been converted."""
    return ValueError(f'{type(model).__name__} has no mmdrq quantized '
                      'layers: call mmdrq.quantize_model(model, ...) first')


def quantized_layers(model: nn.Module, required: bool = False) -> dict:
    """``model``'s quantized layers by module name, in module order; with
    ``required``, a model without any is an error."""
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, QuantLayer)}
    if required and not layers:
        raise not_quantized_error(model)
    return layers


@MODELS.register_module()
class QConv2d(QuantLayer, nn.Conv2d):
    """nn.Conv2d whose input and weight are fake-quantized at ``self.bit``.

    Groups, dilation, padding modes and bias behave as in nn.Conv2d; the
    bias stays FP.
    """
    sums_integers = True

    @staticmethod
    def _empty_like(conv: nn.Conv2d) -> nn.Conv2d:
        new = nn.Conv2d.__new__(QConv2d)
        nn.Conv2d.__init__(
            new, conv.in_channels, conv.out_channels, conv.kernel_size,
            conv.stride, conv.padding, conv.dilation, conv.groups,
            conv.bias is not None, conv.padding_mode)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q, w_q = self.quantize_input(x), self.quantized_weight()
        with self.saved_as_recipes(x, x_q, w_q):
            return self._conv_forward(x_q, w_q, self.bias)


@MODELS.register_module()
class QLinear(QuantLayer, nn.Linear):
    """nn.Linear whose input and weight are fake-quantized at ``self.bit``."""
    sums_integers = True

    @staticmethod
    def _empty_like(linear: nn.Linear) -> nn.Linear:
        new = nn.Linear.__new__(QLinear)
        nn.Linear.__init__(new, linear.in_features, linear.out_features,
                           linear.bias is not None)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q, w_q = self.quantize_input(x), self.quantized_weight()
        with self.saved_as_recipes(x, x_q, w_q):
            return F.linear(x_q, w_q, self.bias)
