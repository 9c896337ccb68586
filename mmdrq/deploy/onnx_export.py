"""A converted model at one bit (or a SubNet's bits) as an ONNX QDQ graph.

The float graph is exported once by torch's dynamo exporter from a copy of
the model whose quantized layers are plain layers; every bit then rewrites
that graph:

- each quantized conv/linear gets an int8 weight initializer holding the
  bit's integers (the stored INT-h integers after the second rounding)
  aligned to the container's top bits, ``q * 2**(8 - b)``, with
  per-output-channel scale ``s * 2**d * 2**-(8 - b)`` times the folded BN
  factor (the same weights exactly; ``q`` is the initializer ``>> (8 -
  b)``), zero point 0, into DequantizeLinear; the BN shift goes into the
  bias. The alignment matters to integer kernels: ONNX Runtime rounds a
  float bias to units of input scale times weight scale, which at 2 bits
  without it flipped many predictions;
- its input passes QuantizeLinear/DequantizeLinear at the layer's
  activation scale of that bit (uint8 for an unsigned quantizer, int8 for a
  signed one, zero point 0). Below 8 bits an integer Clip to the bit's
  range sits between the two: the integers are PyTorch's
  ``clamp(round(x / s), lo, hi)`` exactly (QuantizeLinear divides and
  rounds half to even as torch does), and the producer's QuantizeLinear
  stays next to it, so ONNX Runtime can still fuse the producer;
- layers kept FP stay FP; a BN that directly follows a conv (its only
  consumer) is folded into it, any other BN stays a BatchNormalization
  with the bit's statistics;
- the layers quantized in place (transposed, deformable and standardized
  convs, attention, ...) get the same form through a stand-in of theirs in
  the float graph (``layer_forms``).
"""
import copy
import re
from typing import Dict, Sequence, Union

import numpy as np
import onnx
import torch
from torch import nn

from mmdrq.models.tasks import unsupported_reason
from mmdrq.quantization import quantized_layers, use_setting
from mmdrq.models.tasks import two_stage
from mmdrq.quantization.forms import folds_bn
from mmdrq.quantization.bitwidths import check_bit
from mmdrq.quantization.integers import (check_container, is_signed,
                                         uninitialised_quantizers)
from mmdrq.quantization.layers import (BitSwitchable, QuantLayer,
                                       owner_weight_reads)
from mmdrq.utils.checks import check_choice
from mmdrq_runtime.generation import CACHE_INPUTS
from .detection_graph import (EXTRA_INPUTS, ONNX_FORMS, OUTPUTS,
                              SingleStageDetections, detection_refusal,
                              example_inputs)
from .float_graph import (float_skeleton, fold_bn_nodes, module_of,
                          strip_debug_info)
from .float_layers import check_fp_layers, quantize_float_layers
from .layer_forms import export_refusal, weight_parts
from .pipeline_graph import append_pipeline, pipeline_task
from .qdq_rewrite import QDQRewrite
from .residual import add_residual_qdq, check_residual_mode
from .two_stage_graph import TwoStageDetections

OPSET = 20
TARGETS = ('onnxruntime', 'tensorrt')


CACHED_OUTPUTS = ('logits', 'keys', 'values')


