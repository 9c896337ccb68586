"""Pack signed integers into the smallest storage dtype of their bit-width."""
import torch


def storage_of(bit: int) -> str:
    """Storage format of ``bit``-bit signed integers."""
    if bit <= 4:
        return 'int4x2'
    if bit <= 8:
        return 'int8'
    return 'int16'


def pack(q: torch.Tensor, bit: int) -> torch.Tensor:
    """Flatten signed integers of ``bit`` bits into their storage tensor.

    ``int4x2`` stores two two's-complement nibbles per uint8 (element 2i in
    the low nibble); an odd count is padded with a zero nibble.
    """
    fmt = storage_of(bit)
    flat = q.reshape(-1)
    if fmt == 'int8':
        return flat.to(torch.int8)
    if fmt == 'int16':
        return flat.to(torch.int16)
    nibbles = (flat.to(torch.int16) & 0xF).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack(data: torch.Tensor, bit: int, shape) -> torch.Tensor:
    """Inverse of ``pack``: int32 tensor of ``shape``."""
    numel = 1
    for s in shape:
        numel *= int(s)
    if storage_of(bit) != 'int4x2':
        return data.to(torch.int32)[:numel].reshape(shape)
    low = (data & 0xF).to(torch.int32)
    high = (data >> 4).to(torch.int32)
    nibbles = torch.stack([low, high], dim=1).reshape(-1)[:numel]
    values = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return values.reshape(shape)
