"""Measured loss increases per layer and bit (the ``measured`` objective)."""
import pytest
import torch
import torch.nn.functional as F

import mmdrq
from mmdrq.quantization.bit_control import use_bits
from mmdrq.search.ilp import search_subnet
from mmdrq.search.sensitivity import loss_increases, monotone

from conftest import classifier_batch


@pytest.fixture
def qat_classifier(small_classifier):
    from mmdrq.models import MultiPrecisionQAT
    torch.manual_seed(0)
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[8, 4, 2]))
    batch = classifier_batch(count=6)
    with torch.no_grad():  # each bit's scales from the batch
        for bit in (8, 4, 2):
            mmdrq.set_bits(model.architecture, bit)
            model(**model.data_preprocessor(batch, False), mode='tensor')
    mmdrq.set_bits(model.architecture, 4)
    return model, batch


def test_each_layer_alone_at_each_bit_against_cross_entropy_by_hand(
        qat_classifier):
    model, batch = qat_classifier
    arch = model.architecture
    batches = [batch, classifier_batch(count=3)]
    measured = loss_increases(model, batches)
    # everything restored: mode and every layer's bit
    assert model.training and set(mmdrq.get_bits(arch).values()) == {4}

    model.eval()  # by hand: logits in float64, cross-entropy, eval BN

    def mean_loss(layer_bits):
        losses = []
        for b in batches:
            data = model.data_preprocessor(b, True)
            labels = torch.cat([s.gt_label for s in data['data_samples']])
            mmdrq.set_bits(arch, 8)
            with torch.no_grad(), use_bits(arch, layer_bits):
                logits = arch(data['inputs'], mode='tensor').double()
            losses.append(float(F.cross_entropy(logits, labels)))
        return sum(losses) / len(losses)

    base = mean_loss({})
    names = list(mmdrq.get_bits(arch))
    assert list(measured) == names
    for name in names[:3] + names[-2:]:
        assert measured[name][8] == 0.0
        for bit in (4, 2):
            assert measured[name][bit] == pytest.approx(
                mean_loss({name: bit}) - base, abs=1e-5), (name, bit)


def test_the_search_minimises_the_measured_sum(qat_classifier):
    """The ``measured`` objective is the perturbation objective with unit
    traces: where the budget does not bind (at most 8 bits on average),
    every layer takes its bit of least measured increase."""
    model, batch = qat_classifier
    measured = loss_increases(model, [batch])
    names = list(measured)
    costs = {n: dict(macs=1, params=1) for n in names}
    chosen = search_subnet(dict.fromkeys(names, 1.0), costs, [8, 4, 2],
                           'avg_bits', 8, perturbations=measured)
    for name, bit in chosen.items():
        assert measured[name][bit] <= min(measured[name].values()) + 1e-9
    assert set(chosen.values()) != {8}  # not the trivial answer


def test_empty_batches_and_a_ddp_wrapper_are_errors(qat_classifier):
    from mmengine.model import MMDistributedDataParallel
    with pytest.raises(ValueError, match='batches is empty'):
        loss_increases(qat_classifier[0], [])
    wrapper = MMDistributedDataParallel.__new__(MMDistributedDataParallel)
    with pytest.raises(TypeError, match='not a MMDistributedDataParallel'):
        loss_increases(wrapper, [qat_classifier[1]])


def test_monotone_makes_lower_bits_cost_at_least_higher_ones():
    raw = {'a': {8: 0.0, 6: -0.2, 4: 0.1, 2: 0.05},
           'b': {2: 3.0, 8: 0.0, 4: 1.0, 6: 2.0}}
    assert monotone(raw) == {'a': {8: 0.0, 6: 0.0, 4: 0.1, 2: 0.1},
                             'b': {8: 0.0, 6: 2.0, 4: 2.0, 2: 3.0}}


def test_batch_augments_are_off_while_measuring(qat_classifier):
    """Mixup would draw other mixes in each setting's pass: the increases
    with it configured equal those without, and it is back afterwards."""
    from mmpretrain.models.utils import RandomBatchAugment
    model, batch = qat_classifier
    plain = loss_increases(model, [batch])
    augments = RandomBatchAugment(augments=dict(type='Mixup', alpha=1.0))
    model.data_preprocessor.batch_augments = augments
    assert loss_increases(model, [batch]) == plain
    assert model.data_preprocessor.batch_augments is augments