class _CachedStep(nn.Module):
    """A language model's ``cached_forward`` as one module for the
    exporter."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs, past_keys, past_values):
        return self.model.cached_forward(inputs, past_keys, past_values)


class TensorForward(nn.Module):
    """The model's tensor forward (after the data preprocessor) as one
    module for the exporter; ``forward`` picks what to call."""

    def __init__(self, model: nn.Module, forward=None):
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, inputs):
        if self._forward is not None:
            return self._forward(self.model, inputs)
        return self.model(inputs, mode='tensor')


def check_exportable(model: nn.Module):
    """Refuse, before any work, a model that is not converted, was never
    trained (no quantizer scale initialised), or whose task has no
    exported form (DETR-style, MaskFormer-style, two-stage detectors other
    than Faster / Mask R-CNN's)."""
    reason = unsupported_reason(model)
    if reason is None and two_stage(model):
        reason = detection_refusal(model)
    if reason is not None:
        raise ValueError(f'{type(model).__name__} cannot be exported to '
                         f'ONNX: {reason}; classifiers, single-stage '
                         'detectors, Faster / Mask R-CNN and mmseg per-pixel'
                         ' segmentors export')
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f'{type(model).__name__} has no mmdrq quantized '
                         'layers: export needs a converted model '
                         '(mmdrq.quantize_model or a MultiPrecisionQAT '
                         'config)')
    read_by = owner_weight_reads(model)
    for name, module in layers.items():
        reason = export_refusal(module)
        if name in read_by:
            reason = (f'its weight is read by the code of '
                      f'{read_by[name] or "(model)"!r}'
                      ', which PyTorch feeds an FP input (the export cannot '
                      'tell that read apart)')
        if reason is not None:
            raise ValueError(
                f'layer {name!r} ({type(module).__name__}) cannot be '
                f'exported to ONNX: {reason}; keep it FP with '
                f'quantizer.skip=[{re.escape(name)!r}] to export the model')
        if module.weight_quantizer.variant == 'unshared':
            raise ValueError(
                f'layer {name!r} uses variant=\'unshared\': its bits have no '
                'common integers; ONNX export needs double_rounding or floor')
    if not any(bool(m.weight_quantizer.initialized.any())
               for m in layers.values()):
        raise ValueError(f'{type(model).__name__} has no initialised '
                         'quantizer scales: the checkpoint is not a trained '
                         'mmdrq model')


def _check_layer_ready(name: str, module: QuantLayer):
    """A layer the graph uses needs its scales (a layer converted but never
    called may lack them, and is not in the graph)."""
    missing = uninitialised_quantizers(module)
    if missing:
        raise ValueError(
            f'layer {name!r} has uninitialised quantizer scales ({missing}):'
            ' the checkpoint is not a trained mmdrq model')
    act = module.act_quantizer
    if act is not None:
        try:
            is_signed(act)
        except ValueError as e:
            raise ValueError(f'layer {name!r}: {e}') from None


def check_bits_setting(model: nn.Module, bits: Union[int, Dict[str, int]]):
    """A bit the model has and ONNX's 8-bit containers hold, or a SubNet
    naming only the model's quantized layers."""
    layers = quantized_layers(model)
    model_bits = list(next(iter(layers.values())).bits)
    if isinstance(bits, dict):
        unknown = sorted(set(bits) - set(layers))
        if unknown:
            raise KeyError(f'SubNet names layers the model lacks: {unknown} '
                           f'(quantized layers: {list(layers)[:3]} ...)')
        values = set(bits.values())
    else:
        values = {bits}
    for bit in values:
        check_container(check_bit(bit, model_bits))


