"""MACs, parameters, BitOps and sizes against hand counts."""
import torch
from torch import nn

import mmdrq
from mmdrq.search.counting import (average_bits, bitops, fp_bytes,
                                   layer_costs, model_size_bytes)


def resnet18():
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    return MODELS.build(dict(
        type='ImageClassifier', backbone=dict(type='ResNet', depth=18),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=1000, in_channels=512)))


def conv(size, c_in, c_out, k):
    """MACs of a k x k conv with a size x size output."""
    return size * size * c_out * c_in * k * k


def test_resnet18_hand_count():
    model = mmdrq.quantize_model(resnet18(), bits=[8, 6, 4, 2])
    x = torch.zeros(2, 3, 224, 224)  # per-image counts: batch must not matter
    costs = layer_costs(model, lambda m: m(x, mode='tensor'))
    expected = {}
    for block in (0, 1):
        for c in (1, 2):
            expected[f'backbone.layer1.{block}.conv{c}'] = conv(56, 64, 64, 3)
    for stage, size, c_in, c_out in ((2, 28, 64, 128), (3, 14, 128, 256),
                                     (4, 7, 256, 512)):
        prefix = f'backbone.layer{stage}'
        expected[f'{prefix}.0.conv1'] = conv(size, c_in, c_out, 3)
        expected[f'{prefix}.0.conv2'] = conv(size, c_out, c_out, 3)
        expected[f'{prefix}.0.downsample.0'] = conv(size, c_in, c_out, 1)
        expected[f'{prefix}.1.conv1'] = conv(size, c_out, c_out, 3)
        expected[f'{prefix}.1.conv2'] = conv(size, c_out, c_out, 3)
    # backbone.conv1 and head.fc stay FP: not in the costs
    assert {n: c['macs'] for n, c in costs.items()} == expected
    total = sum(expected.values())
    # the well-known 1.81 GMACs of ResNet-18's convs, less the FP stem
    assert total == 1_813_561_344 - conv(112, 3, 64, 7)
    uniform4 = {n: 4 for n in costs}
    assert bitops(uniform4, costs) == 16 * total
    params = sum(m.weight.numel() for n, m in model.named_modules()
                 if n in costs)
    assert sum(c['params'] for c in costs.values()) == params
    fp = fp_bytes(model)
    fp_params = 64 * 3 * 7 * 7 + 1000 * 512 + 1000  # stem, fc weight + bias
    assert fp > 4 * fp_params
    uniform8 = {n: 8 for n in costs}
    assert model_size_bytes(uniform8, costs, fp) == params + fp
    assert average_bits({'a': 8, 'b': 2, 'c': 2}) == 4


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(4, 8, 3)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4)
        self.proj = nn.Linear(8, 6)
        self.last = nn.Linear(6, 2)

    def forward(self, x):
        y = self.grouped(self.first(x))  # 8x8 -> 6x6 -> 3x3
        tokens = y.flatten(2).transpose(1, 2)  # (N, 9 tokens, 8)
        return self.last(self.proj(tokens))


def test_grouped_conv_and_linear_on_tokens():
    model = mmdrq.quantize_model(Small(), bits=[4, 2])
    costs = layer_costs(model, torch.zeros(3, 4, 8, 8))
    assert costs['grouped'] == dict(macs=3 * 3 * 8 * (8 // 4) * 9,
                                    params=8 * 2 * 9)
    assert costs['proj'] == dict(macs=9 * 6 * 8, params=48)


def test_a_fixed_input_bit_counts_in_bitops():
    """w4 layers with inputs fixed at 8 bits: MACs * 4 * 8."""
    model = mmdrq.quantize_model(
        Small(), bits=[4, 2], skip_first_last=False,
        act_quantizer=dict(type='ActQuantizer', fixed_bit=8))
    costs = layer_costs(model, torch.zeros(3, 4, 8, 8))
    assert costs['proj'] == dict(macs=9 * 6 * 8, params=48, act_bit=8)
    macs = sum(c['macs'] for c in costs.values())
    assert bitops({n: 4 for n in costs}, costs) == macs * 4 * 8
    assert bitops({n: 2 for n in costs}, costs) == macs * 2 * 8


def test_counting_leaves_no_state_behind():
    model = mmdrq.quantize_model(Small(), bits=[4, 2])
    model.train()
    layer_costs(model, torch.zeros(1, 4, 8, 8))
    assert model.training
    assert not model.grouped.act_quantizer.initialized.any()


class NewLayers(nn.Module):
    """A transposed conv, a DCNv2 and attention between FP ends."""

    def __init__(self):
        super().__init__()
        from mmcv.ops import ModulatedDeformConv2dPack
        self.first = nn.Conv2d(3, 8, 1)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2)
        self.dcn = ModulatedDeformConv2dPack(6, 4, 3, padding=1)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.last = nn.Linear(4, 2)

    def forward(self, x):
        y = self.dcn(self.up(self.first(x)))  # 3x3 -> 6x6
        tokens = y.flatten(2).transpose(1, 2)  # (N, 36, 4)
        memory = tokens[:, :10]
        out, _ = self.attn(query=tokens, key=memory, value=memory)
        return self.last(out)


def test_transposed_deformable_and_attention_macs():
    """Transposed conv: every input element scattered to out/groups x k x k
    outputs; DCN as a conv (its offset conv is a conv of its own);
    attention: the q, k, v projections of every token (out_proj is a
    layer of its own)."""
    model = mmdrq.quantize_model(NewLayers(), bits=[4, 2])
    costs = layer_costs(model, torch.zeros(2, 3, 3, 3))
    assert costs['up'] == dict(macs=9 * 8 * (6 // 2) * 4, params=8 * 3 * 4)
    assert costs['dcn'] == dict(macs=36 * 4 * 6 * 9, params=4 * 6 * 9)
    assert costs['dcn.conv_offset'] == dict(macs=36 * 27 * 6 * 9,
                                            params=27 * 6 * 9)
    assert costs['attn'] == dict(macs=(36 + 10 + 10) * 4 * 4, params=48)
    assert costs['attn.out_proj'] == dict(macs=36 * 4 * 4, params=16)


def test_weight_read_by_its_owner_counts_as_linear():
    """BEiT's attention runs ``F.linear(x, self.qkv.weight)`` without
    calling ``qkv``: its MACs are those of the linear layer all the same."""
    from mmpretrain.models.utils.attention import BEiTAttention
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), BEiTAttention(
        8, 2, window_size=None, use_rel_pos_bias=False, bias='qv_bias'))
    mmdrq.quantize_model(model, bits=[4, 2], skip_first_last=False)
    costs = layer_costs(model, torch.zeros(3, 5, 4))  # 5 tokens
    assert costs['1.qkv'] == dict(macs=5 * 24 * 8, params=24 * 8)
    assert costs['1.proj'] == dict(macs=5 * 8 * 8, params=8 * 8)
    assert costs['0'] == dict(macs=5 * 8 * 4, params=8 * 4)
    bits = {'0': 4, '1.qkv': 2, '1.proj': 4}
    assert bitops(bits, costs) == 5 * (8 * 4 * 16 + 24 * 8 * 4 + 8 * 8 * 16)
    assert model_size_bytes(bits, costs) == (32 * 4 + 192 * 2 + 64 * 4) / 8
