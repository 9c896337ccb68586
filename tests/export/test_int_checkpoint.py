"""Integer checkpoints: save_int / load_int, packing, sizes, errors."""
import importlib
import math
import os

import pytest
import torch

from conftest import RESNET18_CFG, TinyCNN, build_openmmlab_model
from mmdrq import (QConv2d, QLinear, load_int, quantize_model, save_int,
                   set_bits)
from mmdrq.export.packing import pack, storage_of, unpack

CONFIGS = {
    'int8': dict(bits=[8, 6, 4, 2]),
    'int4x2': dict(bits=[4, 3, 2]),
    'floor': dict(bits=[8, 6, 4, 2],
                  weight_quantizer=dict(type='DoubleRoundingQuantizer',
                                        variant='floor')),
}


def _tiny(seed, **kwargs):
    torch.manual_seed(seed)
    return TinyCNN(**kwargs), torch.randn(2, 3, 6, 6)


def _resnet18(seed):
    torch.manual_seed(seed)
    return build_openmmlab_model('mmpretrain', RESNET18_CFG), \
        torch.randn(2, 3, 32, 32)


MODELS = {'tiny': _tiny, 'resnet18': _resnet18}


def _trained(make, seed, config):
    """A converted model with every scale initialised, BN stats updated and
    weights moved by one optimizer step per bit."""
    model, x = make(seed)
    quantize_model(model, **config)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for bit in config['bits']:
        set_bits(model, bit)
        optimizer.zero_grad()
        out = model(x)
        if isinstance(out, (tuple, list)):
            out = out[-1]
        out.square().mean().backward()
        optimizer.step()
    model.eval()
    return model, x


def _outputs(model, x, bits):
    outs = {}
    with torch.no_grad():
        for bit in bits:
            set_bits(model, bit)
            out = model(x)
            outs[bit] = out[-1] if isinstance(out, (tuple, list)) else out
    return outs


def _quant_names(model):
    return [n for n, m in model.named_modules()
            if isinstance(m, (QConv2d, QLinear))]


# ----------------------------------------------------------- round trips

@pytest.mark.parametrize('config_name', list(CONFIGS))
@pytest.mark.parametrize('model_name', list(MODELS))
def test_round_trip_exact_at_every_bit(tmp_path, model_name, config_name):
    config = CONFIGS[config_name]
    make = MODELS[model_name]
    bits = config['bits']
    saved, x = _trained(make, 0, config)
    expected = _outputs(saved, x, bits)
    path = str(tmp_path / 'model.int.pth')
    save_int(saved, path)

    fresh, _ = _trained(make, 1, config)  # other weights, scales, BN stats
    before = _outputs(fresh, x, bits)
    assert not torch.allclose(before[bits[0]], expected[bits[0]])
    assert load_int(fresh, path) is fresh
    after = _outputs(fresh, x, bits)
    for bit in bits:
        assert torch.equal(after[bit], expected[bit]), f'bit {bit}'
    assert len({tuple(o.flatten().tolist()) for o in expected.values()}) \
        == len(bits)

    # the file holds integers, not the FP weights of quantized layers
    payload = torch.load(path, map_location='cpu', weights_only=True)
    names = _quant_names(saved)
    assert sorted(payload['int_weights']) == sorted(names)
    for name in names:
        assert name + '.weight' not in payload['state_dict']
        entry = payload['int_weights'][name]
        numel = math.prod(entry['shape'])
        storage = 'int4x2' if bits[0] <= 4 else 'int8'
        assert entry['storage'] == storage
        if storage == 'int4x2':
            assert entry['data'].dtype == torch.uint8
            assert entry['data'].numel() == (numel + 1) // 2
        else:
            assert entry['data'].dtype == torch.int8
            assert entry['data'].numel() == numel
        # stored integers are the model's q_h
        module = saved.get_submodule(name)
        q = unpack(entry['data'], bits[0], entry['shape'])
        assert torch.equal(q, module.weight_quantizer.integers(module.weight))
    if model_name == 'tiny':
        odd = payload['int_weights']['conv1']
        assert math.prod(odd['shape']) % 2 == 1


