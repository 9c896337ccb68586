"""Per-bit step shifts (``weight_quantizer.step_shift='mse'``): bit l's step
is ``s * 2**(h-l+k)`` with the k of least weight error, its integers still a
shift of the stored ones; checked against a float64 reference written
here, on fresh random weights with exact ties of the second rounding."""
import zlib

import numpy as np
import pytest
import torch

from mmdrq import load_int, quantize_model, save_int, set_bits
from mmdrq.quantization import (DoubleRoundingQuantizer, quantized_layers,
                                use_bits)

BITS = (8, 6, 4, 2)


def shift_round_half_even(q: np.ndarray, d: int) -> np.ndarray:
    if d == 0:
        return q
    low = q >> d
    rest = q - (low << d)
    half = 1 << (d - 1)
    return low + ((rest > half) | ((rest == half) & (low % 2 == 1)))


def reference(w: torch.Tensor, s: torch.Tensor, bit: int):
    """(k, dequantised weight) of ``bit``: every candidate k's weight in
    float64 from integer ops on the stored integers, the least squared
    error's kept (ties to the larger k, as ``min`` over -2, -1, 0)."""
    h = BITS[0]
    step = s.view(-1, 1, 1, 1).numpy()
    q_h = np.clip(np.rint(w.numpy() / step), -2**(h - 1),
                  2**(h - 1) - 1).astype(np.int64)
    best = None
    for k in ((-2, -1, 0) if bit != h else (0, )):
        d = h - bit + k
        q = np.clip(shift_round_half_even(q_h, d), -2**(bit - 1),
                    2**(bit - 1) - 1)
        value = q * step * 2.0**d
        error = float(((value - w.numpy())**2).sum())
        if best is None or error < best[0]:
            best = (error, k, value)
    return best[1], torch.from_numpy(best[2])


def weights(seed):
    """Per-channel power-of-two scales, narrow weights (std 10 steps: a
    finer low-bit step pays); a third of the stored integers at
    exact ties of a second rounding by 1 to 8 bits."""
    gen = torch.Generator().manual_seed(seed)
    s = 2.0**-torch.randint(3, 8, (6, ), generator=gen).double()
    v = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64) * 10
    d = torch.randint(1, 7, (6, 12), generator=gen)
    m = (torch.rand(6, 12, generator=gen, dtype=torch.float64) *
         (32 >> d).clamp(min=1).double()).floor()
    sign = torch.randint(0, 2, (6, 12), generator=gen).double() * 2 - 1
    v.view(6, -1)[:, :12] = sign * (2 * m + 1) * 2.0**(d - 1)
    return v * s.view(-1, 1, 1, 1), s


@pytest.mark.parametrize('seed', [zlib.crc32(b'step_shift') + i
                                  for i in range(4)])
def test_forward_at_every_bit_is_the_reference(seed):
    w, s = weights(seed)
    quantizer = DoubleRoundingQuantizer(BITS, num_channels=6,
                                        step_shift='mse').double()
    with torch.no_grad():
        quantizer.scale.copy_(s.view_as(quantizer.scale))
        quantizer.initialized.fill_(True)
    quantizer.train()
    chosen = set()
    for bit in BITS:
        k, expected = reference(w, s, bit)
        got = quantizer(w, bit)
        assert int(quantizer.step_shifts[BITS.index(bit)]) == k
        assert quantizer.shift(bit) == BITS[0] - bit + k
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        q = quantizer.integers(w, bit)
        torch.testing.assert_close(q.double() * s.view(-1, 1, 1, 1) *
                                   2.0**quantizer.shift(bit), expected,
                                   rtol=0, atol=0)
        chosen.add(k)
    assert chosen != {0}  # some lower bit took a finer step
    # evaluation keeps the chosen k
    quantizer.eval()
    before = quantizer.step_shifts.clone()
    quantizer(w * 3, 2)
    assert torch.equal(quantizer.step_shifts, before)


def shifted_model(make_tiny_cnn, x):
    """A TinyCNN with step shifts, every bit's scales and k set by a
    training forward on ``x``; eval mode."""
    model = quantize_model(make_tiny_cnn(), bits=list(BITS),
                           weight_quantizer=dict(step_shift='mse'))
    model.train()
    for bit in BITS:
        set_bits(model, bit)
        model(x)
    return model.eval()


def test_integer_file_keeps_the_step_shifts(tmp_path, make_tiny_cnn):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    model = shifted_model(make_tiny_cnn, x)
    outputs = {}
    for bit in BITS:
        set_bits(model, bit)
        outputs[bit] = model(x)
    save_int(model, str(tmp_path / 'model_int.pth'))
    other = quantize_model(make_tiny_cnn(), bits=list(BITS),
                           weight_quantizer=dict(step_shift='mse'))
    load_int(other, str(tmp_path / 'model_int.pth')).eval()
    for bit in BITS:
        set_bits(other, bit)
        torch.testing.assert_close(other(x), outputs[bit], rtol=0, atol=0)
    plain = quantize_model(make_tiny_cnn(), bits=list(BITS))
    with pytest.raises(Exception, match='step_shifts'):
        load_int(plain, str(tmp_path / 'model_int.pth'))


def test_wrong_uses_are_named(small_classifier):
    from mmdrq.models import MultiPrecisionQAT
    with pytest.raises(ValueError, match="step_shift.*'off', 'mse'"):
        DoubleRoundingQuantizer(BITS, step_shift='auto')
    with pytest.raises(ValueError, match="step_shift='mse' needs variant"):
        DoubleRoundingQuantizer(BITS, variant='floor', step_shift='mse')
    with pytest.raises(ValueError, match='compile=True with .*step_shift'):
        MultiPrecisionQAT(small_classifier(), dict(
            bits=list(BITS), weight_quantizer=dict(step_shift='mse')),
            compile=True)


def test_one_export_folder_derives_every_bit_with_its_step_shifts(
        tmp_path, make_tiny_cnn):
    """Each lower bit's weights shifted by h - l + k from the stored
    integers when its session is made: the folder says which (format 3,
    ``weight_shifts``), its writer checked each setting against its own
    export value for value, and ONNX Runtime gives PyTorch's deploy
    numerics (up to the float stem's and head's summation order)."""
    pytest.importorskip('onnxruntime')
    from mmdrq.deploy.pipeline import export_to_folder
    from mmdrq.quantization.deploy_numerics import deploy_numerics
    from mmdrq_runtime.artifact import read_meta
    from mmdrq_runtime.session import SwitchableSession
    x = torch.randn(6, 3, 16, 16)
    model = shifted_model(make_tiny_cnn, x)
    shifts = {8: 0, 6: -1, 4: -2, 2: -1}  # k per bit, every layer
    for layer in quantized_layers(model).values():
        layer.weight_quantizer.step_shifts.copy_(
            torch.tensor([shifts[b] for b in BITS]))
    folder = str(tmp_path / 'onnx')
    export_to_folder(model, folder, list(BITS), input_shape=(1, 3, 16, 16),
                     forward=lambda m, inputs: m(inputs), graph='tensor')
    meta = read_meta(folder)
    assert meta['format_version'] == 3
    entries = {e['bit']: e for e in meta['settings']}
    for bit in (6, 4, 2):
        assert set(entries[bit]['weight_shifts'].values()) == \
            {8 - bit + shifts[bit]}
    session = SwitchableSession(folder, threads=1)
    for bit in BITS:
        got = session.set_bits(bit).run(x.numpy())[0]
        with use_bits(model, bit), torch.no_grad(), \
                deploy_numerics(model, lambda m: m(x[:2])):
            want = model(x).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
