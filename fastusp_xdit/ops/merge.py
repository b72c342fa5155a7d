"""Merging partial attention results by their log-sum-exp, in fp32 (fp64 for fp64 inputs).

Given two attentions of the same queries over disjoint key sets, ``(o1, l1)`` and ``(o2, l2)``, the
attention over the union is ``o = o1 - sigmoid(l2 - l1) * (o1 - o2)`` with
``l = l1 - logsigmoid(l1 - l2)``: no exponent of an LSE is ever formed, so nothing overflows.
"""
from __future__ import annotations

import torch


def merge_into(acc: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, out_lse: torch.Tensor):
    """Merge ``(out, out_lse)`` into the running ``(acc, lse)``; returns the new pair.

    ``acc``/``out`` are (B, H, S, D) (any strides), ``lse``/``out_lse`` (B, H, S). ``acc`` and ``lse``
    must already be in the accumulation dtype; ``out`` is promoted element-wise.
    """
    diff = (out_lse - lse).unsqueeze(-1)
    acc = acc - torch.sigmoid(diff) * (acc - out.to(acc.dtype))
    lse = lse - torch.nn.functional.logsigmoid(lse - out_lse)
    return acc, lse


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]):
    """Attention over the union of key sets from per-set ``(out, lse)`` pairs; returns fp32 ``(out, lse)``."""
    acc_dtype = torch.promote_types(outs[0].dtype, torch.float32)
    acc, lse = outs[0].to(acc_dtype), lses[0].to(acc_dtype)
    for out, out_lse in zip(outs[1:], lses[1:]):
        acc, lse = merge_into(acc, lse, out, out_lse.to(acc_dtype))
    return acc, lse
