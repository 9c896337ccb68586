"""Validation and test loops that evaluate every bit-width in one run.

Metrics come back keyed per setting (``accuracy/top1@w4a4``, a SubNet file's
``@<name>``), so ``CheckpointHook(save_best='accuracy/top1@w4a4')`` works,
and a table of all settings is logged at the end.
"""
import json
import os.path as osp
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

from mmengine.logging import print_log
from mmengine.runner import TestLoop, ValLoop
from mmengine.runner.loops import _parse_losses

import torch
from torch import nn

from mmdrq.models import architecture_of, bit_tag
from mmdrq.quantization import (check_bit, check_layer_bits, model_bits,
                                use_bits)
from mmdrq.registry import LOOPS


def load_subnet(path: str, model: Optional[nn.Module] = None
                ) -> Dict[str, int]:
    """Per-layer bits of a SubNet file: JSON with ``layer_bits``; with
    ``model``, checked against its quantized layers and bits."""
    with open(path) as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f'SubNet file {path!r} is not valid JSON: '
                             f'{e}') from None
    if not isinstance(content, dict) or \
            not isinstance(content.get('layer_bits'), dict):
        raise ValueError(f'SubNet file {path!r} has no "layer_bits" mapping')
    layer_bits = content['layer_bits']
    for name, bit in layer_bits.items():
        if isinstance(bit, bool) or not isinstance(bit, int):
            raise ValueError(f'SubNet file {path!r}: layer_bits[{name!r}] '
                             f'must be an integer bit, got {bit!r}')
    if model is not None:
        layer_bits = check_layer_bits(model, layer_bits,
                                      f'SubNet file {path!r}')
    return layer_bits


class _MultiBitMixin:
    """Shared by both loops: which settings to run, and the run itself."""

    def _init_settings(self, bits, subnets, key, measure_speed=False):
        self.measure_speed = measure_speed
        # SubNet files name layers of the converted model, not the wrapper
        model = architecture_of(self.runner.model)
        available = model_bits(model)
        if bits == 'all':
            bits = list(available)
        elif isinstance(bits, int):
            bits = [bits]
        bits = [check_bit(bit, available, f'{key}.bits') for bit in bits]
        self.settings: List[Tuple[str, Union[int, dict]]] = [
            (bit_tag(b), b) for b in bits]
        # every SubNet checked here, before the first setting runs
        for path in subnets or []:
            name = osp.splitext(osp.basename(path))[0]
            self.settings.append((f'@{name}', load_subnet(path, model)))
        self._quant_model = model

    def _run_settings(self, run_iter, losses, phase: str) -> dict:
        all_metrics, rows = {}, []
        for tag, setting in self.settings:
            with use_bits(self._quant_model, setting):
                losses.clear()
                start = self._clock()
                for idx, data_batch in enumerate(self.dataloader):
                    run_iter(idx, data_batch)
                seconds = self._clock() - start
                images = len(self.dataloader.dataset)
                metrics = self.evaluator.evaluate(images)
                if losses:
                    metrics.update(_parse_losses(losses, phase))
                if self.measure_speed:  # loading + model, not the metric
                    metrics['images_per_s'] = images / max(seconds, 1e-9)
            rows.append((tag, metrics))
            all_metrics.update({k + tag: v for k, v in metrics.items()})
        print_log(f'{phase} metrics per bit-width:\n' + _table(rows),
                  logger='current')
        return all_metrics


    @staticmethod
    def _clock() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()


def _table(rows) -> str:
    keys = []
    for _, metrics in rows:
        keys += [k for k in metrics if k not in keys]
    lines = ['| setting | ' + ' | '.join(keys) + ' |',
             '|---' * (len(keys) + 1) + '|']
    for tag, metrics in rows:
        cells = [f'{metrics[k]:.4f}' if isinstance(metrics.get(k), float)
                 else str(metrics.get(k, '')) for k in keys]
        lines.append(f'| {tag.lstrip("@")} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


@LOOPS.register_module()
class MultiBitValLoop(_MultiBitMixin, ValLoop):
    """ValLoop over bit-widths and SubNets.

    Args:
        bits: ``'all'`` (default), one bit or a list of the model's bits.
        subnets: SubNet JSON files (per-layer bits) evaluated as well.
        measure_speed: add ``images_per_s`` (data loading and model, not
            the metric computation) to each setting's metrics.
        Other args as in ``ValLoop``.
    """

    def __init__(self, runner, dataloader, evaluator, fp16: bool = False,
                 bits: Union[str, int, Sequence[int]] = 'all',
                 subnets: Optional[Sequence[str]] = None,
                 measure_speed: bool = False):
        super().__init__(runner, dataloader, evaluator, fp16)
        self._init_settings(bits, subnets, 'val_cfg', measure_speed)

    def run(self) -> dict:
        self.runner.call_hook('before_val')
        self.runner.call_hook('before_val_epoch')
        self.runner.model.eval()
        metrics = self._run_settings(self.run_iter, self.val_loss, 'val')
        self.runner.call_hook('after_val_epoch', metrics=metrics)
        self.runner.call_hook('after_val')
        return metrics


@LOOPS.register_module()
class MultiBitTestLoop(_MultiBitMixin, TestLoop):
    """TestLoop over bit-widths and SubNets (args as MultiBitValLoop)."""

    def __init__(self, runner, dataloader, evaluator, fp16: bool = False,
                 bits: Union[str, int, Sequence[int]] = 'all',
                 subnets: Optional[Sequence[str]] = None,
                 measure_speed: bool = False):
        super().__init__(runner, dataloader, evaluator, fp16)
        self._init_settings(bits, subnets, 'test_cfg', measure_speed)

    def run(self) -> dict:
        self.runner.call_hook('before_test')
        self.runner.call_hook('before_test_epoch')
        self.runner.model.eval()
        metrics = self._run_settings(self.run_iter, self.test_loss, 'test')
        self.runner.call_hook('after_test_epoch', metrics=metrics)
        self.runner.call_hook('after_test')
        return metrics
