"""set_bits / get_bits / set_layer_bits / use_bits on converted models."""
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from conftest import RESNET18_CFG, TINY_QUANT_LAYERS, build_openmmlab_model
from mmdrq import (QConv2d, QLinear, SwitchableBatchNorm, get_bits,
                   quantize_model, set_bits, set_layer_bits, use_bits)
from mmdrq.quantization import model_bits, use_setting

BITS = (8, 6, 4, 2)


@pytest.fixture
def model(make_tiny_cnn):
    return quantize_model(make_tiny_cnn())


def _all_bits(model):
    """Bit of every quantized layer and switchable BN, by name."""
    return {n: m.bit for n, m in model.named_modules()
            if isinstance(m, (QConv2d, QLinear, SwitchableBatchNorm))}


def _train_all_bits(model, x):
    model.train()
    for bit in model_bits(model):
        set_bits(model, bit)
        model(x).sum().backward()
    model.zero_grad(set_to_none=True)


def test_initial_bit_is_highest(model):
    assert set(_all_bits(model).values()) == {8}
    assert model_bits(model) == BITS


@pytest.mark.parametrize('bit', [8.0, True, '8', 5])
def test_set_bits_takes_only_a_bit_of_the_model(model, bit):
    """8.0 == 8, but would select no per-bit BN (bns['8.0'])."""
    with pytest.raises(ValueError, match=r'bit.*\[8, 6, 4, 2\]') as info:
        set_bits(model, bit)
    assert repr(bit) in str(info.value)
    with pytest.raises(ValueError, match=repr(bit)):
        model.conv1.set_bit(bit)
    with pytest.raises(ValueError, match=rf"layer_bits\['conv1'\]"):
        set_layer_bits(model, {'conv1': bit})
    assert set(_all_bits(model).values()) == {8}


def test_set_layer_bits_needs_a_mapping(model):
    with pytest.raises(TypeError, match='layer_bits must map quantized '
                       'layer names to bits, got 4'):
        set_layer_bits(model, 4)


def test_set_and_get_bits(model):
    for bit in (4, 2, 6, 8):
        assert set_bits(model, bit) is model
        assert set(_all_bits(model).values()) == {bit}
        assert get_bits(model) == {name: bit for name in TINY_QUANT_LAYERS}


def test_get_bits_lists_quantized_layers_only(model):
    assert list(get_bits(model)) == list(TINY_QUANT_LAYERS)


@pytest.mark.parametrize('bad', [3, 1, 16, 0, 'eight'])
def test_set_bits_unknown_bit(model, bad):
    set_bits(model, 4)
    with pytest.raises(ValueError) as info:
        set_bits(model, bad)
    assert repr(bad) in str(info.value)
    assert '[8, 6, 4, 2]' in str(info.value)
    assert set(_all_bits(model).values()) == {4}


def test_set_layer_bits(model):
    set_bits(model, 6)
    assert set_layer_bits(model, {'conv1': 2, 'fc1': 4}) is model
    bits = get_bits(model)
    assert bits == {'conv1': 2, 'conv2': 6, 'conv3': 6, 'fc1': 4}
    # BN follows its producing layer; the others keep their bit
    assert model.bn1.source == 'conv1' and model.bn1.bit == 2
    assert model.bn2.bit == 6 and model.bn3.bit == 6
    assert model.bn0.source is None and model.bn0.bit == 6
    # mixed bits change the output w.r.t. both uniform settings
    x = torch.randn(2, 3, 6, 6)
    _train_all_bits(model, x)
    model.eval()
    with torch.no_grad():
        set_layer_bits(model, {'conv1': 2, 'conv2': 8, 'conv3': 8, 'fc1': 8})
        mixed = model(x)
        set_bits(model, 8)
        high = model(x)
        set_bits(model, 2)
        low = model(x)
        set_layer_bits(model, {'conv1': 2, 'conv2': 8, 'conv3': 8, 'fc1': 8})
        assert torch.equal(model(x), mixed)
    assert not torch.allclose(mixed, high)
    assert not torch.allclose(mixed, low)


