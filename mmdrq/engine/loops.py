"""Validation and test loops that evaluate every bit-width in one run.

Metrics come back keyed per setting (``accuracy/top1@w4a4``, a SubNet file's
``@<name>``), so ``CheckpointHook(save_best='accuracy/top1@w4a4')`` works,
and a table of all settings is logged at the end.
"""
import contextlib
import time
from typing import (Callable, ContextManager, List, Optional, Sequence,
                    Tuple, Union)

from mmengine.logging import print_log
from mmengine.runner import TestLoop, ValLoop
from mmengine.runner.loops import _parse_losses

import torch

from mmdrq.engine.bn_calibration import calibrated_bn, check_bn_calibration
from mmdrq.models import architecture_of
from mmdrq.quantization import model_bits, use_setting
from mmdrq.quantization.bitwidths import check_bit_selection
from mmdrq.quantization.bitwidths import bit_tag, split_tag, tag
from mmdrq.quantization.deploy_numerics import deploy_numerics
from mmdrq.search.subnet import load_subnet, subnet_name
from mmdrq.registry import LOOPS
from mmdrq.utils.checks import check_choice


# ``fake``: the fake-quantized forward of training; ``deploy``: the float
# operations of the exported graph (mmdrq.quantization.deploy_numerics)
NUMERICS = ('fake', 'deploy')


class _MultiBitMixin:
    """Both loops: which settings to run, and the run itself (MMEngine's
    hooks of ``phase``, 'val' or 'test', around all settings)."""
    phase: str

    def __init__(self, runner, dataloader, evaluator, fp16: bool = False,
                 bits: Union[str, int, Sequence[int]] = 'all',
                 subnets: Optional[Sequence[str]] = None,
                 measure_speed: bool = False, numerics: str = 'fake',
                 bn_calibration: Optional[dict] = None,
                 required_metric: Optional[str] = None):
        super().__init__(runner, dataloader, evaluator, fp16)
        key = f'{self.phase}_cfg'
        if required_metric is not None and (
                not isinstance(required_metric, str) or not required_metric):
            raise ValueError(f'{key}.required_metric must be a metric name '
                             f'such as accuracy/top1, got {required_metric!r}')
        self.required_metric = required_metric
        self.numerics = check_choice(f'{key}.numerics', numerics, NUMERICS)
        self.bn_batches = check_bn_calibration(bn_calibration,
                                               f'{key}.bn_calibration')
        if self.bn_batches and runner.cfg.get('train_dataloader') is None:
            raise ValueError(f'{key}.bn_calibration={bn_calibration} '
                             'needs the config\'s train_dataloader (its '
                             'batches re-estimate the BN statistics)')
        self._bn_loader = None
        self._init_settings(bits, subnets, key, measure_speed)

    def run(self) -> dict:
        phase = self.phase
        self.runner.call_hook(f'before_{phase}')
        self.runner.call_hook(f'before_{phase}_epoch')
        self.runner.model.eval()
        with self._numerics_context():
            metrics = self._run_settings(
                self.run_iter, getattr(self, f'{phase}_loss'), phase)
        self.runner.call_hook(f'after_{phase}_epoch', metrics=metrics)
        self.runner.call_hook(f'after_{phase}')
        return metrics

    def _numerics_context(self):
        """``deploy``: the model computes as ONNX Runtime's exact sessions
        (``deploy_numerics``; its conv -> BN pairs found on the first
        batch)."""
        if self.numerics == 'fake':
            return contextlib.nullcontext()
        model = self._quant_model
        batch = model.data_preprocessor(next(iter(self.dataloader)), False)
        inputs, samples = batch['inputs'][:1], batch['data_samples'][:1]
        # the data samples: a two-stage detector's RPN reads their sizes
        return deploy_numerics(
            model, lambda m: m(inputs, samples, mode='tensor'))

    def _init_settings(self, bits, subnets, key, measure_speed=False):
        self.measure_speed = measure_speed
        # SubNet files name layers of the converted model, not the wrapper
        model = architecture_of(self.runner.model)
        available = model_bits(model)
        if bits == 'all':
            bits = list(available)
        elif isinstance(bits, int):
            bits = [bits]
        bits = check_bit_selection(bits, available, f'{key}.bits')
        if not bits and not subnets:
            raise ValueError(f'{key}.bits=[] and no subnets: the loop would '
                             "evaluate nothing (bits='all' for every bit)")
        self.settings: List[Tuple[str, Union[int, dict]]] = [
            (bit_tag(b), b) for b in bits]
        # every SubNet checked here, before the first setting runs
        for path in subnets or []:
            self.settings.append((tag(subnet_name(path)),
                                  load_subnet(path, model)))
        self._quant_model = model

    def _run_settings(self, run_iter, losses, phase: str) -> dict:
        return run_settings(self, self._enter,
                            f'{phase} metrics per bit-width', losses, phase,
                            self.required_metric)

    @contextlib.contextmanager
    def _enter(self, setting):
        """The setting's bits, and with ``bn_calibration`` its own BN
        statistics from the first training batches."""
        model = self._quant_model
        with use_setting(model, setting):
            if not self.bn_batches:
                yield model
                return

            def forward(batch):
                data = model.data_preprocessor(batch, False)
                model(data['inputs'], data['data_samples'], mode='tensor')

            if self._bn_loader is None:  # the same batches for each setting
                self._bn_loader = self.runner.build_dataloader(
                    self.runner.cfg.train_dataloader, seed=self.runner.seed)
            with calibrated_bn(model, self._bn_loader, self.bn_batches,
                               forward, seed=self.runner.seed):
                yield model


