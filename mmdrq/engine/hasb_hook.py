"""HASB: Hessian-aware stochastic bit switching during SuperNet training."""
from typing import Optional

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.runner import IterBasedTrainLoop

from mmdrq.models import qat_model_of
from mmdrq.quantization import get_bits
from mmdrq.quantization.bit_sampler import BitSampler, hasb_probabilities
from mmdrq.registry import HOOKS
from mmdrq.utils.checks import check_flag, check_int, check_number


def sigma_schedule(epoch: int, max_epochs: int, sigma_max: float,
                   warmup_epochs: int) -> float:
    """sigma_t = 0 in the warm-up, then sigma_max * (epoch + 1) / E
    (docs/method.md, HASB), epochs counting from 0; iteration-based runs
    take it per iteration (t and E in iterations)."""
    if epoch < warmup_epochs:
        return 0.0
    return sigma_max * (epoch + 1) / max_epochs


@HOOKS.register_module()
class HASBHook(Hook):
    """Drives per-layer bit sampling of an mmdrq ``MultiPrecisionQAT`` model.

    Before training it reads per-layer Hessian traces (``traces``: a file of
    ``tools/hessian.py``; ``uniform=True`` skips them: every layer samples
    uniformly, the ablation), sets each layer's bit distribution and hands a
    seeded ``BitSampler`` to the model. Each epoch sets sigma_t (each
    iteration, in an iteration-based run: detection and segmentation
    schedules, where the whole run is one epoch); each iteration reseeds
    the sampler from (seed, iteration), so draws agree across DDP ranks and
    after resume.

    Args:
        traces: path of the traces JSON.
        sigma: sigma_max.
        warmup_epochs: epochs with sigma_t = 0 (epoch-based runs).
        warmup_iters: iterations with sigma_t = 0 (iteration-based runs).
        seed: base seed of the draws.
        uniform: sample every layer uniformly (no traces needed).
    """
    priority = 'NORMAL'

    def __init__(self, traces: Optional[str] = None, sigma: float = 0.5,
                 warmup_epochs: int = 0, warmup_iters: int = 0,
                 seed: int = 0, uniform: bool = False):
        self.uniform = check_flag('HASBHook uniform', uniform)
        if traces is None and not uniform:
            raise ValueError('HASBHook needs traces=<file from '
                             'tools/hessian.py> (or uniform=True)')
        if traces is not None and not isinstance(traces, str):
            raise ValueError(f'HASBHook traces must be a file path, got '
                             f'{traces!r}')
        self.traces = traces
        self.sigma = check_number('HASBHook sigma', sigma, 0.0, 1.0)
        self.warmup_epochs = check_int('HASBHook warmup_epochs',
                                       warmup_epochs)
        self.warmup_iters = check_int('HASBHook warmup_iters', warmup_iters)
        self.by_epoch = True  # set from the train loop in before_train
        self.seed = check_int('HASBHook seed', seed)

    @staticmethod
    def _qat_model(runner):
        return qat_model_of(runner.model, 'HASBHook')

    def before_train(self, runner):
        self.by_epoch = not isinstance(runner.train_loop, IterBasedTrainLoop)
        unit, warmup, other, wrong = \
            ('epochs', self.warmup_epochs, 'iters', self.warmup_iters) \
            if self.by_epoch else \
            ('iters', self.warmup_iters, 'epochs', self.warmup_epochs)
        if wrong:
            raise ValueError(
                f'HASBHook warmup_{other}={wrong} does not apply to '
                f'{type(runner.train_loop).__name__}: give warmup_{unit}')
        model = self._qat_model(runner)
        names = list(get_bits(model.architecture))
        if self.uniform:
            values = {name: 0.0 for name in names}
        else:
            from mmdrq.search.hessian import load_traces
            loaded = load_traces(self.traces, model)
            values = {n: loaded[n]['trace_per_param'] for n in names}
        probabilities = hasb_probabilities(values, model.bits)
        model.bit_sampler = BitSampler(probabilities, model.bits, self.seed)
        sensitive = sum(1 for v in values.values()
                        if v >= sum(values.values()) / len(values))
        print_log(f'HASB: {sensitive if not self.uniform else 0} of '
                  f'{len(names)} layers sensitive, sigma_max={self.sigma}, '
                  f'warm-up {warmup} {unit}', logger='current')

    def _set_sigma(self, runner, step, steps, warmup):
        sampler = self._qat_model(runner).bit_sampler
        sampler.sigma = sigma_schedule(step, steps, self.sigma, warmup)
        runner.message_hub.update_scalar('train/hasb_sigma', sampler.sigma)

    def before_train_epoch(self, runner):
        if self.by_epoch:
            self._set_sigma(runner, runner.epoch, runner.max_epochs,
                            self.warmup_epochs)

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if not self.by_epoch:
            self._set_sigma(runner, runner.iter, runner.max_iters,
                            self.warmup_iters)
        self._qat_model(runner).bit_sampler.reseed(runner.iter)

    def after_train(self, runner):
        self._qat_model(runner).bit_sampler = None