def test_set_layer_bits_unknown_layer(model):
    set_bits(model, 6)
    for name in ('conv9', 'stem', 'bn1', 'conv1.weight'):
        with pytest.raises(KeyError) as info:
            set_layer_bits(model, {'conv1': 2, name: 4})
        assert repr(name) in info.value.args[0]
        # validated before anything is applied
        assert set(_all_bits(model).values()) == {6}


def test_set_layer_bits_bad_bit(model):
    with pytest.raises(ValueError) as info:
        set_layer_bits(model, {'conv2': 2, 'conv1': 5})
    assert '5' in str(info.value) and "'conv1'" in str(info.value)
    assert set(_all_bits(model).values()) == {8}


def test_resnet18_bn_follows_source_layer():
    model = quantize_model(build_openmmlab_model('mmpretrain', RESNET18_CFG))
    set_layer_bits(model, {'backbone.layer2.0.conv1': 2,
                           'backbone.layer2.0.downsample.0': 4})
    block = model.backbone.layer2[0]
    assert block.bn1.source == 'backbone.layer2.0.conv1'
    assert block.bn1.bit == 2
    assert block.downsample[1].source == 'backbone.layer2.0.downsample.0'
    assert block.downsample[1].bit == 4
    assert block.bn2.bit == 8 and block.conv2.bit == 8
    bns = {n: m.bit for n, m in model.named_modules()
           if isinstance(m, SwitchableBatchNorm)}
    changed = {n for n, b in bns.items() if b != 8}
    assert changed == {'backbone.layer2.0.bn1',
                       'backbone.layer2.0.downsample.1'}


def test_bn_after_fp_layer_does_not_follow_an_earlier_layer():
    """A BN fed by a layer kept FP must not take the bit of some earlier
    quantized layer that merely has the same channel count."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),   # 3 quantized
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),   # 6 skipped
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),   # 9 quantized
        nn.Flatten(), nn.Linear(4, 2))
    quantize_model(model, skip=['6'])
    assert isinstance(model[3], QConv2d) and type(model[6]) is nn.Conv2d
    assert model[4].source == '3'
    assert model[10].source == '9'
    assert model[7].source != '3'
    set_layer_bits(model, {'3': 2})
    assert model[4].bit == 2
    assert model[7].bit == 8


def test_use_bits_restores(model):
    set_layer_bits(model, {'conv1': 2, 'fc1': 4})
    before = _all_bits(model)
    with use_bits(model, 6) as same:
        assert same is model
        assert set(_all_bits(model).values()) == {6}
    assert _all_bits(model) == before
    with use_bits(model, {'conv2': 2}):
        assert model.conv2.bit == 2 and model.bn2.bit == 2
        assert model.conv1.bit == 2 and model.fc1.bit == 4
    assert _all_bits(model) == before


def test_use_setting_puts_a_subnets_unnamed_layers_at_the_highest_bit(
        model):
    """What the per-setting loops and the export run: unlike use_bits, a
    SubNet's unnamed layers do not keep the bit the model was at."""
    set_bits(model, 2)
    before = _all_bits(model)
    with use_setting(model, {'conv2': 4}):
        bits = _all_bits(model)
        assert bits.pop('conv2') == 4 and bits.pop('bn2') == 4
        assert set(bits.values()) == {8}
    assert _all_bits(model) == before
    with use_setting(model, 6):
        assert set(_all_bits(model).values()) == {6}
    assert _all_bits(model) == before


def test_use_bits_nested(model):
    with use_bits(model, 4):
        with use_bits(model, 2):
            assert set(_all_bits(model).values()) == {2}
        assert set(_all_bits(model).values()) == {4}
    assert set(_all_bits(model).values()) == {8}


def test_use_bits_restores_on_exception(model):
    set_layer_bits(model, {'conv3': 4})
    before = _all_bits(model)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with use_bits(model, 2):
            assert set(_all_bits(model).values()) == {2}
            raise Boom()
    assert _all_bits(model) == before
    with pytest.raises(Boom):
        with use_bits(model, {'conv1': 6}):
            raise Boom()
    assert _all_bits(model) == before


