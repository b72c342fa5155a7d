"""Pack several tensors into one collective buffer and unpack them, each part through its wire codec.

A :class:`Part` is (codec, logical shape, dtype); a message is a list of parts. Sender and receiver
derive their lists from the same function of the call spec, and every size here comes from the
codecs' :meth:`~.codecs.Codec.nbytes`, so the two sides cannot disagree. With only raw parts the
buffer has the tensors' own dtype; otherwise it is bytes. Parts are encoded straight into one
preallocated buffer (the permute of a strided view happens in that single pass).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .codecs import Codec


class Part(NamedTuple):
    codec: Codec
    shape: tuple
    dtype: torch.dtype


def wire_dtype(parts: list) -> torch.dtype:
    """The buffer dtype of a message: the raw parts' dtype, or bytes once any part is encoded."""
    return torch.uint8 if any(p.codec.lossy for p in parts) else parts[0].dtype


def size(parts: list, wire: torch.dtype) -> int:
    """Elements of ``wire`` dtype a message takes."""
    return sum(p.codec.nbytes(p.shape, p.dtype) for p in parts) // wire.itemsize


def pack(tensors: list, parts: list, wire: torch.dtype) -> torch.Tensor:
    """``tensors`` (logical shapes as in ``parts``) -> one 1-D buffer of ``wire`` dtype, back to back."""
    buf = torch.empty(size(parts, wire), dtype=wire, device=tensors[0].device)
    start = 0
    for x, p in zip(tensors, parts):
        n = p.codec.nbytes(p.shape, p.dtype) // wire.itemsize
        p.codec.encode(x, buf[start:start + n])
        start += n
    return buf


def unpack(buf: torch.Tensor, parts: list) -> list:
    """The tensors of ``parts`` in buffer order (raw parts are views into ``buf``)."""
    out, start = [], 0
    for p in parts:
        n = p.codec.nbytes(p.shape, p.dtype) // buf.dtype.itemsize
        out.append(p.codec.decode(buf[start:start + n], p.shape, p.dtype))
        start += n
    return out
