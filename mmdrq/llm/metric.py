"""Validation loss and perplexity of a language model."""
import math

from mmengine.evaluator import BaseMetric

from mmdrq.registry import METRICS


@METRICS.register_module()
class PerplexityMetric(BaseMetric):
    """Mean next-token cross-entropy over every predicted token (nats;
    ``lm/loss``) and its exponential (``lm/perplexity``), from the
    ``loss_sum`` and ``tokens`` of each sample ``CausalLM`` predicts."""
    default_prefix = 'lm'

    def process(self, data_batch, data_samples):
        self.results += [(s['loss_sum'], s['tokens']) for s in data_samples]

    def compute_metrics(self, results):
        loss = sum(r[0] for r in results) / sum(r[1] for r in results)
        return dict(loss=loss, perplexity=math.exp(loss))
