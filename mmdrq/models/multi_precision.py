"""One-shot multi-precision QAT around any OpenMMLab model."""
import logging
import weakref
from typing import Callable, Dict, Optional, Union

import torch
from mmengine.logging import print_log
from mmengine.model import (BaseModel, MMDistributedDataParallel,
                            is_model_wrapper)
from mmengine.optim import OptimWrapper
from torch import nn

from mmdrq.quantization import (model_bits, quantize_model,
                                quantized_layers, quantizers_ready)
from mmdrq.quantization.bitwidths import check_bit
from mmdrq.quantization.meta import (check_quantizer_meta, decode_meta,
                                     encode_meta, quantizer_meta)
from mmdrq.quantization.transitional_bn import to_transitional
from mmdrq.registry import MODEL_WRAPPERS, MODELS
from mmdrq.utils.checks import check_choice, check_flag
from .bit_schedule import build_bit_schedule
from .fp_distill import build_fp_distill
from .head_distill import build_head_distill
from .loading import accept_start_checkpoints
from .multi_level import to_level_act_scales, to_level_norms
from .pskd import PSKDTargets
from .step_plugins import (BitSamplingStep, CallRecordingStep,
                           HeadDistillStep, PSKDStep, SharedRoundingStep)
from .train_step import PerBitOptimWrapper, multi_bit_train_step

LOSS_MODES = ('per_bit', 'sum')
# Inductor's layout optimisation (channels-last convs) changed gradients of
# a small quantized CPU model by up to 6 % relative against eager and
# aot_eager (torch 2.14), with plain-op straight-through quantizers too;
# without it they agree to float noise. Unchecked on CUDA, so CPU only.
CPU_COMPILE_OPTIONS = {'layout_optimization': False}
# compiled architectures, kept off the module tree so that state dicts,
# deepcopy (EMA) and pickling never see them
_COMPILED = weakref.WeakKeyDictionary()


