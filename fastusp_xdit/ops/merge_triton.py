"""Triton kernel of the LSE merge (formulas and contract: ``fastusp_xdit.ops.merge``).

Imported by ``merge`` on the first CUDA call only, never at package import. One kernel merges two
partial attention results ``(a, la)`` and ``(b, lb)`` over disjoint key sets into a new output of any
float dtype and a new float32 LSE, reading each input once and doing the math in float32 per element:

    w = sigmoid(lb - la);   out = a + w * (b - a);   lse = max(la, lb) + log(1 + exp(-|la - lb|))

so the first merge of a ring reads block 0 in its own dtype (no float32 copy first) and the last one
writes the output dtype (no separate cast pass). Rows (all dims but the last, up to 4) are walked in
the memory order of ``a``, so the big tensors stream; the LSE tensors may have any strides (the
(S, B, H) view of a (B, H, S) LSE is read and written in place). Host side, the row dims are ordered
by ``a``'s strides, size-1 dims dropped, dims mergeable in every tensor merged and the rest padded
with size-1 dims, which Triton specializes to constants (the token-major ring layout with B = 1 costs
one integer division per row). Offsets are int64; one program handles ``block_rows`` rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_ROW_DIMS = 4


@triton.jit
def _offset(i0, i1, i2, i3, s0, s1, s2, s3):
    return i0.to(tl.int64) * s0 + i1.to(tl.int64) * s1 + i2.to(tl.int64) * s2 + i3.to(tl.int64) * s3


@triton.jit
def _merge_kernel(a_ptr, b_ptr, o_ptr, la_ptr, lb_ptr, lo_ptr, n_rows, n1, n2, n3,
                  a0, a1, a2, a3, ad, b0, b1, b2, b3, bd, o0, o1, o2, o3, od,
                  la0, la1, la2, la3, lb0, lb1, lb2, lb3, lo0, lo1, lo2, lo3,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    i3 = rows % n3
    t = rows // n3
    i2 = t % n2
    t = t // n2
    i1 = t % n1
    i0 = t // n1

    la = tl.load(la_ptr + _offset(i0, i1, i2, i3, la0, la1, la2, la3), mask=row_ok, other=0.0).to(tl.float32)
    lb = tl.load(lb_ptr + _offset(i0, i1, i2, i3, lb0, lb1, lb2, lb3), mask=row_ok, other=0.0).to(tl.float32)
    diff = lb - la
    w = tl.sigmoid(diff)
    lse = tl.maximum(la, lb) + tl.log(1.0 + tl.exp(-tl.abs(diff)))
    tl.store(lo_ptr + _offset(i0, i1, i2, i3, lo0, lo1, lo2, lo3), lse, mask=row_ok)

    cols = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (cols < D)[None, :]
    a_off = _offset(i0, i1, i2, i3, a0, a1, a2, a3)[:, None] + cols[None, :] * ad
    b_off = _offset(i0, i1, i2, i3, b0, b1, b2, b3)[:, None] + cols[None, :] * bd
    o_off = _offset(i0, i1, i2, i3, o0, o1, o2, o3)[:, None] + cols[None, :] * od
    a = tl.load(a_ptr + a_off, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + b_off, mask=mask, other=0.0).to(tl.float32)
    out = a + w[:, None] * (b - a)
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=mask)


def _row_dims(tensors: list[torch.Tensor]) -> tuple[list[int], list[list[int]]]:
    """Row sizes (outermost first, padded to 4) and each tensor's row strides, in the memory order of
    ``tensors[0]``; size-1 dims dropped, dims mergeable in every tensor merged."""
    shape = tensors[0].shape[:-1]
    order = sorted((i for i, n in enumerate(shape) if n != 1), key=lambda i: -tensors[0].stride(i))
    dims: list[tuple[int, list[int]]] = []
    for i in order:
        strides = [t.stride(i) for t in tensors]
        if dims and all(p == shape[i] * s for p, s in zip(dims[-1][1], strides)):
            dims[-1] = (dims[-1][0] * shape[i], strides)
        else:
            dims.append((shape[i], strides))
    if len(dims) > _ROW_DIMS:
        raise ValueError(f"LSE merge kernel: at most {_ROW_DIMS} row dims, got shape {tuple(tensors[0].shape)}: "
                         "reshape the inputs")
    dims += [(1, [0] * len(tensors))] * (_ROW_DIMS - len(dims))
    return [n for n, _ in dims], [[s[j] for _, s in dims] for j in range(len(tensors))]


def merge(a: torch.Tensor, la: torch.Tensor, b: torch.Tensor, lb: torch.Tensor, dtype: torch.dtype,
          block_rows: int | None = None, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge.lse_merge`` on CUDA tensors (inputs already validated: same shapes, float16/bfloat16/float32
    outputs, float32 LSEs, at most 5 dims); ``block_rows`` (rounded up to a power of 2) and
    ``num_warps`` override the launch shape."""
    out = torch.empty_like(a, dtype=dtype)
    lse = torch.empty_like(la, dtype=torch.float32)
    n_rows = la.numel()
    if n_rows == 0:
        return out, lse
    if n_rows >= 2**31:
        raise ValueError(f"LSE merge kernel: {n_rows} rows exceed its int32 row index: split the tensors")
    d = a.shape[-1]
    (_, n1, n2, n3), strides = _row_dims([a, b, out, la, lb, lse])
    block_d = triton.next_power_of_2(d)
    block_r = triton.next_power_of_2(block_rows or max(1, 4096 // block_d))
    grid = (triton.cdiv(n_rows, block_r),)
    args = [a, b, out, la, lb, lse, n_rows, n1, n2, n3]
    for t, s in zip((a, b, out), strides[:3]):
        args += [*s, t.stride(-1)]
    for s in strides[3:]:
        args += s
    meta = dict(D=d, BLOCK_D=block_d, BLOCK_R=block_r, num_warps=num_warps or 4)
    if a.is_cuda:
        with torch.cuda.device(a.device):  # Triton launches on the current device
            _merge_kernel[grid](*args, **meta)
    else:  # CPU tensors: only under TRITON_INTERPRET=1 (tests/test_merge_kernels.py)
        _merge_kernel[grid](*args, **meta)
    return out, lse
