"""Deploy numerics: ONNX Runtime's exact sessions and PyTorch under
``deploy_numerics`` give the same bits, because quantized layers sum
integers (exact in float32 below 2**24) and then scale once."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip('onnxruntime')

from mmdrq import quantize_model, set_bits, use_bits  # noqa: E402
from mmdrq.deploy import OnnxExporter, make_session  # noqa: E402
from mmdrq.quantization.deploy_numerics import deploy_numerics  # noqa: E402
from mmdrq.quantization.graph import conv_bn_pairs  # noqa: E402
from conftest import calibrate  # noqa: E402

BITS = (8, 6, 4, 2)
SCALE = 2.0**-4  # the first layer's input scale: x / s exact, ties exact


class Residual(nn.Module):
    """conv-BN-ReLU, conv-BN plus a residual, ReLU, a linear classifier:
    every layer quantized, no float reductions (no pooling), so every
    output is computed by construction in the same float operations."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 5 * 5, 10)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(y.flatten(1))


def trained_model(seed=0):
    """Scales of every bit initialised, random BN statistics (so the fold
    matters), eval mode; the first layer's inputs on exact ties."""
    model = Residual()
    quantize_model(model, bits=list(BITS), skip_first_last=False)
    calibrate(model, (16, 4, 5, 5), seed)
    for bit in BITS:
        model.conv1.act_quantizer.scale.data[BITS.index(bit)] = SCALE
    return model


def tie_inputs(seed=1):
    """Inputs ``(k + 0.5) * s`` across the signed 8-bit range and beyond
    (exact ties of the first rounding), and random values."""
    generator = torch.Generator().manual_seed(seed)
    ties = (torch.arange(-260, 260) + 0.5) * SCALE
    noise = torch.randn(40 * 100 - ties.numel(), generator=generator) * 4
    return torch.cat([ties, noise])[torch.randperm(4000, generator=generator)
                                    ].reshape(40, 4, 5, 5)


def float64_reference(model, x, bit):
    """The fake-quantized forward in float64 (the model's own rounding of
    x / s, but sums and BN without float32 rounding)."""
    import copy
    reference = copy.deepcopy(model).double()
    with use_bits(reference, bit), torch.no_grad():
        return reference(x.double())


@pytest.mark.parametrize('bit', BITS)
def test_onnxruntime_equals_pytorch_bit_for_bit(bit):
    model = trained_model()
    x = tie_inputs()
    exporter = OnnxExporter(model, x.shape, lambda m, inputs: m(inputs))
    session = make_session(exporter.export(bit).SerializeToString(),
                           threads=1)
    got = session.run(None, {'input': x.numpy()})[0]
    with use_bits(model, bit), torch.no_grad():
        fake = model(x).numpy()
        with deploy_numerics(model, lambda m: m(x[:2])):
            want = model(x).numpy()
        after = model(x).numpy()
    np.testing.assert_array_equal(got, want)
    # the same model: close to the float64 fake-quantized forward
    reference = float64_reference(model, x, bit).numpy()
    for value in (want, fake):
        np.testing.assert_allclose(value, reference, rtol=0,
                                   atol=1e-5 * np.abs(reference).max())
    # the block's end restores the training forward
    np.testing.assert_array_equal(after, fake)
    assert not any('forward' in vars(m) for m in model.modules())


def test_pairs_are_the_exporters_folds():
    model = trained_model()
    x = tie_inputs()[:2]
    pairs = conv_bn_pairs(model, lambda m: m(x))
    assert pairs == {'conv1': 'bn1', 'conv2': 'bn2'}
    exporter = OnnxExporter(model, x.shape, lambda m, inputs: m(inputs))
    exporter.skeleton()
    assert exporter.folded == pairs


class ConvKinds(nn.Module):
    """A BN after each kind of conv: 2-d, quantized transposed, FP
    transposed (skipped), quantized 3-d."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.up, self.bn_up = nn.ConvTranspose2d(4, 4, 2, 2), \
            nn.BatchNorm2d(4)
        self.up_fp, self.bn_up_fp = nn.ConvTranspose2d(4, 4, 1), \
            nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = torch.relu(self.bn_up(self.up(y)))
        y = self.bn_up_fp(self.up_fp(y))
        y = self.bn3(self.conv3(y.unsqueeze(1))).flatten(1, 2)
        return self.head(y)


def test_every_conv_kind_pairs_as_the_exporter_folds():
    """One rule (forms.folds_bn) for deploy numerics and the export."""
    model = quantize_model(ConvKinds(), bits=list(BITS), skip=['up_fp'],
                           skip_first_last=False)
    calibrate(model, (4, 3, 6, 6))
    x = torch.randn(2, 3, 6, 6)
    pairs = conv_bn_pairs(model, lambda m: m(x))
    assert pairs == {'conv': 'bn', 'up': 'bn_up', 'conv3': 'bn3'}
    exporter = OnnxExporter(model, x.shape, lambda m, inputs: m(inputs))
    exporter.skeleton()
    assert exporter.folded == pairs


def test_conv_output_used_twice_is_not_paired():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = Branch().eval()
    assert conv_bn_pairs(model, lambda m: m(torch.randn(1, 2, 3, 3))) == {}


def test_deploy_numerics_refuses_training_mode():
    model = trained_model().train()
    with pytest.raises(RuntimeError, match='for evaluation'):
        with deploy_numerics(model, lambda m: m(tie_inputs()[:2])):
            pass


def test_warns_when_integer_sums_can_pass_2_to_the_24():
    """255 * 128 * 1024 > 2**24 at 8 bits; at 6 bits 63 * 32 * 1024 is
    below it (the container's factor does not count)."""
    model = nn.Sequential(nn.ReLU(), nn.Linear(1024, 2))
    quantize_model(model, bits=[8, 6], skip_first_last=False)
    model.train()
    x = torch.rand(4, 1024)
    for bit in (8, 6):
        set_bits(model, bit)
        model(x)
    model.eval()
    model[1].weight.data.fill_(-1.0)  # every weight at the bottom of the grid
    for bit, warns in ((8, True), (6, False)):
        with use_bits(model, bit), torch.no_grad(), \
                deploy_numerics(model, lambda m: m(x)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                model(x)
        found = [w for w in caught if '2**24' in str(w.message)]
        assert bool(found) == warns, (bit, [str(w.message) for w in caught])