@MODELS.register_module()
class MultiPrecisionQAT(BaseModel):
    """Trains one model at every bit-width of ``quantizer.bits`` at once.

    The wrapped model (any mmpretrain, mmdet or mmseg model) is converted by
    ``mmdrq.quantize_model``; its data preprocessor is reused. Each training
    iteration walks the bits from highest to lowest: forward, backward,
    optimizer step (docs/method.md, Multi-precision training), or, with
    ``loss_mode='sum'``, one step on the summed losses. Prediction and
    validation run at the current bit (the per-bit loops switch it).

    FP32 weights load through the usual ``load_from`` / ``init_cfg``: a
    checkpoint of the bare model (keys without ``architecture.``, one BN per
    layer) is mapped onto the converted one. The wrapper's own state dicts
    carry the bit list and quantizer options (``_extra_state``); loading one
    into a model with others is an error.

    Args:
        architecture: config of the model to quantize, or the model.
        quantizer: ``quantize_model`` options (``bits``, ``skip``, ...).
        loss_mode: ``per_bit`` (a step per bit) or ``sum``.
        distill: ``dict(alpha=0.7)`` turns on PS-KD self-distillation
            (classification only): every bit learns from soft targets built
            with the highest bit's predictions of the previous epoch,
            instead of the head's own loss.
        transitional_bn: ``dict(input_shape=(1, 3, H, W))`` replaces the
            switchable BNs by transitional ones (one BN per pair of input
            and own bit, mixed precision); the shape feeds one forward that
            finds which layer feeds which.
        head_distill: ``dict(target='logits', weight=1.0, temperature=1.0,
            box_weight=0.0)`` turns on distillation from the highest bit for
            detection and segmentation: the lower bits also learn the
            highest bit's head logits (or ``target='features'``: FPN
            outputs) of the same iteration (``loss_distill``; see
            ``HeadDistill``).
        bit_loss_weights: ``{bit: factor}`` multiplies each listed bit's
            loss (e.g. ``{2: 2.0}``); other bits keep 1.
        bit_schedule: which bits train in an iteration: None (every bit,
            the paper's) or ``dict(kind='sandwich' | 'random' |
            'progressive', ...)`` (see ``BitSchedule``).
        fp_distill: ``dict(checkpoint='fp32.pth', weight=1.0,
            temperature=1.0)``: every bit also learns the head logits of
            a frozen copy of the float model loaded from ``checkpoint``
            (``loss_fp_distill``; see ``FPDistillStep``).
        multi_level_norm: give every norm of a single-stage detector's shared
            head one copy per FPN level (AQD's multi-level BN; see
            ``to_level_norms``).
        multi_level_act_scales: give the input quantizer of every quantized
            layer of that head one copy per FPN level (each bit's scale
            per level; see ``to_level_act_scales``). ONNX export refuses
            such a model.
        data_preprocessor: given to the architecture when its config has
            none (the Runner passes a config's top-level one here).
        compile: True or ``torch.compile`` options to compile the
            architecture for training. Iterations run eagerly until every
            quantizer scale is initialised (the first iteration, normally),
            then each bit gets its own graph, in which Inductor fuses the
            fake quantization with the neighbouring ops. Costs compile time
            at the first iterations of each bit; evaluation stays eager (it
            uses cached integer weights); with a HASB bit sampler (a bit per
            layer) it stays eager too, since every combination of bits would
            need its own graph. Use this rather than the Runner's
            ``compile``, which would compile the whole per-bit loop.
        init_cfg: MMEngine init config of the wrapper.
    """

    def __init__(self,
                 architecture: Union[dict, nn.Module],
                 quantizer: Optional[dict] = None,
                 loss_mode: str = 'per_bit',
                 distill: Optional[dict] = None,
                 transitional_bn: Optional[dict] = None,
                 head_distill: Optional[dict] = None,
                 bit_loss_weights: Optional[dict] = None,
                 bit_schedule: Optional[dict] = None,
                 fp_distill: Optional[dict] = None,
                 multi_level_norm: bool = False,
                 multi_level_act_scales: bool = False,
                 data_preprocessor: Optional[dict] = None,
                 compile: Union[bool, dict] = False,
                 init_cfg: Optional[dict] = None):
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f'compile must be a bool or a dict of '
                            f'torch.compile options, got {compile!r}')
        check_choice('loss_mode', loss_mode, LOSS_MODES)
        if isinstance(architecture, dict):
            architecture = dict(architecture)
            if data_preprocessor is not None:
                architecture.setdefault('data_preprocessor', data_preprocessor)
            architecture = MODELS.build(architecture)
        super().__init__(
            data_preprocessor=getattr(architecture, 'data_preprocessor', None),
            init_cfg=init_cfg)
        checkpointed = [name or type(architecture).__name__
                        for name, m in architecture.named_modules()
                        if getattr(m, 'with_cp', False)]
        if loss_mode == 'sum' and checkpointed:
            raise ValueError(
                f"loss_mode='sum' runs every bit's forward before one "
                f"backward, and activation checkpointing (with_cp=True in "
                f"{checkpointed[0]}) would recompute them all at the highest "
                f"bit: set with_cp=False or loss_mode='per_bit'")
        fp_step = build_fp_distill(architecture, fp_distill)
        architecture = quantize_model(
            architecture, dict(quantizer or {}), passes=_structural_passes(
                multi_level_norm, multi_level_act_scales, transitional_bn))
        self.architecture = architecture
        self.loss_mode = loss_mode
        self.bits = model_bits(architecture)
        self.bit_loss_weights = _check_bit_loss_weights(bit_loss_weights,
                                                        self.bits)
        self.bit_schedule = build_bit_schedule(self.bits, bit_schedule)
        self.head_distill = build_head_distill(architecture, head_distill)
        self.pskd = None
        self.bit_sampler = None  # set by HASBHook for mixed precision
        if distill is not None:
            num_classes = getattr(getattr(architecture, 'head', None),
                                  'num_classes', None)
            if num_classes is None:
                raise ValueError(
                    f'distill={dict(distill)} needs a classifier with '
                    f'head.num_classes; {type(architecture).__name__} '
                    'has none')
            self.pskd = PSKDTargets(num_classes, **distill)
            # the tables grow per rank and are kept alike by all_gather:
            # DDP must not broadcast them from rank 0 at every forward
            # (sizes can differ, and ImageNet's take gigabytes)
            MMDistributedDataParallel \
                ._set_params_and_buffers_to_ignore_for_model(
                    self, [f'pskd.{name}' for name, _ in
                           self.pskd.named_buffers()])
        self._plugins = [SharedRoundingStep()] if loss_mode == 'sum' else []
        self._plugins.append(CallRecordingStep())
        if self.head_distill is not None:
            self._plugins.append(HeadDistillStep(self.head_distill))
        if self.pskd is not None:
            self._plugins.append(PSKDStep(self.pskd))
        if fp_step is not None:
            fp_step.attach(architecture)
            self._plugins.append(fp_step)
        self.compile_options = ({} if compile is True else dict(compile)) \
            if compile else None
        if compile and any(getattr(m, 'step_shift', 'off') != 'off'
                           for m in architecture.modules()):
            raise ValueError(
                "compile=True with quantizer.weight_quantizer.step_shift="
                "'mse': each change of a bit's step shift would recompile; "
                'train eagerly (compile=False)')
        self._warned_sampler = False
        self.uncalled_layers = None  # known after the first training step
        accept_start_checkpoints(self)

    def get_extra_state(self) -> torch.Tensor:
        """Saved with the weights: the ``quantizer_meta`` they were trained
        with."""
        return encode_meta(quantizer_meta(self.architecture))

    def set_extra_state(self, state: torch.Tensor):
        """Weights of another bit list or quantizer options are refused:
        their scales would silently serve other bits."""
        check_quantizer_meta(decode_meta(state), self.architecture,
                             'the checkpoint')

    def _runner(self) -> Callable:
        """The architecture, or its compiled form when compiling applies:
        training, uniform bits, and no lazy scale initialisation left
        (checked only until the architecture is compiled)."""
        if self.compile_options is None or not self.training:
            return self.architecture
        if self.bit_sampler is not None:
            if not self._warned_sampler:
                print_log('mmdrq: compile is off under a per-layer bit '
                          'sampler (HASB): each combination of bits would '
                          'recompile', logger='current',
                          level=logging.WARNING)
                self._warned_sampler = True
            return self.architecture
        compiled = _COMPILED.get(self)
        if compiled is None:
            if self.uncalled_layers is None or not quantizers_ready(
                    self.architecture, ignore=self.uncalled_layers):
                return self.architecture
            options = dict(self.compile_options)
            if next(self.parameters()).device.type == 'cpu':
                options['options'] = {**CPU_COMPILE_OPTIONS,
                                      **options.get('options', {})}
            compiled = _COMPILED[self] = torch.compile(self.architecture,
                                                       **options)
            print_log(f'mmdrq: scales initialised, training runs the '
                      f'compiled architecture from now on ({options})',
                      logger='current')
        return compiled

    def note_called_layers(self, called: set):
        """After the first training step: warn about quantized layers whose
        forward never ran (they train and run in full precision)."""
        self.uncalled_layers = [name for name in quantized_layers(
            self.architecture) if name not in called]
        if self.uncalled_layers:
            print_log(
                f'mmdrq: quantized layers whose forward did not run in the '
                f'first training step: {", ".join(self.uncalled_layers)}. '
                f'If their owners read the weight directly (e.g. '
                f'F.linear(x, self.qkv.weight)), they train and run in full '
                f'precision: add them to quantizer.skip to keep them out of '
                f'the conversion.', logger='current',
                level=logging.WARNING)

    def step_plugins(self) -> list:
        """The parts of this iteration's train step beyond forward,
        backward and step (step_plugins.py); HASB's sampler joins once
        ``HASBHook`` sets ``bit_sampler``."""
        sampling = [BitSamplingStep()] if self.bit_sampler is not None \
            else []
        return self._plugins + sampling

    def forward(self, inputs, data_samples=None, mode: str = 'tensor'):
        return self._runner()(inputs, data_samples, mode=mode)

    def train_step(self, data, optim_wrapper: OptimWrapper) -> Dict:
        return multi_bit_train_step(self, self._run_forward, data,
                                    optim_wrapper)