def _near_ties(model, gen):
    """Give every quantized weight of a float64 model W / s values near
    and at k + 0.5 (ties, and 1e-9 or 1e-12 off them: float32 cannot tell
    them apart), plus the known case W = 1.4500000000000002, s = 0.1."""
    layers = [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]
    with torch.no_grad():
        for module in layers:
            quantizer = module.weight_quantizer
            s = quantizer.scale[0].view(-1, *[1] * (module.weight.dim() - 1))
            v = (module.weight / s).view(s.shape[0], -1)
            k = torch.randint(-100, 100, v.shape, generator=gen).double()
            eps = torch.tensor([0, 1e-9, -1e-9, 1e-12, -1e-12],
                               dtype=torch.float64)
            pick = torch.randint(0, 5, v.shape, generator=gen)
            near = torch.rand(v.shape, generator=gen) < 0.5
            v[near] = (k + 0.5 + eps[pick])[near]
            module.weight.copy_(v.view(module.weight.shape) * s)
        first = layers[0]
        first.weight_quantizer.scale[0, 0] = 0.1
        first.weight.view(first.weight.shape[0], -1)[0, 0] = \
            1.4500000000000002
    return layers


def test_float64_model_stores_its_forwards_integers(tmp_path):
    """The integers of a float64 model are rounded in float64, as its
    forward rounds them: stored q_h equals round(forward at h / s)
    (1.4500000000000002 / 0.1 gives 15, float32 gives 14), and export ->
    load_int -> forward is bit-exact at every bit."""
    bits = CONFIGS['int8']['bits']
    saved, x = _trained(_tiny, 0, CONFIGS['int8'])
    saved.double()
    x = x.double()
    layers = _near_ties(saved, torch.Generator().manual_seed(5))
    expected = _outputs(saved, x, bits)
    path = str(tmp_path / 'model.int.pth')
    save_int(saved, path)
    payload = torch.load(path, map_location='cpu', weights_only=True)
    differs = 0
    for name in _quant_names(saved):
        module = saved.get_submodule(name)
        quantizer = module.weight_quantizer
        s = quantizer.scale[0].view(-1, *[1] * (module.weight.dim() - 1))
        with torch.no_grad():
            forward = torch.round(quantizer(module.weight, bits[0]) / s)
        entry = payload['int_weights'][name]
        stored = unpack(entry['data'], bits[0], entry['shape'])
        assert torch.equal(stored.double(), forward), name
        in_float32 = torch.clamp(torch.round(
            module.weight.float() / s.float()), -128, 127)
        differs += int((in_float32.double() != forward).sum())
    assert differs >= 10  # the data tells float32 rounding apart
    first = layers[0].weight.view(layers[0].weight.shape[0], -1)
    assert payload['int_weights'][_quant_names(saved)[0]]['data'][0] == 15
    assert first[0, 0] == 1.4500000000000002

    fresh, _ = _trained(_tiny, 1, CONFIGS['int8'])
    fresh.double()
    load_int(fresh, path)
    after = _outputs(fresh, x, bits)
    for bit in bits:
        assert after[bit].dtype == torch.float64
        assert torch.equal(after[bit], expected[bit]), f'bit {bit}'


def test_loaded_model_trains_on(tmp_path, make_tiny_cnn):
    """A loaded model is an ordinary converted model: it trains."""
    saved, x = _trained(_tiny, 0, CONFIGS['int4x2'])
    save_int(saved, str(tmp_path / 'a.pth'))
    fresh = quantize_model(make_tiny_cnn(5), bits=[4, 3, 2])
    load_int(fresh, str(tmp_path / 'a.pth'))
    fresh.train()
    for bit in (4, 3, 2):
        set_bits(fresh, bit)
        loss = fresh(x).square().mean()
        loss.backward()
        assert torch.isfinite(loss)
        assert fresh.conv1.weight_quantizer.scale.grad is not None


