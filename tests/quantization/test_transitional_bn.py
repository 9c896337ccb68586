"""Transitional BN: producers from the autograd graph, one BN per pair."""
import torch
from torch import nn

import mmdrq
from mmdrq.quantization import TransitionalBatchNorm, to_transitional
from mmdrq.quantization.graph import input_producers

BITS = [8, 4, 2]


class Residual(nn.Module):
    """conv_a -> bn_a -> relu -> conv_b, plus a skip from conv_a's branch,
    -> conv_c: conv_c's input is a sum of two quantized producers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv_a = nn.Conv2d(6, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(6)
        self.conv_b = nn.Conv2d(6, 6, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(6)
        self.conv_c = nn.Conv2d(6, 6, 1)
        self.bn_c = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.bn_a(self.conv_a(x)))
        y = self.bn_b(self.conv_b(y)) + y
        return self.head(torch.relu(self.bn_c(self.conv_c(torch.relu(y)))))


def run(shape):
    return lambda m: m(torch.randn(*shape))


def test_producers_of_a_chain(make_tiny_cnn):
    model = mmdrq.quantize_model(make_tiny_cnn(0), bits=BITS)
    producers = input_producers(model, run((2, 3, 8, 8)))
    assert producers == {'conv1': None, 'conv2': 'conv1', 'conv3': 'conv2',
                         'fc1': 'conv3'}


def test_residual_sum_has_no_unique_producer():
    model = mmdrq.quantize_model(Residual(), bits=BITS)
    producers = input_producers(model, run((2, 3, 8, 8)))
    assert producers['conv_b'] == 'conv_a'
    assert producers['conv_c'] is None  # conv_b + conv_a's branch
    rows = {r.layer: r.status
            for r in to_transitional(model, run((2, 3, 8, 8)))}
    assert rows['bn_b'] == '(conv_a, conv_b) pairs'
    assert 'unknown' in rows['bn_c'] and 'unknown' in rows['bn_a']
    assert set(model.bn_c.bns) == {'8', '4', '2'}


def test_pairs_follow_layer_bits_and_load_multi_precision_state(
        make_tiny_cnn):
    torch.manual_seed(0)
    multi = mmdrq.quantize_model(make_tiny_cnn(0), bits=BITS)
    multi.train()
    for bit in BITS:  # distinct running stats per bit
        with mmdrq.use_bits(multi, bit):
            multi(torch.randn(4, 3, 8, 8) * bit)
    state = multi.state_dict()
    model = mmdrq.quantize_model(make_tiny_cnn(0), bits=BITS)
    to_transitional(model, run((2, 3, 8, 8)))
    bn2 = model.bn2
    assert isinstance(bn2, TransitionalBatchNorm)
    assert (bn2.source, bn2.previous) == ('conv2', 'conv1')
    assert len(bn2.bns) == 9
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys
    for p in BITS:
        for c in BITS:
            torch.testing.assert_close(
                bn2.bns[f'{p}_{c}'].running_mean,
                state[f'bn2.bns.{c}.running_mean'])
    mmdrq.set_layer_bits(model, {'conv1': 4, 'conv2': 2})
    assert (bn2.prev_bit, bn2.bit) == (4, 2)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    seen = []
    handle = bn2.bns['4_2'].register_forward_hook(
        lambda *a: seen.append(True))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert seen == [True]
    with mmdrq.use_bits(model, 8):
        assert (bn2.prev_bit, bn2.bit) == (8, 8)
    assert (bn2.prev_bit, bn2.bit) == (4, 2)


def test_wrapper_option(small_classifier):
    from mmdrq.models import MultiPrecisionQAT
    model = MultiPrecisionQAT(small_classifier(), dict(bits=[4, 2]),
                              transitional_bn=dict(input_shape=(1, 3, 16, 16)))
    kinds = {type(m).__name__ for m in model.modules()}
    assert 'TransitionalBatchNorm' in kinds
    assert 'SwitchableBatchNorm' not in kinds
    pairs = [m for m in model.modules()
             if isinstance(m, TransitionalBatchNorm) and m.previous]
    assert pairs, 'a CIFAR ResNet has conv1 -> conv2 chains inside blocks'


def test_tracing_forward_leaves_no_state_behind(make_tiny_cnn):
    model = mmdrq.quantize_model(make_tiny_cnn(0), bits=BITS)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    to_transitional(model, lambda m: m(torch.zeros(2, 3, 8, 8)))
    assert model.training
    assert not model.conv2.act_quantizer.initialized.any()
    assert torch.equal(model.bn2.bns['8_8'].running_mean,
                       before['bn2.bns.8.running_mean'])
    model(torch.randn(4, 3, 8, 8))  # the first real batch initialises
    assert model.conv2.act_quantizer.scale[0] > 1e-6