class OnnxExporter:
    """Exports ``model`` (a converted architecture in eval mode) per bit.

    Args:
        model: the converted model (the architecture, not the QAT wrapper).
        input_shape: (N, C, H, W) of the tensor after the data preprocessor;
            (N, T) token ids for a model whose ``export_inputs`` is
            ``'token_ids'``: a language model, exported as its decoder step
            on a key-value cache (``cached_forward``; inputs ``input``,
            ``past_keys``, ``past_values``, outputs ``logits``, ``keys``,
            ``values``; batch, length and past length dynamic).
        forward: ``forward(model, inputs)`` giving the tensors to export
            (default ``model(inputs, mode='tensor')``).
        target: ``onnxruntime`` (uint8 activations after ReLU, which its
            integer kernels need; the bit's range by an integer Clip
            between Q and DQ) or ``tensorrt`` (int8 only, Q right before
            DQ, the range by a float Clip before Q; unsigned 8-bit
            activations cannot be expressed).
        residual_qdq: ``none`` (the residual stream float, as PyTorch
            computes it: with ONNX Runtime's exact kernels the outputs
            equal PyTorch's) or ``calibrated`` (8-bit Q/DQ on residual
            adds, scales from ``calibration``, so every conv fuses into an
            integer kernel; not bit-equal, see ``mmdrq.deploy.residual``).
        calibration: input batches (after the data preprocessor) for
            ``calibrated``.
        graph: ``tensor`` (the model's ``mode='tensor'`` outputs),
            ``pipeline`` (the task's post-processing appended:
            ``mmdrq.deploy.pipeline_graph``) or ``auto`` (pipeline where
            the task has one).
        fp_layers: how the layers kept FP (stem, classifier) are exported:
            ``float32`` (as trained), ``float16`` weights (a Cast to
            float32 in the graph), ``int8_weights`` (post-training,
            symmetric per output channel ``max|w| / 127``, into
            DequantizeLinear; input and computation float) or ``int8``
            (those weights, and 8-bit inputs and conv outputs calibrated
            on ``calibration``: integer kernels, see
            ``mmdrq.deploy.float_layers``). Only ``float32`` is bit-equal.
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int],
                 forward=None, target: str = 'onnxruntime',
                 residual_qdq: str = 'none', calibration=None,
                 fp_layers: str = 'float32', graph: str = 'tensor'):
        check_exportable(model)
        self.task = pipeline_task(model, graph)
        self.pipeline = None
        check_choice('target', target, TARGETS)
        check_fp_layers(fp_layers, target, calibration)
        self.fp_layers = fp_layers
        check_residual_mode(residual_qdq, calibration)
        self.target, self.residual_qdq = target, residual_qdq
        self.calibration = [np.asarray(torch.as_tensor(b).float())
                            for b in calibration or ()]
        self.model = model.eval()
        self.tokens = getattr(model, 'export_inputs', None) == 'token_ids'
        self.input_shape = tuple(int(s) for s in input_shape)
        self.forward = forward
        self.layers = quantized_layers(model)
        self.parts = weight_parts(self.layers)
        self.switchable = {n: m for n, m in model.named_modules()
                           if isinstance(m, BitSwitchable)
                           and hasattr(m, 'bns')}
        self._skeleton = None

    def skeleton(self) -> onnx.ModelProto:
        """The float graph with BN folded where it can be (exported once)."""
        if self._skeleton is None:
            import onnxscript.optimizer
            proto = self._export_float(float_skeleton(self.model))
            self.folded = fold_bn_nodes(proto, {
                name for name, m in self.model.named_modules()
                if folds_bn(m)})
            proto = onnxscript.optimizer.optimize(proto)
            if self.tokens:  # the step's cache: inputs of every session
                self.pipeline = dict(
                    task='language_model', extra_inputs=list(CACHE_INPUTS),
                    cache_shape=list(self.model.cache_shape),
                    outputs=[o.name for o in proto.graph.output])
            elif self.task == 'detection':
                self.pipeline = dict(
                    task='detection', extra_inputs=list(EXTRA_INPUTS),
                    outputs=[o.name for o in proto.graph.output])
                if 'masks' in self.pipeline['outputs']:  # for the paste
                    self.pipeline['mask_threshold'] = float(
                        self.model.roi_head.test_cfg.mask_thr_binary)
            elif self.task is not None:
                self.pipeline = append_pipeline(proto, self.task, self.model)
            self._skeleton = strip_debug_info(proto)
        return self._skeleton

    def _export_float(self, skeleton: nn.Module) -> onnx.ModelProto:
        """The float graph, batch and spatial sizes dynamic where the model
        allows it. The example is a batch of 2 (a size of 1 would be fixed)
        at least 256 pixels on its short side, so that no feature map of
        an FPN (strides up to 128) is 1 wide, which would fix its size too;
        a model whose code fixes the sizes (or fails at that size: a
        flatten into a Linear) is exported again at the given input shape,
        which the graph then requires (``input_dims``)."""
        if self.tokens:  # batch and length dynamic from a 2 x 2+ example
            return self._trace(skeleton, (max(2, self.input_shape[0]),
                                          max(2, self.input_shape[1])))
        batch, spatial = max(2, self.input_shape[0]), self.input_shape[2:]
        grow = -(-256 // min(spatial)) if spatial else 1
        given = (batch, ) + tuple(self.input_shape[1:])
        if grow > 1:
            try:
                proto = self._trace(skeleton, (batch, self.input_shape[1]) +
                                    tuple(s * grow for s in spatial))
            except Exception:  # the model's code takes only given sizes
                return self._trace(skeleton, given)
            dims = proto.graph.input[0].type.tensor_type.shape.dim[2:]
            if not any(d.HasField('dim_value') for d in dims):
                return proto
        return self._trace(skeleton, given)

    def _trace(self, skeleton: nn.Module, shape) -> onnx.ModelProto:
        auto = torch.export.Dim.AUTO
        dynamic = {d: auto for d in ([0, 1] if self.tokens else
                                     [0] + list(range(2, len(shape))))}
        outputs, extra_dims = None, None  # extra inputs' dims: fixed
        if self.tokens:  # a decoder step on a key-value cache
            wrapper = _CachedStep(skeleton)
            layers, heads, size = self.model.cache_shape
            past = torch.zeros(layers, shape[0], heads, shape[1] + 1, size)
            example = (self.example(shape), past, past.clone())
            names, outputs = ['input', *CACHE_INPUTS], list(CACHED_OUTPUTS)
            extra_dims = ({1: auto, 3: auto}, ) * 2  # batch, past length
        elif self.task == 'detection':
            wrapper = self.detections(skeleton)
            example = example_inputs(shape)
            names = ['input', *EXTRA_INPUTS]
            outputs = list(OUTPUTS) + (['masks'] if two_stage(skeleton) and
                                       skeleton.roi_head.with_mask else [])
        else:
            wrapper = TensorForward(skeleton, self.forward)
            example, names = (self.example(shape), ), ['input']
        program = torch.onnx.export(
            wrapper.eval(), example, dynamo=True, optimize=False,
            opset_version=OPSET, input_names=names, output_names=outputs,
            verbose=False, custom_translation_table=ONNX_FORMS,
            dynamic_shapes=(dynamic, ) + (extra_dims or (None, ) *
                                          (len(example) - 1)))
        return program.model_proto

    def _active_bns(self, bits) -> Dict[str, nn.Module]:
        """Which BN copy each switchable BN runs at ``bits``: recorded from
        a forward, so the modules' own choice (switchable or transitional)
        decides."""
        hooks, active = [], {}
        for name, module in self.switchable.items():
            for child in module.bns.values():
                hooks.append(child.register_forward_hook(
                    lambda m, i, o, name=name: active.__setitem__(name, m)))
        try:
            with use_setting(self.model, bits), torch.no_grad():
                self.run_torch(self.example(self.input_shape))
        finally:
            for hook in hooks:
                hook.remove()
        return active

    def example(self, shape, generator=None) -> torch.Tensor:
        """An input of ``shape`` of the model's kind: zeros, or random
        with ``generator`` (images: normal; token ids: uniform over the
        vocabulary)."""
        if self.tokens:
            if generator is None:
                return torch.zeros(shape, dtype=torch.long)
            return torch.randint(0, self.model.vocab_size, shape,
                                 generator=generator)
        return torch.zeros(shape) if generator is None else \
            torch.randn(shape, generator=generator)

    def detections(self, model: nn.Module) -> nn.Module:
        """The module the exporter traces for a detector's pipeline."""
        kind = TwoStageDetections if two_stage(model) else \
            SingleStageDetections
        return kind(model, self.forward)

    def run_torch(self, inputs: torch.Tensor):
        """The PyTorch model's tensor outputs at its current bits (a
        two-stage detector's: its detections, having no others)."""
        with torch.no_grad():
            if two_stage(self.model):
                return self.detections(self.model)(
                    inputs, *example_inputs(inputs.shape)[1:])
            return TensorForward(self.model, self.forward)(inputs)

    def export(self, bits: Union[int, Dict[str, int]]) -> onnx.ModelProto:
        """The QDQ model of one bit, or of a SubNet (layer name -> bit;
        other layers keep the highest bit)."""
        return self.export_setting(bits)[0]

    def export_setting(self, bits: Union[int, Dict[str, int]]):
        """(``export(bits)``, weight integer initializer name -> dict of
        its ``bit``, ``stored_bit``, ``rounding`` and ``mode``: how its
        integers derive from the stored ones)."""
        check_bits_setting(self.model, bits)
        proto = copy.deepcopy(self.skeleton())
        # before any PyTorch forward: it would initialise missing scales
        used = {self.parts[i].layer if i in self.parts else
                module_of(i, '.weight')
                for n in proto.graph.node for i in n.input}
        for name, module in self.layers.items():
            if name in used:
                _check_layer_ready(name, module)
        active = self._active_bns(bits)
        with use_setting(self.model, bits), torch.no_grad():
            layer_bits = {n: m.bit for n, m in self.layers.items()}
            rewrite = QDQRewrite(self, proto, layer_bits, active)
            rewrite.run()
        if self.fp_layers == 'int8':  # first: its outputs end residuals
            quantize_float_layers(proto, self.calibration, self.target)
        if self.residual_qdq == 'calibrated':
            add_residual_qdq(proto, self.calibration, self.target)
        onnx.checker.check_model(proto, full_check=True)
        return proto, rewrite.integers
