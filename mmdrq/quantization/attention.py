"""The quantized form of nn.MultiheadAttention (packed q/k/v weight)."""
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .layers import build_in_scope
from .weight_layers import SwappedWeightLayer


class MultiheadAttentionLayer(SwappedWeightLayer):
    """nn.MultiheadAttention with a packed ``in_proj_weight`` (what mmcv,
    mmdet, mmseg and mmpretrain build): the q, k and v projections share the
    weight quantizer (one scale per row, so per projection and output
    channel) and each reads its input through its own act quantizer, as
    three Linear layers would; ``out_proj`` is a QLinear of its own, called
    here on the attention output (``F.multi_head_attention_forward`` reads
    ``out_proj.weight`` and would skip its input quantizer).

    The attention products (q k^T, softmax v) stay FP unless
    ``quantize_matmuls`` (``attention_matmuls=True`` in the config) gives
    their inputs act quantizers: the paper quantizes conv and linear layers.
    """
    weight_name = 'in_proj_weight'
    MATMUL_QUANTIZERS = ('q_matmul_quantizer', 'k_matmul_quantizer',
                         'softmax_quantizer', 'v_matmul_quantizer')

    @classmethod
    def unsupported_reason(cls, module):
        if not module._qkv_same_embed_dim:
            return ('separate q/k/v projection weights (kdim/vdim != '
                    'embed_dim) are not supported')
        return None

    def macs(self, args: tuple, kwargs: dict, out) -> int:
        """Its q, k and v projections (out_proj is a layer of its own)."""
        inputs = [args[i] if i < len(args) else kwargs[n]
                  for i, n in enumerate(('query', 'key', 'value'))]
        query = inputs[0]
        batch = 1 if query.dim() < 3 else \
            query.shape[0 if self.batch_first else 1]
        rows = sum(t.numel() // self.embed_dim for t in inputs)
        return rows * self.embed_dim * self.float_weight[0].numel() // batch

    def _setup(self, bits, weight_quantizer, act_quantizer):
        super()._setup(bits, weight_quantizer, act_quantizer)
        for name in ('key_act_quantizer', 'value_act_quantizer'):
            setattr(self, name, None if act_quantizer is None else
                    build_in_scope(dict(act_quantizer, bits=self.bits)))

    def quantize_matmuls(self, act_quantizer: Optional[dict]):
        """Quantize the inputs of q k^T and softmax(.) v at the layer's bit
        too, each with its own per-bit scale (no-op without act
        quantizers)."""
        with torch.device(self.float_weight.device):
            for name in self.MATMUL_QUANTIZERS:
                setattr(self, name, None if act_quantizer is None else
                        build_in_scope(dict(act_quantizer, bits=self.bits)))

    def _matmul_quantizer(self, name):
        return getattr(self, name, None)

    def _quantize(self, quantizer, x):
        return x if quantizer is None else quantizer(x, self.bit)

    def forward(self, query, key, value, key_padding_mask=None,
                need_weights=True, attn_mask=None, average_attn_weights=True,
                is_causal=False):
        if is_causal and attn_mask is None:
            raise RuntimeError('Need attn_mask if specifying the is_causal '
                               'hint (as nn.MultiheadAttention)')
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1)
                                 for t in (query, key, value))
        out, weights = self._attention(
            self._quantize(self.act_quantizer, query),
            self._quantize(self.key_act_quantizer, key),
            self._quantize(self.value_act_quantizer, value),
            _additive_mask(key_padding_mask, query.dtype),
            _additive_mask(attn_mask, query.dtype), need_weights)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out.squeeze(1), \
                None if weights is None else weights.squeeze(0)
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _in_projection(self, query, key, value):
        """q, k, v: the quantized packed weight's three row blocks (the
        ONNX export's stand-in runs them as three named linears)."""
        biases = (None, ) * 3 if self.in_proj_bias is None else \
            self.in_proj_bias.chunk(3)
        return (F.linear(x, w, b) for x, w, b in zip(
            (query, key, value), self.quantized_weight().chunk(3), biases))

    def _attention(self, query, key, value, key_padding_mask, attn_mask,
                   need_weights):
        """``F.multi_head_attention_forward``'s math on (L, N, E) inputs
        with additive masks; weights per head (N, H, L, S) or None."""
        length, batch, embed = query.shape
        heads = self.num_heads
        head_dim = embed // heads
        q, k, v = self._in_projection(query, key, value)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, batch, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, batch, 1)])
            attn_mask, key_padding_mask = (
                None if m is None else F.pad(m, (0, 1))
                for m in (attn_mask, key_padding_mask))
        q, k, v = (t.reshape(t.shape[0], batch * heads, head_dim)
                   .transpose(0, 1) for t in (q, k, v))
        if self.add_zero_attn:
            zeros = k.new_zeros(batch * heads, 1, head_dim)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask, key_padding_mask = (
                None if m is None else F.pad(m, (0, 1))
                for m in (attn_mask, key_padding_mask))
        source = k.shape[1]
        mask = None if attn_mask is None else \
            attn_mask.reshape(-1, length, source)
        if key_padding_mask is not None:
            padding = key_padding_mask.reshape(batch, 1, 1, source).expand(
                -1, heads, -1, -1).reshape(batch * heads, 1, source)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        quantize = [self._matmul_quantizer(n) for n in self.MATMUL_QUANTIZERS]
        if need_weights or any(quantize):
            q_quantizer, k_quantizer, softmax_quantizer, v_quantizer = quantize
            q = self._quantize(q_quantizer, q * math.sqrt(1.0 / head_dim))
            k = self._quantize(k_quantizer, k)
            scores = torch.bmm(q, k.transpose(1, 2)) if mask is None else \
                torch.baddbmm(mask, q, k.transpose(1, 2))
            weights = F.softmax(scores, dim=-1)
            if dropout > 0:
                weights = F.dropout(weights, p=dropout)
            out = torch.bmm(self._quantize(softmax_quantizer, weights),
                            self._quantize(v_quantizer, v))
            weights = weights.view(batch, heads, length, source)
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout)
            weights = None
        # (N, L, E) into out_proj: its MACs count per image (dim 0)
        out = out.view(batch, heads, length, head_dim).permute(0, 2, 1, 3) \
            .reshape(batch, length, embed)
        return self.out_proj(out).transpose(0, 1), weights


def _additive_mask(mask, dtype):
    """A boolean mask (True: not attended) as 0 / -inf; a float one as is."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype,
                       device=mask.device).masked_fill_(mask, float('-inf'))
