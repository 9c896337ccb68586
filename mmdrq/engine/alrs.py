"""ALRS: per-bit learning rates for the quantization scales
(docs/method.md, ALRS).

Scale gradients grow as the bit-width drops (about 10x at 2 bits), so each
bit's optimizer step scales the lr of the ALRS parameter group by eta_b and
restores it afterwards; weights keep the scheduled lr, and param schedulers
never see the scaled value. The summed loss (one step for all bits) weighs
each bit's gradient of the group by eta_b instead (``update_summed_params``).
"""
import math
from typing import Dict, Optional, Sequence

import torch
from mmengine.logging import MessageHub, print_log
from mmengine.optim import AmpOptimWrapper, OptimWrapper

from mmdrq.models import PerBitOptimWrapper
from mmdrq.quantization import check_bit, check_bits
from mmdrq.quantization.bitwidths import bit_name
from mmdrq.registry import OPTIM_WRAPPERS
from mmdrq.utils.checks import check_choice

ALRS_MODES = ('fixed', 'adaptive', 'off')


def fixed_eta(bit: int, highest: int) -> float:
    """eta_b = 10^(-d/2) for even d, 5 * 10^(-(d+1)/2) for odd d (d = h - b):
    h=8 gives 8: 1, 6: 0.1, 4: 0.01, 2: 0.001."""
    d = highest - bit
    if d % 2 == 0:
        return 10.0**(-d / 2)
    return 5 * 10.0**(-(d + 1) / 2)


