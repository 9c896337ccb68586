"""SubNet files (tools/test.py --subnets, export --subnet): written, read
and checked against the model with errors that name the file, the layer and
the bit."""
import json

import pytest

from mmdrq import quantize_model
from mmdrq.search.subnet import load_subnet, save_subnet


def _write(tmp_path, content):
    path = tmp_path / 'subnet.json'
    path.write_text(content if isinstance(content, str)
                    else json.dumps(content))
    return str(path)


def test_reads_layer_bits(tmp_path, make_tiny_cnn):
    model = quantize_model(make_tiny_cnn(), bits=[8, 4, 2])
    path = _write(tmp_path, {'layer_bits': {'conv1': 4, 'fc1': 2},
                             'avg_bits': 3.0})
    assert load_subnet(path, model) == {'conv1': 4, 'fc1': 2}


@pytest.mark.parametrize('content,message', [
    ('{"layer_bits": {', 'is not valid JSON'),
    ({'bits': {}}, 'has no "layer_bits" mapping'),
    ({'layer_bits': {'conv1': 4.5}},
     r"layer_bits\['conv1'\] must be an integer bit, got 4.5"),
    ({'layer_bits': {'conv1': '4'}},
     r"layer_bits\['conv1'\] must be an integer bit, got '4'"),
])
def test_malformed_file(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(ValueError, match=message) as info:
        load_subnet(path)
    assert 'subnet.json' in str(info.value)


def test_checked_against_the_model(tmp_path, make_tiny_cnn):
    model = quantize_model(make_tiny_cnn(), bits=[8, 4, 2])
    path = _write(tmp_path, {'layer_bits': {'backbone.nope': 4}})
    with pytest.raises(KeyError, match=r"subnet.json': layer "
                       r"'backbone.nope' is not a quantized layer"):
        load_subnet(path, model)
    path = _write(tmp_path, {'layer_bits': {'conv1': 6}})
    with pytest.raises(ValueError, match=r"subnet.json'\['conv1'\]=6 is "
                       r'not one of the bits \[8, 4, 2\]'):
        load_subnet(path, model)


def test_save_then_load(tmp_path, make_tiny_cnn):
    model = quantize_model(make_tiny_cnn(), bits=[8, 4, 2])
    path = str(tmp_path / 'subnet_avg_bits_3.json')
    save_subnet(path, {'conv1': 4, 'fc1': 2}, model, budget=3.0)
    assert json.loads(open(path).read())['budget'] == 3.0
    assert load_subnet(path, model) == {'conv1': 4, 'fc1': 2}


def test_bad_subnet_is_not_written(tmp_path, make_tiny_cnn):
    model = quantize_model(make_tiny_cnn(), bits=[8, 4, 2])
    path = tmp_path / 'subnet.json'
    with pytest.raises(ValueError, match=r"SubNet 'subnet'\['conv1'\]=6 "
                       r'is not one of the bits'):
        save_subnet(str(path), {'conv1': 6}, model)
    assert list(tmp_path.iterdir()) == []
