"""SubNetFineTuneHook through MMEngine's real Runner: every training forward
runs the SubNet's bits, one step per iteration; wrong setups are refused
before the first step."""
import random

import pytest
import torch
from mmengine.hooks import Hook

from mmdrq.engine import HASBHook, SubNetFineTuneHook
from mmdrq.models import MultiPrecisionQAT
from mmdrq.quantization import get_bits
from mmdrq.quantization.layers import quantized_layers
from mmdrq.search.subnet import save_subnet

from conftest import build_iter_runner

BITS = (8, 6, 4, 2)
ONE_BIT = dict(kind='random', num_sampled=0)


class RecordForwardBits(Hook):
    """Each training iteration's per-layer bits, as every quantized layer's
    forward saw them."""

    def __init__(self):
        self.iterations, self.handles = [], []

    def before_train(self, runner):
        layers = quantized_layers(runner.model.architecture)
        for name, layer in layers.items():
            self.handles.append(layer.register_forward_pre_hook(
                lambda module, args, name=name:
                self.iterations[-1].append((name, module.bit))))

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.iterations.append([])

    def after_train(self, runner):
        for handle in self.handles:
            handle.remove()


def random_subnet(model, path, seed):
    draw = random.Random(seed)
    layer_bits = {name: draw.choice(BITS)
                  for name in get_bits(model.architecture)}
    save_subnet(str(path), layer_bits, model=model.architecture)
    return layer_bits


@pytest.mark.parametrize('seed', [0, 1])
def test_every_forward_runs_the_subnet(tmp_path, small_classifier, seed):
    torch.manual_seed(seed)
    model = MultiPrecisionQAT(small_classifier(), dict(bits=list(BITS)),
                              bit_schedule=ONE_BIT)
    layer_bits = random_subnet(model, tmp_path / 'subnet.json', seed)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = RecordForwardBits()
    build_iter_runner(tmp_path, model, [
        SubNetFineTuneHook(str(tmp_path / 'subnet.json')), record],
        max_iters=3, validate=False).train()
    # one forward per iteration, every layer at its SubNet bit
    assert len(record.iterations) == 3
    for seen in record.iterations:
        assert dict(seen) == layer_bits and len(seen) == len(layer_bits)
    assert model.bit_schedule.steps == {BITS[0]: 3}
    assert any(not torch.equal(p, before[n])
               for n, p in model.named_parameters())
    # the sampler is gone after training: eval runs uniform bits again
    assert model.bit_sampler is None


def test_wrong_setups_are_refused_before_training(tmp_path,
                                                  small_classifier):
    torch.manual_seed(0)
    every_bit = MultiPrecisionQAT(small_classifier(), dict(bits=list(BITS)))
    path = str(tmp_path / 'subnet.json')
    random_subnet(every_bit, path, 0)

    def train(model, hooks):
        build_iter_runner(tmp_path, model, hooks, max_iters=1,
                          validate=False).train()
    with pytest.raises(ValueError, match=r"set model.bit_schedule=dict\("
                       r"kind='random', num_sampled=0\), got kind='all'"):
        train(every_bit, [SubNetFineTuneHook(path)])
    one_bit = MultiPrecisionQAT(small_classifier(), dict(bits=list(BITS)),
                                bit_schedule=ONE_BIT)
    with pytest.raises(ValueError, match='SubNetFineTuneHook and HASBHook '
                       'both set the per-layer bits'):
        train(one_bit, [SubNetFineTuneHook(path), HASBHook(uniform=True)])
    name = next(iter(get_bits(one_bit.architecture)))
    save_subnet(str(tmp_path / 'part.json'), {name: 4},
                model=one_bit.architecture)
    with pytest.raises(ValueError, match=r"part.json' gives no bit for "
                       r'\d+ quantized layers'):
        train(one_bit, [SubNetFineTuneHook(str(tmp_path / 'part.json'))])
    with pytest.raises(ValueError, match='subnet must be a SubNet file '
                       'path, got 3'):
        SubNetFineTuneHook(3)