class MissingMetricError(ValueError):
    """A required metric the evaluator does not give (``key``: the option
    that asked for it, so a tool can name its own)."""

    def __init__(self, key: str, name: str, available: list):
        super().__init__(f'{key}={name!r} is not a metric of this '
                         f'evaluation: {available}')
        self.name, self.available = name, available


def clock() -> float:
    """Seconds, after the GPU's queued work (the speed columns)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def run_settings(loop, enter: Callable[[object], ContextManager],
                 title: str, losses: Optional[dict] = None,
                 phase: str = 'test',
                 required_metric: Optional[str] = None) -> dict:
    """Every ``(tag, setting)`` of ``loop.settings``, inside
    ``enter(setting)``: ``loop.run_iter`` over its dataloader, then its
    evaluator (and the mean of the ``losses`` the iterations collected,
    ``images_per_s`` with ``loop.measure_speed``). Returns the metrics keyed
    ``<metric>@<tag>`` and logs them as one table under ``title``: the run
    of the PyTorch loops and of the ONNX Runtime loop alike. A
    ``required_metric`` the evaluator does not give is an error after the
    first setting, not after all of them."""
    all_metrics, rows = {}, []
    for suffix, setting in loop.settings:
        with enter(setting):
            if losses is not None:
                losses.clear()
            start = clock()
            for idx, data_batch in enumerate(loop.dataloader):
                loop.run_iter(idx, data_batch)
            seconds = clock() - start
            images = len(loop.dataloader.dataset)
            metrics = loop.evaluator.evaluate(images)
            if losses:
                metrics.update(_parse_losses(losses, phase))
            if loop.measure_speed:  # loading + model, not the metric
                metrics['images_per_s'] = images / max(seconds, 1e-9)
        if required_metric is not None and required_metric not in metrics:
            raise MissingMetricError(
                f'{phase}_cfg.required_metric', required_metric,
                sorted(metrics))
        rows.append((suffix, metrics))
        all_metrics.update({k + suffix: v for k, v in metrics.items()})
    print_log(f'{title}:\n' + metrics_table(rows), logger='current')
    return all_metrics


def metrics_table(rows) -> str:
    """Markdown table of ``(tag, metrics)`` rows, one per setting (bit or
    SubNet), as the multi-bit loops log it."""
    keys = []
    for _, metrics in rows:
        keys += [k for k in metrics if k not in keys]
    lines = ['| setting | ' + ' | '.join(keys) + ' |',
             '|---' * (len(keys) + 1) + '|']
    for suffix, metrics in rows:
        cells = [f'{metrics[k]:.4f}' if isinstance(metrics.get(k), float)
                 else str(metrics.get(k, '')) for k in keys]
        name = split_tag(suffix)[1]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


@LOOPS.register_module()
class MultiBitValLoop(_MultiBitMixin, ValLoop):
    """ValLoop over bit-widths and SubNets.

    Args:
        bits: ``'all'`` (default), one bit or a list of the model's bits.
        subnets: SubNet JSON files (per-layer bits) evaluated as well.
        measure_speed: add ``images_per_s`` (data loading and model, not
            the metric computation) to each setting's metrics.
        numerics: ``fake`` (the training forward) or ``deploy`` (what the
            ONNX export computes in ONNX Runtime's exact sessions, bit for
            bit in its quantized layers; see ``deploy_numerics``).
        bn_calibration: ``dict(batches=N)``: before each setting, every BN's
            statistics from N batches of the config's train_dataloader run
            at that setting, restored after (``bn_calibration.py``); None
            (default) evaluates the stored statistics.
        required_metric: a metric name (without the ``@`` tag) that the
            evaluator must give; checked after the first setting, so a
            misspelt name stops the run there (``search_subnet --metric``).
        Other args as in ``ValLoop``.
    """
    phase = 'val'


@LOOPS.register_module()
class MultiBitTestLoop(_MultiBitMixin, TestLoop):
    """TestLoop over bit-widths and SubNets (args as MultiBitValLoop)."""
    phase = 'test'
