"""Triton helpers shared by the 8-bit row codecs' kernels (:mod:`.fp8_triton`, :mod:`.int8_triton`).

Both formats' kernels read a strided input of up to 4 row dims (+ the row itself, stride given),
walk the rows in logical order and write a contiguous output, one program per ``block_rows`` rows.
Host side, the row dims are coalesced (size-1 dims dropped, mergeable dims merged) and padded with
size-1 inner dims, which Triton specializes to constants: k real row dims cost k - 1 integer divisions
per row (none for a contiguous input, one for the (S, B=1, H, D) view of a BHSD tensor). Strides
are passed in units of their largest common power-of-two factor (<= 16), a ``constexpr``, so loads
and stores vectorize even when a stride is not a multiple of 16 (e.g. the 132-byte encoded rows).
Imported only on a CUDA device's first codec call.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .rows import SCALE_BYTES

_ROW_DIMS = 4


@triton.jit
def row_offsets(rows, n1, n2, n3, s0, s1, s2, s3, UNIT: tl.constexpr):
    """Element offset of each logical row (int32 index math; size-1 dims fold away)."""
    i3 = rows % n3
    t = rows // n3
    i2 = t % n2
    t = t // n2
    i1 = t % n1
    i0 = t // n1
    off = i0.to(tl.int64) * s0 + i1.to(tl.int64) * s1 + i2.to(tl.int64) * s2 + i3.to(tl.int64) * s3
    return off * UNIT


@triton.jit
def _block(n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's row indices, their validity and the (row, column) mask."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    return rows, row_ok, row_ok[:, None] & (tl.arange(0, BLOCK_D) < D)[None, :]


@triton.jit
def load_rows(x_ptr, n_rows, n1, n2, n3, s0, s1, s2, s3, sd,
              UNIT: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's ``BLOCK_R`` logical rows of a strided input, as float32; their indices and masks."""
    rows, row_ok, mask = _block(n_rows, D, BLOCK_D, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    src = row_offsets(rows, n1, n2, n3, s0, s1, s2, s3, UNIT)
    x = tl.load(x_ptr + src[:, None] + cols[None, :] * sd, mask=mask, other=0.0).to(tl.float32)
    return x, rows, row_ok, mask


@triton.jit
def row_scale(x, QMAX: tl.constexpr, FLOOR: tl.constexpr, NAN_BITS: tl.constexpr, BLOCK_R: tl.constexpr):
    """Per row: ``QMAX / a`` (one ``div_rn``), the scale bits (``a / QMAX``, 0 for a zero row, NaN for a
    row with inf/nan) and that row's inf/nan flag. The absmax is taken on the bit patterns: their
    integer max is the float absmax, and values >= ``0x7F800000`` flag inf/nan without relying on a
    NaN-propagating float max."""
    amax_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
    bad = amax_bits >= 0x7F800000
    a = tl.maximum(amax_bits.to(tl.float32, bitcast=True), FLOOR)
    inv = tl.math.div_rn(tl.full([BLOCK_R], QMAX, tl.float32), a)
    scale = tl.where(amax_bits == 0, 0.0, tl.math.div_rn(a, tl.full([BLOCK_R], QMAX, tl.float32)))
    return inv, tl.where(bad, NAN_BITS, scale.to(tl.int32, bitcast=True)), bad


@triton.jit
def store_rows(out_ptr, rows, row_ok, mask, qb, sbits, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write encoded rows contiguously: the ``D`` value bytes, then the 4 little-endian scale bytes."""
    cols = tl.arange(0, BLOCK_D)
    dst = rows.to(tl.int64) * (D + 4)
    tl.store(out_ptr + dst[:, None] + cols[None, :], qb, mask=mask)
    j = tl.arange(0, 4)
    sbytes = ((sbits[:, None] >> (j[None, :] * 8)) & 0xFF).to(tl.uint8)
    tl.store(out_ptr + dst[:, None] + D + j[None, :], sbytes, mask=row_ok[:, None])


@triton.jit
def load_encoded(buf_ptr, n_rows, n1, n2, n3, s0, s1, s2, s3, sd,
                 UNIT: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's encoded rows of a (strided) byte buffer: value bytes, float32 scales, indices, mask."""
    rows, row_ok, mask = _block(n_rows, D, BLOCK_D, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    src = row_offsets(rows, n1, n2, n3, s0, s1, s2, s3, UNIT)
    qb = tl.load(buf_ptr + src[:, None] + cols[None, :] * sd, mask=mask, other=0)
    j = tl.arange(0, 4)
    sb = tl.load(buf_ptr + src[:, None] + (D + j[None, :]) * sd, mask=row_ok[:, None], other=0)
    sbits = tl.sum(sb.to(tl.uint32) << (j[None, :] * 8).to(tl.uint32), axis=1)
    return qb, sbits.to(tl.float32, bitcast=True), rows, mask


@triton.jit
def store_decoded(out_ptr, rows, mask, y, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write decoded float32 rows ``y`` contiguously in the output's dtype."""
    cols = tl.arange(0, BLOCK_D)
    dst = rows.to(tl.int64) * D
    tl.store(out_ptr + dst[:, None] + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def _row_layout(t: torch.Tensor) -> tuple[list[int], list[int], int]:
    """Coalesced row sizes and strides of ``t`` (last dim excluded), padded to 4 dims, and their unit."""
    dims: list[tuple[int, int]] = []
    for n, s in zip(t.shape[:-1], t.stride()[:-1]):
        if n == 1:
            continue
        if dims and dims[-1][1] == n * s:
            dims[-1] = (dims[-1][0] * n, s)
        else:
            dims.append((n, s))
    dims = dims + [(1, 0)] * (_ROW_DIMS - len(dims))  # size-1 dims innermost: their % and // fold away
    unit = 16
    for _, s in dims:
        unit = math.gcd(unit, s)
    return [n for n, _ in dims], [s // unit for _, s in dims], unit


def _launch(kernel, src: torch.Tensor, out: torch.Tensor, d: int, block_rows: int | None,
            num_warps: int | None) -> torch.Tensor:
    n_rows = out.numel() // out.shape[-1] if out.numel() else 0
    if n_rows == 0:
        return out
    if n_rows >= 2**31:
        raise ValueError(f"8-bit row codec: {n_rows} rows exceed the kernels' int32 row index: split the tensor")
    sizes, strides, unit = _row_layout(src)
    block_d = triton.next_power_of_2(d)
    block_r = block_rows or max(1, 4096 // block_d)
    grid = (triton.cdiv(n_rows, block_r),)
    args = (src, out, n_rows, sizes[1], sizes[2], sizes[3], *strides, src.stride(-1))
    meta = dict(UNIT=unit, D=d, BLOCK_D=block_d, BLOCK_R=block_r, num_warps=num_warps or 4)
    if src.is_cuda:
        with torch.cuda.device(src.device):  # Triton launches on the current device
            kernel[grid](*args, **meta)
    else:  # CPU tensors: only under TRITON_INTERPRET=1 (the benchmark's --interpret check)
        kernel[grid](*args, **meta)
    return out


def encode(kernel, x: torch.Tensor, out: torch.Tensor | None = None, block_rows: int | None = None,
           num_warps: int | None = None) -> torch.Tensor:
    """Run an encode ``kernel`` on a CUDA tensor (inputs, and ``out`` if given, already validated)."""
    d = x.shape[-1]
    if out is None:
        out = torch.empty(x.shape[:-1] + (d + SCALE_BYTES,), dtype=torch.uint8, device=x.device)
    return _launch(kernel, x, out, d, block_rows, num_warps)


def decode(kernel, buf: torch.Tensor, dtype: torch.dtype, block_rows: int | None = None,
           num_warps: int | None = None) -> torch.Tensor:
    """Run a decode ``kernel`` on a CUDA byte buffer (inputs already validated)."""
    d = buf.shape[-1] - SCALE_BYTES
    out = torch.empty(buf.shape[:-1] + (d,), dtype=dtype, device=buf.device)
    return _launch(kernel, buf, out, d, block_rows, num_warps)
