"""Masks as packed bits: 1 bit per entry, most significant bit first (like numpy.packbits)."""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor

from prunekit.errors import PrunekitError

_SHIFTS = tuple(range(7, -1, -1))  # MSB first, like numpy.packbits


_PACK_MAGIC = -0x7FBFDFEFF7FBFDFF  # 0x8040201008040201 as a signed int64 (wraps like uint64)


# ----------------------------------------------------------------------------- bits
def pack_bits(mask: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """Pack a boolean tensor (any shape, flattened row-major) into uint8, MSB first.

    The output has ``ceil(numel / 8)`` bytes; the padding bits of the last byte are 0.
    Bit-compatible with ``numpy.packbits``. ``out`` (uint8, that many bytes) receives
    the result without a temporary.
    """
    flat = mask.reshape(-1)
    flat = flat.to(torch.uint8) if flat.dtype != torch.bool else flat.view(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if flat.is_contiguous() and flat.device.type == "cpu" and sys.byteorder == "little":
        # one multiply per 8 entries: byte i (value 0/1) of the little-endian int64 lands on
        # bit 63 - i, and no two partial products share a bit, so nothing carries
        word = flat.view(torch.int64) * _PACK_MAGIC
        word >>= 56
        word &= 0xFF
        return word.to(torch.uint8) if out is None else out.copy_(word)
    groups = flat.view(-1, 8)
    res = groups[:, 0] << 7
    for i in range(1, 8):
        res |= groups[:, i] << (7 - i)
    return res if out is None else out.copy_(res)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: a flat bool tensor of ``numel`` entries."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise PrunekitError(f"packed bits must be a 1-D uint8 tensor, got {packed.dtype} with shape {tuple(packed.shape)}")
    if numel < 0 or packed.numel() != (numel + 7) // 8:
        raise PrunekitError(f"{packed.numel()} packed bytes cannot hold exactly {numel} bits (need {(numel + 7) // 8})")
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device)
    bits = packed.unsqueeze(1) >> shifts
    bits &= 1  # in place: one byte-per-entry temporary, viewed (not copied) as bool
    return bits.reshape(-1)[:numel].view(torch.bool)