def _check_number(key: str, value, interval: str, inside) -> None:
    """A ValueError naming ``optim_wrapper.<key>`` unless ``value`` is a
    number (not a bool) that ``inside`` accepts."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not inside(value):
        raise ValueError(f'optim_wrapper.{key} must be a number in '
                         f'{interval}, got {value!r}')


class ALRSMixin(PerBitOptimWrapper):
    """Per-bit lr scaling of the param groups marked ``alrs=True``.

    Modes:
        ``fixed``: eta_b from ``fixed_eta``.
        ``adaptive``: eta_b = clip(n_h / n_b, min_eta, 1), where n_b is an
            exponential moving average (``momentum``) of the L2 norm of the
            ALRS group's gradient at bit b and h the highest bit: each bit's
            scale update is normalised to the highest bit's gradient size.
            The averages include the norms up to the previous iteration:
            each norm reaches the host asynchronously, so no step waits
            for the device (the fixed eta_b until every bit has one).
        ``off``: eta_b = 1 (the ablation).
    """

    def _init_alrs(self, bits: Sequence[int], mode: str, momentum: float,
                   min_eta: float):
        self.bits = check_bits(bits, key='optim_wrapper.bits')
        check_choice('optim_wrapper.mode', mode, ALRS_MODES)
        _check_number('momentum', momentum, '[0, 1)', lambda v: 0 <= v < 1)
        _check_number('min_eta', min_eta, '(0, 1]', lambda v: 0 < v <= 1)
        if not any(g.get('alrs') for g in self.optimizer.param_groups):
            raise ValueError(
                f'{type(self).__name__} found no quantizer parameters: no '
                "param group has alrs=True. Build it with constructor="
                "'mmdrq.ALRSOptimWrapperConstructor' on a converted model.")
        self.mode = mode
        self.momentum = momentum
        self.min_eta = min_eta
        self.bit = self.bits[0]
        self.grad_norms: Dict[int, float] = {}
        self._pending_norms: Dict[int, tuple] = {}  # bit: (norm, event)
        self._told_summed = False

    def set_bit(self, bit: int):
        self.bit = check_bit(bit, self.bits, 'optim_wrapper.bit')

    def eta(self, bit: Optional[int] = None) -> float:
        bit = self.bit if bit is None else bit
        if self.mode == 'off' or bit == self.bits[0]:
            return 1.0
        if self.mode == 'fixed':
            return fixed_eta(bit, self.bits[0])
        high, this = self.grad_norms.get(self.bits[0]), \
            self.grad_norms.get(bit)
        if not high or not this:
            return fixed_eta(bit, self.bits[0])
        return min(1.0, max(self.min_eta, high / this))

    def _queue_grad_norm(self, groups):
        """Start reading this bit's gradient norm: a device-side norm and,
        on CUDA, an asynchronous copy to pinned host memory. It is folded
        into the average at the same bit's next step, when the copy has
        long landed, so the step never waits for the device."""
        grads = [p.grad for g in groups for p in g['params']
                 if p.grad is not None]
        if not grads:
            return
        norm = self._unscaled(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        event = None
        if norm.is_cuda:
            host = torch.empty((), dtype=norm.dtype, pin_memory=True)
            host.copy_(norm, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(norm.device))
            norm = host
        self._pending_norms[self.bit] = (norm, event)

    def _unscaled(self, norm: torch.Tensor) -> torch.Tensor:
        """The norm of the true gradients (see the AMP variant)."""
        return norm

    def _pending_value(self, bit: int) -> Optional[float]:
        norm, event = self._pending_norms.pop(bit, (None, None))
        if event is not None and not event.query():
            event.synchronize()  # only if the device is a step behind
        return None if norm is None else float(norm)

    def _fold_grad_norm(self, bit: int):
        """Add the norm queued at ``bit``'s previous step to its moving
        average: eta_b at iteration t uses the norms up to t - 1, the same
        on every device."""
        norm = self._pending_value(bit)
        if norm is None or not math.isfinite(norm):
            return
        old = self.grad_norms.get(bit)
        self.grad_norms[bit] = norm if old is None else \
            self.momentum * old + (1 - self.momentum) * norm

    def _alrs_groups(self) -> list:
        return [g for g in self.optimizer.param_groups if g.get('alrs')]

    def _current_eta(self, groups) -> float:
        """eta of the current bit, whose gradient the ALRS params hold now
        (the adaptive mode takes its norm here)."""
        if self.mode == 'adaptive':
            self._fold_grad_norm(self.bit)
            self._queue_grad_norm(groups)
        return self.eta()

    def step(self, **kwargs):
        groups = self._alrs_groups()
        eta = self._current_eta(groups)
        saved = [g['lr'] for g in groups]
        for group in groups:
            group['lr'] = group['lr'] * eta
        try:
            super().step(**kwargs)
        finally:
            for group, lr in zip(groups, saved):
                group['lr'] = lr
        if groups:
            MessageHub.get_current_instance().update_scalar(
                f'train/{bit_name(self.bit)}_scale_lr', saved[0] * eta)

    def update_summed_params(self, losses: Dict[int, torch.Tensor]):
        """``update_params`` on the summed loss of ``loss_mode='sum'``
        (``{bit: loss}``), where bit b's gradient of the ALRS params enters
        the sum times eta_b: one backward per bit, one step.

        With SGD (momentum included; the ALRS group has no weight decay)
        that is the per-bit rate eta_b within the one step. Adam divides by
        the gradient's running RMS, so a factor shared by all bits cancels:
        there eta_b sets each bit's share of the scales' update direction
        (the 2-bit gradients, about 10x larger, no longer dominate it), and
        the step size stays the group's lr.
        """
        if self.mode == 'off':
            self.update_params(sum(losses.values()))
            return
        if not self._told_summed:
            self._told_summed = True
            print_log(
                f'ALRS with the summed loss: each bit\'s gradient of the '
                f'ALRS params is weighted by eta_b before the one '
                f'{type(self.optimizer).__name__} step' +
                ('' if isinstance(self.optimizer, torch.optim.SGD) else
                 ' (not SGD: the weights set the bits\' shares of the '
                 'update direction, the step size stays the lr)'),
                logger='current')
        groups = self._alrs_groups()
        params = [p for g in groups for p in g['params']]
        earlier = [p.grad for p in params]  # accumulated, not stepped yet
        weighted = [None] * len(params)
        # scaled before any backward: the factor reads the inner count
        scaled = [(bit, self.scale_loss(loss)) for bit, loss in
                  losses.items()]
        for i, (bit, loss) in enumerate(scaled):
            for p in params:
                p.grad = None
            last = i == len(scaled) - 1
            # the bits share shared_rounding's weight quantizer nodes
            self.backward(loss, retain_graph=not last)
            if not last:
                self._inner_count -= 1  # one backward per iteration counts
            self.set_bit(bit)
            eta = self._current_eta(groups)
            for j, p in enumerate(params):
                if p.grad is not None:
                    grad = p.grad.mul_(eta)
                    weighted[j] = grad if weighted[j] is None else \
                        weighted[j].add_(grad)
            MessageHub.get_current_instance().update_scalar(
                f'train/{bit_name(bit)}_alrs_eta', eta)
        for p, old, new in zip(params, earlier, weighted):
            p.grad = new if old is None else \
                (old if new is None else old.add_(new))
        self.set_bit(self.bits[0])
        if self.should_update():
            super().step()  # the plain step: the weights are in the grads
            self.zero_grad()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state['alrs_grad_norms'] = dict(self.grad_norms)
        # read, not folded: a resumed run folds them where this one would
        pending = {bit: self._pending_value(bit)
                   for bit in list(self._pending_norms)}
        self._pending_norms = {bit: (torch.tensor(norm), None)
                               for bit, norm in pending.items()}
        state['alrs_pending_norms'] = pending
        return state

    def load_state_dict(self, state_dict: dict):
        state_dict = dict(state_dict)
        self.grad_norms = {int(k): v for k, v in state_dict.pop(
            'alrs_grad_norms', {}).items()}
        self._pending_norms = {int(k): (torch.tensor(v), None) for k, v in
                               state_dict.pop('alrs_pending_norms',
                                              {}).items()}
        super().load_state_dict(state_dict)


@OPTIM_WRAPPERS.register_module()
class ALRSOptimWrapper(ALRSMixin, OptimWrapper):
    """OptimWrapper with ALRS (see ALRSMixin).

    Args:
        bits: the model's bit-widths (filled in by the constructor).
        mode: ``fixed`` (default), ``adaptive`` or ``off``.
        momentum: EMA momentum of the adaptive mode.
        min_eta: lower bound of the adaptive eta.
    """

    def __init__(self, optimizer, bits=(8, 6, 4, 2), mode='fixed',
                 momentum=0.9, min_eta=1e-4, **kwargs):
        super().__init__(optimizer, **kwargs)
        self._init_alrs(bits, mode, momentum, min_eta)


@OPTIM_WRAPPERS.register_module()
class ALRSAmpOptimWrapper(ALRSMixin, AmpOptimWrapper):
    """AmpOptimWrapper with ALRS (see ALRSOptimWrapper for the args)."""

    def __init__(self, optimizer, bits=(8, 6, 4, 2), mode='fixed',
                 momentum=0.9, min_eta=1e-4, **kwargs):
        super().__init__(optimizer=optimizer, **kwargs)
        self._init_alrs(bits, mode, momentum, min_eta)

    def _unscaled(self, norm: torch.Tensor) -> torch.Tensor:
        """Before the step the gradients still carry the loss scale, which
        changes on overflows and growth: divide it out, on the device."""
        if not self.loss_scaler.is_enabled():  # bf16 AMP: no loss scale
            return norm
        # GradScaler's tensor form of get_scale(), which would sync
        scale = self.loss_scaler._get_scale_async()
        return norm if scale is None else norm / scale.to(norm)