def test_use_bits_bad_bit_changes_nothing(model):
    set_layer_bits(model, {'conv3': 4})
    before = _all_bits(model)
    with pytest.raises(ValueError, match=r'\b3\b'):
        with use_bits(model, 3):
            pytest.fail('body must not run')
    assert _all_bits(model) == before
    with pytest.raises(KeyError, match='nope'):
        with use_bits(model, {'nope': 2}):
            pytest.fail('body must not run')
    assert _all_bits(model) == before


@pytest.mark.parametrize('call', [
    lambda m: set_bits(m, 8),
    lambda m: get_bits(m),
    lambda m: set_layer_bits(m, {'0': 8}),
    lambda m: model_bits(m),
    lambda m: use_bits(m, 8).__enter__(),
])
def test_model_without_quantized_layers(call):
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match='no mmdrq quantized layers') as info:
        call(plain)
    assert 'quantize_model' in str(info.value)


class _CountTorchCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, '__name__', repr(func)))
        return func(*args, **(kwargs or {}))


def test_switching_is_attribute_only(model):
    """No pass over weights: switching neither writes nor reads a tensor."""
    x = torch.randn(2, 3, 6, 6)
    _train_all_bits(model, x)
    model.eval()
    with torch.no_grad():
        model(x)
    tensors = list(model.parameters()) + list(model.buffers())
    before = [(t.data_ptr(), t._version) for t in tensors]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for switch in (lambda: set_bits(model, 2),
                   lambda: set_layer_bits(model, {'conv1': 4, 'fc1': 6}),
                   lambda: get_bits(model),
                   lambda: use_bits(model, 6).__enter__()):
        counter = _CountTorchCalls()
        with counter:
            switch()
        assert counter.calls == []
    after = [(t.data_ptr(), t._version) for t in tensors]
    assert after == before
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_switch_then_forward_matches_fresh_setting(model):
    """Switching back and forth gives the same outputs as the first time
    (no state left behind by a switch; eval-mode caches are keyed by bit)."""
    x = torch.randn(2, 3, 6, 6)
    _train_all_bits(model, x)
    model.eval()
    with torch.no_grad():
        first = {}
        for bit in BITS:
            set_bits(model, bit)
            first[bit] = model(x)
        for bit in (2, 8, 4, 6, 2):
            set_bits(model, bit)
            assert torch.equal(model(x), first[bit])
    assert len({tuple(v.flatten().tolist()) for v in first.values()}) == 4


def test_use_bits_blocks_in_threads_each_get_their_bit(model):
    """Four threads serving bits 8, 6, 4 and 2 of one model, 200 forwards
    each inside ``use_bits`` (a server's pattern), while a fifth switches with
    ``set_bits``: every output is its bit's, and the model ends at the bit
    it started at (issue 25: 44 and 51 of 150 outputs matched neither)."""
    import threading
    generator = torch.Generator().manual_seed(0)
    _train_all_bits(model, torch.randn(8, 3, 6, 6, generator=generator))
    model.eval()
    x = torch.randn(16, 3, 6, 6, generator=generator)
    want = {}
    for bit in BITS:
        with use_bits(model, bit), torch.no_grad():
            want[bit] = model(x)
    set_bits(model, 8)
    wrong, stop = [], threading.Event()

    def serve(bit):
        for _ in range(200):
            with use_bits(model, bit), torch.no_grad():
                if not torch.equal(model(x), want[bit]):
                    wrong.append(bit)

    def switch():
        while not stop.is_set():
            for bit in (6, 8):
                set_bits(model, bit)

    threads = [threading.Thread(target=serve, args=(b, )) for b in BITS]
    switcher = threading.Thread(target=switch)
    switcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    switcher.join()
    set_bits(model, 8)
    with use_bits(model, 4):
        pass
    assert wrong == []
    assert set(_all_bits(model).values()) == {8}
