"""A transformers causal language model as an OpenMMLab model."""
from typing import Optional

import torch.nn.functional as F
from mmengine.model import BaseModel

from mmdrq.registry import MODELS


@MODELS.register_module()
class CausalLM(BaseModel):
    """A decoder LM built from a transformers config, no download
    (``AutoConfig.for_model(**config)``; a Llama by default), behind the
    ``forward(inputs, data_samples, mode)`` of every OpenMMLab model, so that
    mmdrq's wrapper, loops and tools run it as they run a classifier.

    ``inputs``: ``(batch, T + 1)`` token ids (``CharLMDataset``); the model
    reads the first ``T`` and predicts each next one. ``mode='loss'``: the
    mean cross-entropy (``loss_lm``); ``'predict'``: per sequence the summed
    cross-entropy and the token count (``PerplexityMetric``); ``'tensor'``:
    the logits.

    Args:
        config: ``transformers.AutoConfig.for_model`` keywords, with
            ``model_type`` (e.g. ``'llama'``).
    """

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

    def forward(self, inputs, data_samples=None, mode: str = 'tensor'):
        logits = self.lm(input_ids=inputs[:, :-1]).logits
        if mode == 'tensor':
            return logits
        targets = inputs[:, 1:]
        loss = F.cross_entropy(logits.flatten(0, 1).float(),
                               targets.flatten(), reduction='none')
        if mode == 'loss':
            return dict(loss_lm=loss.mean())
        if mode == 'predict':
            per_sequence = loss.view_as(targets).sum(1)
            return [dict(loss_sum=total.item(), tokens=targets.shape[1])
                    for total in per_sequence.detach()]
        raise ValueError(f"mode must be 'tensor', 'loss' or 'predict', got "
                         f'{mode!r}')
