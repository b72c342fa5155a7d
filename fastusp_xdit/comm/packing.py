"""Pack several tensors into one all-to-all buffer and unpack them, each part raw or FP8-encoded.

A *part* is a tensor whose last dim is a row (head_dim). With no FP8 part the buffer has the
tensors' own dtype; with any FP8 part it is bytes: FP8 parts as :func:`fp8_encode` rows (D + 4
bytes), raw parts as their bytes. Parts are written straight into one preallocated buffer (the
permute of a strided view happens in that single copy), so packing is one pass over the data.
"""
from __future__ import annotations

import math

import torch

from .fp8 import encoded_row_bytes, fp8_decode, fp8_encode


def wire_dtype(dtype: torch.dtype, any_fp8: bool) -> torch.dtype:
    return torch.uint8 if any_fp8 else dtype


def part_size(shape, dtype: torch.dtype, fp8: bool, wire: torch.dtype) -> int:
    """Elements of ``wire`` dtype one part of logical ``shape`` takes in the buffer."""
    rows, d = math.prod(shape[:-1]), shape[-1]
    if wire != torch.uint8:
        return rows * d
    return rows * (encoded_row_bytes(d) if fp8 else d * dtype.itemsize)


def _slot(seg: torch.Tensor, shape, dtype: torch.dtype, fp8: bool) -> torch.Tensor:
    """View a buffer segment as the stored form of a part: encoded rows, or the raw tensor."""
    if fp8:
        return seg.view(*shape[:-1], encoded_row_bytes(shape[-1]))
    return (seg.view(dtype) if seg.dtype != dtype else seg).view(shape)


def pack(parts: list, wire: torch.dtype) -> torch.Tensor:
    """``parts`` = [(tensor, fp8)] -> one 1-D buffer of ``wire`` dtype, parts back to back."""
    sizes = [part_size(x.shape, x.dtype, fp8, wire) for x, fp8 in parts]
    buf = torch.empty(sum(sizes), dtype=wire, device=parts[0][0].device)
    start = 0
    for (x, fp8), n in zip(parts, sizes):
        slot = _slot(buf[start:start + n], x.shape, x.dtype, fp8)
        if fp8:
            fp8_encode(x, out=slot)  # encodes straight into the send buffer
        else:
            slot.copy_(x)
        start += n
    return buf


def unpack(buf: torch.Tensor, specs: list, dtype: torch.dtype) -> list:
    """``specs`` = [(shape, fp8[, raw dtype])] in buffer order -> tensors of ``dtype`` (FP8 parts
    decoded) or of the part's raw dtype (default ``dtype``; raw parts are views into ``buf``)."""
    out, start = [], 0
    for shape, fp8, *raw in specs:
        part_dtype = raw[0] if raw else dtype
        n = part_size(shape, part_dtype, fp8, buf.dtype)
        slot = _slot(buf[start:start + n], shape, part_dtype, fp8)
        out.append(fp8_decode(slot, dtype) if fp8 else slot)
        start += n
    return out