# --------------------------------------------------------------- packing

@pytest.mark.parametrize('bit', range(2, 17))
def test_pack_unpack_round_trip(bit):
    lo, hi = -(2**(bit - 1)), 2**(bit - 1) - 1
    generator = torch.Generator().manual_seed(bit)
    for numel in (1, 2, 7, 64, 1001):
        q = torch.randint(lo, hi + 1, (numel, ), generator=generator,
                          dtype=torch.int32)
        q[0] = lo
        if numel > 1:
            q[-1] = hi
        shape = (numel, ) if numel % 7 else (7, numel // 7)
        q = q.reshape(shape)
        data = pack(q, bit)
        back = unpack(data, bit, list(shape))
        assert back.dtype == torch.int32
        assert back.shape == q.shape
        assert torch.equal(back, q), (bit, numel)
        expected_bytes = {'int4x2': (numel + 1) // 2, 'int8': numel,
                          'int16': 2 * numel}[storage_of(bit)]
        assert data.numel() * data.element_size() == expected_bytes


def test_storage_formats():
    assert [storage_of(b) for b in (2, 3, 4)] == ['int4x2'] * 3
    assert [storage_of(b) for b in (5, 6, 7, 8)] == ['int8'] * 4
    assert [storage_of(b) for b in range(9, 17)] == ['int16'] * 8


def test_int4x2_nibble_layout():
    data = pack(torch.tensor([1, -1, -8, 7, 3], dtype=torch.int32), 4)
    assert data.tolist() == [0xF1, 0x78, 0x03]


# ----------------------------------------------------------------- sizes

@pytest.mark.parametrize('bits, limit', [([8, 6, 4, 2], 0.26),
                                         ([4, 3, 2], 0.14)])
def test_resnet18_stored_bytes(tmp_path, bits, limit):
    model, x = _resnet18(0)
    quantize_model(model, bits=bits)
    model.eval()
    with torch.no_grad():
        model(x)
    sizes = save_int(model, str(tmp_path / 'r18.pth'))
    numels = [model.get_submodule(n).weight.numel()
              for n in _quant_names(model)]
    assert sizes['fp32_bytes'] == 4 * sum(numels)
    per_layer = [(n + 1) // 2 if bits[0] <= 4 else n for n in numels]
    assert sizes['int_bytes'] == sum(per_layer)
    ratio = (sizes['int_bytes'] + sizes['scale_bytes']) / sizes['fp32_bytes']
    assert ratio <= limit, ratio
    assert sizes['scale_bytes'] > 0


# ---------------------------------------------------------------- errors

def test_load_into_other_architecture(tmp_path):
    saved, _ = _trained(_tiny, 0, CONFIGS['int8'])
    path = str(tmp_path / 'tiny.pth')
    save_int(saved, path)
    other = quantize_model(TinyCNN(width=6), bits=[8, 6, 4, 2])
    with pytest.raises(ValueError) as info:
        load_int(other, path)
    message = str(info.value)
    differing = [k for k, v in other.state_dict().items()
                 if saved.state_dict()[k].shape != v.shape]
    assert differing
    assert any(repr(k) in message for k in differing), message

    resnet = quantize_model(build_openmmlab_model('mmpretrain',
                                                  RESNET18_CFG))
    with pytest.raises(ValueError, match=r"state key '[\w.]+'"):
        load_int(resnet, path)


def test_load_with_other_bits(tmp_path, make_tiny_cnn):
    saved, _ = _trained(_tiny, 0, CONFIGS['int8'])
    path = str(tmp_path / 'tiny.pth')
    save_int(saved, path)
    other = quantize_model(make_tiny_cnn(), bits=[4, 3, 2])
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_int(other, path)
    assert '[8, 6, 4, 2]' in str(info.value)
    assert '[4, 3, 2]' in str(info.value)
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_load_with_other_variant(tmp_path, make_tiny_cnn):
    saved, _ = _trained(_tiny, 0, CONFIGS['floor'])
    path = str(tmp_path / 'tiny.pth')
    save_int(saved, path)
    other = quantize_model(make_tiny_cnn(), bits=[8, 6, 4, 2])
    with pytest.raises(ValueError, match='floor'):
        load_int(other, path)


@pytest.mark.parametrize('keep', [0.5, 0.02, 0.98, -1])
def test_truncated_file(tmp_path, make_tiny_cnn, keep):
    saved, _ = _trained(_tiny, 0, CONFIGS['int8'])
    path = tmp_path / 'full.pth'
    save_int(saved, str(path))
    data = path.read_bytes()
    cut = tmp_path / 'cut.pth'
    end = keep if keep == -1 else int(len(data) * keep)
    cut.write_bytes(data[:end])
    model = quantize_model(make_tiny_cnn())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match='truncated|corrupt') as info:
        load_int(model, str(cut))
    assert 'cut.pth' in str(info.value)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize(
    'content', ['state_dict', 'tensor', 'text', 'meta', 'meta_not_dict'])
def test_not_an_mmdrq_file(tmp_path, make_tiny_cnn, content):
    path = tmp_path / 'other.pth'
    if content == 'state_dict':
        torch.save(make_tiny_cnn().state_dict(), str(path))
    elif content == 'tensor':
        torch.save(torch.zeros(3), str(path))
    elif content == 'meta':
        torch.save(dict(meta=dict(format='something-else')), str(path))
    elif content == 'meta_not_dict':
        torch.save(dict(meta=3, state_dict={}), str(path))
    else:
        path.write_text('hello, not a checkpoint\n')
    model = quantize_model(make_tiny_cnn())
    with pytest.raises(ValueError, match='mmdrq'):
        load_int(model, str(path))


def _edit_extra_layer(payload):
    payload['int_weights']['conv9'] = payload['int_weights']['conv1']
    return 'conv9'


def _edit_missing_layer(payload):
    del payload['int_weights']['conv2']
    return 'conv2'


def _edit_short_layer(payload):
    entry = payload['int_weights']['conv3']
    entry['data'] = entry['data'][:-3]
    return 'conv3'


def _edit_no_signature(payload):
    del payload['meta']['signature']
    return 'meta.signature'


def _edit_extra_state_key(payload):
    payload['state_dict']['bn9.weight'] = torch.ones(3)
    return 'bn9.weight'


def _edit_missing_scale(payload):
    del payload['int_weights']['fc1']['scale']
    return 'fc1'


@pytest.mark.parametrize('edit', [
    _edit_extra_layer, _edit_missing_layer, _edit_short_layer,
    _edit_no_signature, _edit_extra_state_key, _edit_missing_scale])
def test_hand_edited_file(tmp_path, make_tiny_cnn, edit):
    """A file edited after saving is refused with its name and what is
    wrong, never a bare KeyError or a reshape error from the unpacking."""
    saved, _ = _trained(_tiny, 0, CONFIGS['int8'])
    path = tmp_path / 'edited.pth'
    save_int(saved, str(path))
    payload = torch.load(path, weights_only=True)
    what = edit(payload)
    torch.save(payload, path)
    model = quantize_model(make_tiny_cnn())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_int(model, str(path))
    assert 'edited.pth' in str(info.value)
    assert what in str(info.value)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


class _Payload:
    """Unpickling it would create a folder: code run by the load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker, )


def test_pickled_code_is_refused_by_name(tmp_path, make_tiny_cnn,
                                         monkeypatch):
    saved, _ = _trained(_tiny, 0, CONFIGS['int8'])
    path = tmp_path / 'payload.pth'
    save_int(saved, str(path))
    payload = torch.load(path, weights_only=True)
    marker = tmp_path / 'ran'
    payload['meta']['note'] = _Payload(marker)
    torch.save(payload, path)
    # would turn torch's default weights_only=True off
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    with pytest.raises(ValueError, match='holds objects that are not '
                       r'allowed in a checkpoint \(\w+\.mkdir\)'):
        load_int(quantize_model(make_tiny_cnn()), str(path))
    assert not marker.exists()


def test_missing_file(tmp_path, make_tiny_cnn):
    model = quantize_model(make_tiny_cnn())
    with pytest.raises(FileNotFoundError):
        load_int(model, str(tmp_path / 'nope.pth'))


def test_unquantized_model(tmp_path, make_tiny_cnn):
    with pytest.raises(ValueError, match='quantize_model'):
        save_int(make_tiny_cnn(), str(tmp_path / 'x.pth'))
    assert not (tmp_path / 'x.pth').exists()


def test_unshared_variant_refused(tmp_path, make_tiny_cnn):
    model = quantize_model(make_tiny_cnn(), weight_quantizer=dict(
        type='DoubleRoundingQuantizer', variant='unshared'))
    model.train()
    model(torch.randn(2, 3, 6, 6))
    path = tmp_path / 'unshared.pth'
    with pytest.raises(ValueError, match='unshared') as info:
        save_int(model, str(path))
    assert 'conv1' in str(info.value)
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_write(tmp_path, monkeypatch):
    saved, _ = _trained(_tiny, 0, CONFIGS['int8'])
    path = tmp_path / 'model.pth'
    save_int(saved, str(path))
    old = path.read_bytes()

    atomic = importlib.import_module('mmdrq.utils.atomic')

    def broken_save(obj, f, *args, **kwargs):
        f.write(b'PK\x03\x04 half a checkpoint')
        raise OSError('disk full')

    monkeypatch.setattr(atomic.torch, 'save', broken_save)
    other, _ = _trained(_tiny, 1, CONFIGS['int8'])
    with pytest.raises(OSError, match='disk full'):
        save_int(other, str(path))
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ['model.pth']
    monkeypatch.undo()

    # the old file is still a valid checkpoint of the first model
    fresh = quantize_model(TinyCNN(), bits=[8, 6, 4, 2])
    fresh.eval()
    load_int(fresh, str(path))
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(_outputs(fresh, x, [2])[2], _outputs(saved, x, [2])[2])


def test_save_creates_folder(tmp_path):
    saved, _ = _trained(_tiny, 0, CONFIGS['int8'])
    path = tmp_path / 'a' / 'b' / 'model.pth'
    save_int(saved, str(path))
    assert os.listdir(path.parent) == ['model.pth']


def test_per_tensor_scales_from_config_round_trip(make_tiny_cnn, tmp_path):
    """weight_quantizer=dict(per_channel=False): one scale per layer, and
    the integer checkpoint still reloads bit-exact."""
    import mmdrq
    model = mmdrq.quantize_model(make_tiny_cnn(0), bits=[8, 4, 2],
                                 weight_quantizer=dict(per_channel=False))
    assert model.conv1.weight_quantizer.scale.shape == (1, 1)
    x = torch.randn(2, 3, 8, 8)
    model(x)  # initialise the scales
    model.eval()
    path = tmp_path / 'int.pth'
    mmdrq.save_int(model, str(path))
    again = mmdrq.quantize_model(make_tiny_cnn(1), bits=[8, 4, 2],
                                 weight_quantizer=dict(per_channel=False))
    mmdrq.load_int(again, str(path))
    again.eval()
    with torch.no_grad():
        for bit in (8, 4, 2):
            with mmdrq.use_bits(model, bit), mmdrq.use_bits(again, bit):
                assert torch.equal(model(x), again(x))


def test_subnet_bits_are_recorded_and_applied(make_tiny_cnn, tmp_path):
    import mmdrq
    model = mmdrq.quantize_model(make_tiny_cnn(0), bits=[8, 4, 2])
    model(torch.randn(2, 3, 8, 8))
    subnet = {'conv1': 2, 'conv2': 8, 'conv3': 4, 'fc1': 2}
    path = str(tmp_path / 'subnet.pth')
    mmdrq.save_int(model, path, layer_bits=subnet)
    again = mmdrq.quantize_model(make_tiny_cnn(1), bits=[8, 4, 2])
    mmdrq.load_int(again, path)
    assert mmdrq.get_bits(again) == subnet
    with pytest.raises(KeyError, match='conv9'):
        mmdrq.save_int(model, path, layer_bits={'conv9': 2})
    with pytest.raises(ValueError, match='conv1.*6'):
        mmdrq.save_int(model, path, layer_bits={'conv1': 6})


def test_atomic_write_syncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    """A crash right after the rename must not lose it: the folder entry is
    fsynced once the file has its final name."""
    atomic = importlib.import_module('mmdrq.utils.atomic')
    path = tmp_path / 'x.bin'
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = 'folder' if os.path.isdir(f'/proc/self/fd/{fd}') else 'file'
        events.append(kind)
        real_fsync(fd)

    def replace(src, dst):
        events.append('rename')
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, 'fsync', fsync)
    monkeypatch.setattr(atomic.os, 'replace', replace)
    atomic.atomic_write(str(path), lambda f: f.write(b'data'))
    assert events == ['file', 'rename', 'folder']
    assert path.read_bytes() == b'data'


@pytest.mark.parametrize('where', ['int_weights', 'state_dict'])
def test_flipped_bytes_inside_a_tensor_are_refused(tmp_path, make_tiny_cnn,
                                                   where):
    """torch does not check its zip's CRCs: bytes flipped inside a stored
    tensor loaded as other weights (issue 25); the tensors' SHA-256 in the
    metadata refuses them."""
    saved, _ = _trained(_tiny, 0, CONFIGS['int8'])
    path = tmp_path / 'model_int.pth'
    save_int(saved, str(path))
    payload = torch.load(path, weights_only=True)
    tensor = payload['int_weights']['conv1']['data'] \
        if where == 'int_weights' else payload['state_dict']['stem.weight']
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    data = path.read_bytes()
    start = data.find(raw)
    assert start > 0 and data.find(raw, start + 1) < 0  # found once
    damaged = bytearray(data)
    for offset in range(start, start + 8):
        damaged[offset] ^= 0xFF
    path.write_bytes(bytes(damaged))
    name = 'int_weights.conv1.data' if where == 'int_weights' else \
        'state_dict.stem.weight'
    with pytest.raises(ValueError, match=f"model_int.pth.*tensor '{name}' "
                       'does not match the SHA-256'):
        load_int(quantize_model(make_tiny_cnn()), str(path))


def test_a_file_without_digests_loads_with_a_warning(tmp_path,
                                                     make_tiny_cnn):
    from mmdrq.export.int_checkpoint import DIGESTS
    saved, _ = _trained(_tiny, 0, CONFIGS['int8'])
    path = tmp_path / 'old_int.pth'
    save_int(saved, str(path))
    payload = torch.load(path, weights_only=True)
    del payload['meta'][DIGESTS]
    torch.save(payload, path)
    with pytest.warns(UserWarning, match='old_int.pth.*no tensor digests'):
        load_int(quantize_model(make_tiny_cnn()), str(path))


def test_saving_a_model_never_run_warns(tmp_path, make_tiny_cnn):
    model = quantize_model(make_tiny_cnn(), bits=[8, 4])
    with pytest.warns(UserWarning, match='never_run.pth.*4 quantized layers '
                      "were never run.*'conv1'"):
        save_int(model, str(tmp_path / 'never_run.pth'))
