"""Per-layer stochastic bit switching for mixed-precision SuperNet training
(docs/method.md, HASB).

Inside each forward of the multi-precision loop (global bit b), every layer
keeps b with probability 1 - sigma_t, or draws a bit from its own
distribution: ``b / sum(B)`` for Hessian-sensitive layers (HASB), uniform for
the others. The draws come from a generator reseeded per (iteration, bit),
so every DDP rank and a resumed run draw the same bits.
"""
from typing import Dict, Sequence

import torch
from torch import nn

from .bit_control import set_bits, set_layer_bits


class BitSampler:
    """Draws per-layer bits.

    Args:
        probabilities: layer name -> probabilities over ``bits`` (same
            order), each summing to 1.
        bits: the model's bit-widths, highest first.
        seed: base seed of the draws.
    """

    def __init__(self, probabilities: Dict[str, Sequence[float]],
                 bits: Sequence[int], seed: int = 0):
        self.names = list(probabilities)
        self.bits = tuple(bits)
        table = torch.tensor([list(probabilities[n]) for n in self.names],
                             dtype=torch.float64)
        if table.shape[1] != len(self.bits) or \
                not torch.allclose(table.sum(1), torch.ones(len(table),
                                                            dtype=table.dtype)):
            raise ValueError('each layer needs one probability per bit of '
                             f'{list(self.bits)}, summing to 1')
        self.table = table
        self.seed = seed
        self.sigma = 0.0
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, iteration: int):
        """Same draws for the same iteration on every rank and on resume."""
        self.generator.manual_seed(self.seed * 1_000_003 + iteration)

    def draw(self, bit: int) -> Dict[str, int]:
        """Per-layer bits for one forward at global bit ``bit``."""
        switch = torch.rand(len(self.names), generator=self.generator,
                            dtype=torch.float64) < self.sigma
        picks = torch.multinomial(self.table, 1, replacement=True,
                                  generator=self.generator).squeeze(1)
        return {name: (self.bits[int(pick)] if flip else bit)
                for name, flip, pick in zip(self.names, switch.tolist(),
                                            picks.tolist())}

    def apply(self, model: nn.Module, bit: int) -> float:
        """Set ``model`` to ``bit`` with this forward's per-layer draws;
        returns the realised average bit."""
        set_bits(model, bit)
        if self.sigma <= 0:
            return float(bit)
        layer_bits = self.draw(bit)
        set_layer_bits(model, layer_bits)
        return sum(layer_bits.values()) / len(layer_bits)


def hasb_probabilities(traces: Dict[str, float], bits: Sequence[int]):
    """Layers with trace >= mean are sensitive: bit b has probability
    b / sum(B) (8: 0.4, 6: 0.3, 4: 0.2, 2: 0.1); the others are uniform."""
    mean = sum(traces.values()) / len(traces)
    total = float(sum(bits))
    sensitive = [b / total for b in bits]
    uniform = [1.0 / len(bits)] * len(bits)
    return {name: (sensitive if value >= mean else uniform)
            for name, value in traces.items()}