def _structural_passes(multi_level_norm, multi_level_act_scales,
                       transitional_bn) -> list:
    """The conversion passes the wrapper's keys ask for, checked before the
    conversion starts."""
    passes = []
    for key, value, convert in (
            ('multi_level_norm', multi_level_norm, to_level_norms),
            ('multi_level_act_scales', multi_level_act_scales,
             to_level_act_scales)):
        if check_flag(key, value):
            passes.append((key, convert))
    if transitional_bn is None:
        return passes
    if not isinstance(transitional_bn, dict) or \
            set(transitional_bn) != {'input_shape'}:
        raise ValueError('transitional_bn must be dict(input_shape=(1, 3, H, '
                         f'W)), got {transitional_bn!r}')
    shape = tuple(transitional_bn['input_shape'])

    def transitional(architecture):
        try:
            return to_transitional(architecture, lambda m: m(
                torch.zeros(shape), mode='tensor'))
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(
                f'transitional_bn.input_shape={shape}: the forward that '
                f'finds which layer feeds which failed on it ({e}); '
                'give the shape of one input, (1, C, H, W)') from e
    return passes + [('transitional_bn', transitional)]


def _check_bit_loss_weights(weights, bits) -> Dict[int, float]:
    """``{bit: factor}`` with every bit one of ``bits`` (digit strings, as
    ``--cfg-options`` gives them, count) and every factor positive."""
    if weights is None:
        return {}
    if not isinstance(weights, dict):
        raise ValueError(f'bit_loss_weights must be a dict {{bit: factor}}, '
                         f'got {weights!r}')
    checked = {}
    for bit, factor in weights.items():
        if isinstance(bit, str) and bit.isdigit():
            bit = int(bit)
        bit = check_bit(bit, bits, 'bit_loss_weights key')
        if isinstance(factor, bool) or not isinstance(
                factor, (int, float)) or not 0 < factor < float('inf'):
            raise ValueError(f'bit_loss_weights[{bit}] must be a positive '
                             f'number, got {factor!r}')
        checked[bit] = float(factor)
    return checked


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside an MMEngine model wrapper (DDP, FSDP), else itself."""
    return model.module if is_model_wrapper(model) else model


def qat_model_of(model: nn.Module, user: str) -> 'MultiPrecisionQAT':
    """The ``MultiPrecisionQAT`` in ``model`` (or inside its wrapper);
    anything else is an error naming ``user``, the part that needs it."""
    model = unwrap_model(model)
    if not isinstance(model, MultiPrecisionQAT):
        raise TypeError(f'{user} needs mmdrq.MultiPrecisionQAT, got '
                        f'{type(model).__name__}')
    return model


def architecture_of(model: nn.Module) -> nn.Module:
    """The converted model that layer names and SubNets refer to: inside a
    model wrapper and a ``MultiPrecisionQAT``; any other model is its own."""
    model = unwrap_model(model)
    return model.architecture if isinstance(model, MultiPrecisionQAT) \
        else model


@MODEL_WRAPPERS.register_module()
class MultiPrecisionQATDDP(MMDistributedDataParallel):
    """DDP for ``MultiPrecisionQAT``: MMEngine's DDP runs one forward per
    step; this runs the per-bit loop, every forward through DDP so gradients
    are reduced per bit. Per-bit BN copies are unused at other bits, hence
    ``find_unused_parameters=True`` by default."""

    def __init__(self, module, find_unused_parameters: bool = True, **kwargs):
        super().__init__(module=module,
                         find_unused_parameters=find_unused_parameters,
                         **kwargs)

    def train_step(self, data, optim_wrapper: OptimWrapper) -> Dict:
        alrs_mode = getattr(optim_wrapper, 'mode', 'off')
        if self.module.loss_mode == 'sum' and alrs_mode != 'off' and \
                isinstance(optim_wrapper, PerBitOptimWrapper):
            raise ValueError(
                f"loss_mode='sum' with ALRS (optim_wrapper.mode="
                f"{alrs_mode!r}) runs a backward per bit after all the "
                f"bits' forwards, and DDP reduces gradients once per "
                f"forward and backward: use loss_mode='per_bit', or "
                f"optim_wrapper.mode='off'")
        return multi_bit_train_step(self.module, self._run_forward, data,
                                    optim_wrapper)
