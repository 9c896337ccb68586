"""A new layer type is one entry in the table of forms (forms.py): once
registered it converts, counts MACs, shows as quantized in the coverage
trace and exports to ONNX, with nothing else touched."""
import numpy as np
import pytest
import torch
from torch import nn

from mmdrq import quantize_model, set_bits, use_bits
from mmdrq.quantization import SwappedWeightLayer, form_of, register_form
from mmdrq.quantization.coverage import tracing_weight_uses
from mmdrq.search.counting import layer_costs

BITS = [8, 4]


class ScaledConv(nn.Conv2d):
    """A layer type no table knows: a conv whose output is doubled."""

    def forward(self, x):
        return super().forward(x) * 2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(),
                         ScaledConv(4, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 2, 1))


def _status(model):
    return {r.layer: r.status for r in model.mmdrq_report}


def test_unregistered_type_stays_fp():
    model = quantize_model(nn.Sequential(
        nn.Conv2d(3, 4, 3), _Unknown(4, 4, 1), nn.Conv2d(4, 2, 1)),
        bits=BITS, skip_first_last=False)
    assert _status(model)['1'] == 'FP: unsupported type _Unknown'


class _Unknown(nn.Conv2d):
    pass


def test_registered_type_converts_counts_traces_and_exports():
    pytest.importorskip('onnxruntime')
    from mmdrq.deploy import OnnxExporter, make_session

    register_form(ScaledConv, SwappedWeightLayer)
    model = quantize_model(_model(), bits=BITS, skip_first_last=False)
    assert _status(model)['2'] == f'quantized {BITS}'
    assert form_of(model[2]) is SwappedWeightLayer
    assert isinstance(model[2], ScaledConv)

    costs = layer_costs(model, torch.zeros(2, 3, 7, 7))
    assert costs['2'] == dict(macs=5 * 5 * 6 * 4 * 9, params=6 * 4 * 9)

    model.train()
    for bit in BITS:
        set_bits(model, bit)
        model(torch.randn(4, 3, 7, 7))
    model.eval()
    with torch.no_grad(), tracing_weight_uses(model) as uses:
        model(torch.randn(1, 3, 7, 7))
    assert uses.weights['2.weight'].use == 'quantized'

    exporter = OnnxExporter(model, (1, 3, 7, 7), lambda m, x: m(x))
    x = torch.randn(3, 3, 7, 7, generator=torch.Generator().manual_seed(1))
    for bit in BITS:
        got = make_session(exporter.export(bit).SerializeToString()).run(
            None, {'input': x.numpy()})[0]
        with use_bits(model, bit), torch.no_grad():
            want = model(x).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4,
                                   err_msg=f'bit {bit}')


@pytest.mark.parametrize('float_type, form, message', [
    (ScaledConv, nn.Conv2d, 'form must be a QuantLayer subclass'),
    ('ScaledConv', SwappedWeightLayer, 'float_type must be an nn.Module'),
])
def test_register_form_checks_its_arguments(float_type, form, message):
    with pytest.raises(TypeError, match=message):
        register_form(float_type, form)
