"""Calibration batches and the loss measured on them, shared by the Hessian
traces and the measured sensitivities: both take an OpenMMLab model's own
loss more than once on the same first images of a dataloader."""
import contextlib
from typing import Iterable

import torch
from mmengine.dataset import InfiniteSampler
from torch import nn


def model_loss(model: nn.Module, data) -> torch.Tensor:
    """An OpenMMLab model's own total loss on preprocessed ``data``."""
    return model.parse_losses(model._run_forward(data, mode='loss'))[0]


@contextlib.contextmanager
def without_batch_augments(preprocessor: nn.Module):
    """The preprocessor's batch augments (Mixup, CutMix, batch resizing) off
    in the block: a loss taken more than once on a batch (finite
    differences, one pass per bit setting) must see the same images."""
    augments = getattr(preprocessor, 'batch_augments', None)
    if augments is not None:
        preprocessor.batch_augments = None
    try:
        yield
    finally:
        if augments is not None:
            preprocessor.batch_augments = augments


class FirstSamples:
    """Batches of ``loader`` until ``num_samples`` images (whole batches)."""

    def __init__(self, loader: Iterable, num_samples: int):
        self.loader, self.num_samples = loader, num_samples

    def __len__(self):
        size = getattr(self.loader, 'batch_size', None)
        if not size:
            raise TypeError('unknown batch size')
        batches = -(-self.num_samples // size)
        if isinstance(getattr(self.loader, 'sampler', None), InfiniteSampler):
            return batches  # iteration-based configs' loaders never end
        return min(len(self.loader), batches)

    def __iter__(self):
        seen = 0
        for batch in self.loader:
            yield batch
            seen += len(batch['inputs'])
            if seen >= self.num_samples:
                return
