"""Blocks of a character corpus as training and validation samples."""
import os.path as osp

import numpy as np
import torch
from torch.utils.data import Dataset

from mmdrq.registry import DATASETS
from mmdrq.utils.checks import check_choice, check_int
from .corpus import read_vocab


@DATASETS.register_module()
class CharLMDataset(Dataset):
    """``block_size + 1`` character ids per sample (``inputs``): the model
    reads the first ``block_size`` and predicts each next one.

    Args:
        data_root: a corpus folder (``write_char_corpus``).
        split: ``train`` or ``val``.
        block_size: characters the model reads per sample.
        num_samples: ``train`` only: blocks at offsets drawn once with
            ``seed`` (an epoch is reproducible); ``val`` covers its text with
            consecutive blocks, each character predicted once.
        seed: seed of the training offsets.
        vocab_size: the model's vocabulary; a corpus with more characters
            is refused.
    """

    def __init__(self, data_root: str, split: str = 'train',
                 block_size: int = 128, num_samples: int = 1024,
                 seed: int = 0, vocab_size: int = None):
        check_choice('split', split, ('train', 'val'))
        check_int('block_size', block_size, minimum=1)
        check_int('num_samples', num_samples, minimum=1)
        vocab = read_vocab(data_root)
        if vocab_size is not None and len(vocab) > vocab_size:
            raise ValueError(f'the corpus in {data_root!r} has {len(vocab)} '
                             f'characters, more than the model\'s '
                             f'vocab_size={vocab_size}')
        with open(osp.join(data_root, f'{split}.txt'), encoding='utf-8') as f:
            text = f.read()
        index = {c: i for i, c in enumerate(vocab)}
        self.ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        if len(self.ids) <= block_size:
            raise ValueError(f'block_size={block_size} needs a text longer '
                             f'than its {len(self.ids)} characters ({split})')
        self.block_size = block_size
        if split == 'train':
            rng = np.random.default_rng(seed)
            self.starts = rng.integers(0, len(self.ids) - block_size,
                                       num_samples).tolist()
        else:
            self.starts = list(range(0, len(self.ids) - block_size,
                                     block_size))
        self.metainfo = dict(vocab=vocab)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, index):
        start = self.starts[index]
        return dict(inputs=self.ids[start:start + self.block_size + 1])
