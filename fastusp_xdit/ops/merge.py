"""Merging partial attention results by their log-sum-exp, with the math in fp32 (fp64 for fp64 inputs).

Given two attentions of the same queries over disjoint key sets, ``(o1, l1)`` and ``(o2, l2)``, the
attention over the union is ``o = o1 - sigmoid(l2 - l1) * (o1 - o2)`` with
``l = l1 - logsigmoid(l1 - l2)``: no exponent of an LSE is ever formed, so nothing overflows.

:func:`lse_merge` runs inside ``torch.ops.fastusp.lse_merge``, a ``torch.library`` custom op with a
fake implementation (``torch.compile(fullgraph=True)`` traces it, CUDA graphs capture it). On CUDA
(sm >= 8.0, float16/bfloat16/float32 outputs, float32 LSEs) it is one Triton kernel
(``merge_triton``, imported on first use) that reads each input once in its own dtype and writes the
requested output dtype; everywhere else, and as the reference, it is :func:`merge_torch`.
"""
from __future__ import annotations

import functools

import torch

from ..triton_gate import kernels_on

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _lse_dtype(a_lse: torch.Tensor, b_lse: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(a_lse.dtype, b_lse.dtype), torch.float32)


def merge_torch(a: torch.Tensor, a_lse: torch.Tensor, b: torch.Tensor, b_lse: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference merge in plain torch ops (any device); same contract as :func:`lse_merge`."""
    work = functools.reduce(torch.promote_types, (a.dtype, b.dtype, a_lse.dtype, b_lse.dtype), torch.float32)
    la, lb, x = a_lse.to(work), b_lse.to(work), a.to(work)
    out = torch.empty_like(a, dtype=dtype)
    out.copy_(x - torch.sigmoid((lb - la).unsqueeze(-1)) * (x - b.to(work)))
    lse = torch.empty_like(a_lse, dtype=_lse_dtype(a_lse, b_lse))
    lse.copy_(la - torch.nn.functional.logsigmoid(la - lb))
    return out, lse


def _triton_on(device_index: int) -> bool:
    """Whether the Triton kernels serve this CUDA device (needs triton and sm >= 8.0)."""
    return kernels_on("fastusp_xdit.ops.merge_triton", device_index, (8, 0), "LSE merge")


def _kernel_takes(a, a_lse, b, b_lse, dtype) -> bool:
    return (a.dim() <= 5 and a.dtype in _KERNEL_DTYPES and b.dtype in _KERNEL_DTYPES and dtype in _KERNEL_DTYPES
            and a_lse.dtype == b_lse.dtype == torch.float32
            and _triton_on(a.device.index if a.device.index is not None else torch.cuda.current_device()))


def _exact_strides() -> tuple:
    # Outputs take the memory order of the inputs: Inductor must hand the op the strides eager would.
    tag = getattr(torch.Tag, "needs_exact_strides", None)
    return (tag,) if tag is not None else ()


@torch.library.custom_op("fastusp::lse_merge", mutates_args=(), tags=_exact_strides())
def _merge_op(a: torch.Tensor, a_lse: torch.Tensor, b: torch.Tensor, b_lse: torch.Tensor,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return merge_torch(a, a_lse, b, b_lse, dtype)


@_merge_op.register_kernel("cuda")
def _(a, a_lse, b, b_lse, dtype):
    if _kernel_takes(a, a_lse, b, b_lse, dtype):
        from . import merge_triton

        return merge_triton.merge(a, a_lse, b, b_lse, dtype)
    return merge_torch(a, a_lse, b, b_lse, dtype)


@_merge_op.register_fake
def _(a, a_lse, b, b_lse, dtype):
    return torch.empty_like(a, dtype=dtype), torch.empty_like(a_lse, dtype=_lse_dtype(a_lse, b_lse))


def lse_merge(a: torch.Tensor, a_lse: torch.Tensor, b: torch.Tensor, b_lse: torch.Tensor,
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the partial results ``(a, a_lse)``, ``(b, b_lse)``.

    ``a``/``b``: (..., D) of the same shape, any float dtypes and strides; ``a_lse``/``b_lse``:
    ``a.shape[:-1]``, any strides. Returns new ``(out, lse)``: ``out`` of ``dtype`` (default
    ``promote(a, b, float32)``) in the memory order of ``a`` (token-major in, token-major out), ``lse``
    float32 (float64 for float64 LSEs) in the memory order of ``a_lse``. Use ``dtype=float32`` for a
    running accumulator and the output dtype for the last merge of a ring.
    """
    if a.shape != b.shape or a_lse.shape != a.shape[:-1] or b_lse.shape != a_lse.shape:
        raise ValueError(f"lse_merge: outputs {tuple(a.shape)}, {tuple(b.shape)} must have one shape and LSEs "
                         f"{tuple(a_lse.shape)}, {tuple(b_lse.shape)} that shape without its last dim")
    if dtype is None:
        dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return torch.ops.fastusp.lse_merge(a, a_lse, b, b_lse, dtype)


def merge_into(acc: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, out_lse: torch.Tensor):
    """Merge ``(out, out_lse)`` into the running ``(acc, lse)``; returns the new pair, ``acc`` in its dtype.

    ``acc``/``out`` are (B, H, S, D) (any strides), ``lse``/``out_lse`` (B, H, S).
    """
    return lse_merge(acc, lse, out, out_lse, acc.dtype)


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor]):
    """Attention over the union of key sets from per-set ``(out, lse)`` pairs; returns fp32 ``(out, lse)``
    (fp64 for fp64 inputs). Block 0 is read in its own dtype by the first merge, never copied."""
    acc_dtype = torch.promote_types(outs[0].dtype, torch.float32)
    if len(outs) == 1:
        return outs[0].to(acc_dtype), lses[0].to(torch.promote_types(lses[0].dtype, torch.float32))
    acc, lse = outs[0], lses[0]
    for out, out_lse in zip(outs[1:], lses[1:]):
        acc, lse = lse_merge(acc, lse, out, out_lse, acc_dtype)
    return acc, lse
