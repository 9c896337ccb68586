"""Weight perturbations ||Q_b(W) - W||^2 against a float64 reference."""
import numpy as np
import pytest
import torch

import mmdrq
from mmdrq.search.perturbation import weight_perturbations


def reference(weight, scale, high, bit):
    """Double Rounding in numpy: rint is half-to-even, as torch.round."""
    w = weight.double().numpy()
    s = scale.double().numpy().reshape(-1, *[1] * (w.ndim - 1))
    d = high - bit
    q_h = np.clip(np.rint(w / s), -2**(high - 1), 2**(high - 1) - 1)
    q_l = np.clip(np.rint(q_h / 2**d), -2**(bit - 1), 2**(bit - 1) - 1)
    return float(((q_l * s * 2**d - w)**2).sum())


@pytest.mark.parametrize('bits', [(8, 6, 4, 2), (4, 3, 2)])
def test_every_layer_and_bit_against_reference(make_tiny_cnn, bits):
    model = mmdrq.quantize_model(make_tiny_cnn(seed=len(bits)), bits=bits)
    model(torch.randn(2, 3, 8, 8))  # initialise the scales
    got = weight_perturbations(model)
    layers = {n: m for n, m in model.named_modules() if n in got}
    assert sorted(got) == sorted(layers) and len(got) == 4
    for name, per_bit in got.items():
        layer = layers[name]
        scale = layer.weight_quantizer.scale.detach()[0]
        assert list(per_bit) == list(bits)
        for bit, value in per_bit.items():
            assert value == pytest.approx(
                reference(layer.weight.detach(), scale, bits[0], bit),
                rel=1e-6)
        # fewer bits, coarser grid: the error grows
        values = [per_bit[b] for b in bits]
        assert values == sorted(values)
