"""A transformers causal language model as an OpenMMLab model."""
from typing import Optional

import torch
import torch.nn.functional as F
from mmengine.model import BaseModel

from mmdrq.registry import MODELS


@MODELS.register_module()
class CausalLM(BaseModel):
    """A decoder LM built from a transformers config, no download
    (``AutoConfig.for_model(**config)``; a Llama by default), behind the
    ``forward(inputs, data_samples, mode)`` of every OpenMMLab model, so that
    mmdrq's wrapper, loops and tools run it as they run a classifier.

    ``inputs``: ``(batch, T + 1)`` token ids (``CharLMDataset``) for
    ``mode='loss'`` (the mean cross-entropy, ``loss_lm``) and ``'predict'``
    (per sequence the summed cross-entropy and the token count,
    ``PerplexityMetric``): the model reads the first ``T`` and predicts each
    next one. ``'tensor'``: the logits after every token of ``inputs``
    (what generation and the exported graph compute).

    Args:
        config: ``transformers.AutoConfig.for_model`` keywords, with
            ``model_type`` (e.g. ``'llama'``).
    """

    # the exporter's example inputs are token ids, batch and length dynamic
    export_inputs = 'token_ids'

    def __init__(self, config: dict, data_preprocessor: Optional[dict] = None,
                 init_cfg: Optional[dict] = None):
        from transformers import AutoConfig, AutoModelForCausalLM
        super().__init__(
            data_preprocessor=data_preprocessor or dict(
                type='BaseDataPreprocessor'), init_cfg=init_cfg)
        config = dict(config)
        if 'model_type' not in config:
            raise ValueError(f'CausalLM config needs model_type (e.g. '
                             f"'llama'), got keys {sorted(config)}")
        # eager attention: the plain matmul + softmax every exporter and
        # activation quantizer sees as such
        config.setdefault('attn_implementation', 'eager')
        self.lm = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(**config))

    @property
    def vocab_size(self) -> int:
        return self.lm.config.vocab_size

    @property
    def cache_shape(self) -> tuple:
        """(layers, key-value heads, head size): the key-value cache is
        ``(layers, batch, heads, past, head size)``."""
        config = self.lm.config
        head = getattr(config, 'head_dim', None) or \
            config.hidden_size // config.num_attention_heads
        return (config.num_hidden_layers, config.num_key_value_heads, head)

    def cached_forward(self, inputs, past_keys, past_values):
        """(logits after each of ``inputs``, keys, values): one decoder
        step reading the cache of the ``past`` tokens before ``inputs``
        (``past`` may be 0) and returning it grown by them; the graph the
        export holds, so a deployed model generates without running the
        whole window again."""
        from transformers import DynamicCache
        cache = DynamicCache()
        for layer in range(past_keys.shape[0]):
            cache.update(past_keys[layer], past_values[layer], layer)
        positions = torch.arange(inputs.shape[1], device=inputs.device) + \
            past_keys.shape[3]
        logits = self.lm(input_ids=inputs, past_key_values=cache,
                         position_ids=positions[None],
                         cache_position=positions, use_cache=True).logits
        layers = range(past_keys.shape[0])
        return (logits, torch.stack([cache.key_cache[i] for i in layers]),
                torch.stack([cache.value_cache[i] for i in layers]))

    def forward(self, inputs, data_samples=None, mode: str = 'tensor'):
        if mode == 'tensor':
            return self.lm(input_ids=inputs).logits
        logits = self.lm(input_ids=inputs[:, :-1]).logits
        if mode == 'loss':
            return dict(loss_lm=next_token_losses(logits, inputs).mean())
        if mode == 'predict':
            return self.predictions(logits, inputs)
        raise ValueError(f"mode must be 'tensor', 'loss' or 'predict', got "
                         f'{mode!r}')

    @staticmethod
    def predictions(logits, inputs) -> list:
        """``PerplexityMetric``'s entries from the logits of ``inputs[:,
        :-1]`` (PyTorch's or an ONNX session's): per sequence the summed
        cross-entropy of the next tokens and their count."""
        per_sequence = next_token_losses(logits, inputs).sum(1)
        return [dict(loss_sum=total.item(), tokens=inputs.shape[1] - 1)
                for total in per_sequence.detach()]


def next_token_losses(logits, inputs):
    """``(batch, T)`` cross-entropy of each next token ``inputs[:, 1:]``
    under ``logits`` of ``inputs[:, :-1]``."""
    targets = inputs[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                           reduction='none').view_as(targets)
