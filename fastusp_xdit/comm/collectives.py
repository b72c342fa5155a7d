"""Traceable collectives FastUSP is built from: torch functional collectives only.

``torch.distributed._functional_collectives`` returns tensors whose wait happens at first use, so
eager code overlaps them with later work and ``torch.compile(fullgraph=True)`` traces them (unlike
``dist.batch_isend_irecv``, which dynamo refuses). Split sizes are Python ints derived from global
shapes, identical on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as ft_c

# gloo rejects float8 tensors and old NCCL builds do too: collectives carry them as bytes.
_BYTE_VIEW = {torch.float8_e4m3fn, torch.float8_e5m2}


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """``all_to_all_single`` along dim 0 with explicit (possibly uneven or zero) split sizes."""
    if x.dtype in _BYTE_VIEW:
        return all_to_all(x.view(torch.uint8), out_splits, in_splits, group).view(x.dtype)
    return ft_c.all_to_all_single(x.contiguous(), out_splits, in_splits, group)


def ring_shift(x: torch.Tensor, recv_rows: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Send ``x`` to the next rank of ``group`` and return the ``recv_rows`` rows the previous one sent."""
    size, rank = group.size(), group.rank()
    in_splits, out_splits = [0] * size, [0] * size
    in_splits[(rank + 1) % size] = x.shape[0]
    out_splits[(rank - 1) % size] = recv_rows
    return all_to_all(x, out_splits, in_splits, group)
