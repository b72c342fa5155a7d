"""Triton kernels of the INT8 row codec (format and formulas: ``fastusp_xdit.comm.int8``).

Imported by ``int8`` on the first CUDA call only; never at package import. The row walk, the host-side
layout coalescing and the launch are :mod:`.rows_triton`'s:
both kernels read a strided input of up to 4 row dims, walk the rows in logical order and write a
contiguous output, one program per ``block_rows`` rows. Only the per-value math differs from e4m3:

* encode: absmax on the bit patterns (as e4m3: values >= ``0x7F800000`` flag inf/nan), ``127 / a`` and
  ``a / 127`` with ``div_rn``, the product rounded once, clamped, then :func:`_rint` (exact
  round-half-to-even, see there), stored as int8 bytes and the 4 scale bytes;
* decode: int8 bytes to float32, times the scale, cast, store.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

from . import rows_triton
from .int8 import INT8_MAX
from .rows import AMAX_FLOOR, NAN_SCALE_BITS, SCALE_BYTES

_MAX = tl.constexpr(INT8_MAX)
_FLOOR = tl.constexpr(AMAX_FLOOR)
_NAN_BITS = tl.constexpr(NAN_SCALE_BITS)
_SB = tl.constexpr(SCALE_BYTES)


@triton.jit
def _rint(v):
    """Round float32 ``v`` (finite, |v| < 2**31) to the nearest integer, ties to even, as int32.

    Exact by construction: the truncation (``cvt.rzi``), ``v - trunc(v)`` (exact: same sign, no
    more bits) and the comparisons round nothing, and there is no multiply-add for the compiler to
    contract. ``libdevice.rint`` (``cvt.rni``) would be one instruction on the GPU, but Triton's
    interpreter cannot run extern functions, and this form is exact on both.
    """
    t = v.to(tl.int32)
    f = tl.abs(v - t.to(tl.float32))
    up = (f > 0.5) | ((f == 0.5) & ((t & 1) != 0))
    return tl.where(up, tl.where(v < 0, t - 1, t + 1), t)


@triton.jit
def _encode_kernel(x_ptr, out_ptr, n_rows, n1, n2, n3, s0, s1, s2, s3, sd,
                   UNIT: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (cols < D)[None, :]
    src = rows_triton.row_offsets(rows, n1, n2, n3, s0, s1, s2, s3, UNIT)
    x = tl.load(x_ptr + src[:, None] + cols[None, :] * sd, mask=mask, other=0.0).to(tl.float32)

    amax_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
    bad = amax_bits >= 0x7F800000
    a = tl.maximum(amax_bits.to(tl.float32, bitcast=True), _FLOOR)
    inv = tl.math.div_rn(tl.full([BLOCK_R], _MAX, tl.float32), a)
    scaled = tl.where(bad[:, None], 0.0, x * inv[:, None])  # non-finite rows: values 0
    q = _rint(tl.clamp(scaled, -_MAX, _MAX))
    qb = q.to(tl.int8).to(tl.uint8, bitcast=True)
    scale = tl.where(amax_bits == 0, 0.0, tl.math.div_rn(a, tl.full([BLOCK_R], _MAX, tl.float32)))
    sbits = tl.where(bad, _NAN_BITS, scale.to(tl.int32, bitcast=True))

    dst = rows.to(tl.int64) * (D + _SB)
    tl.store(out_ptr + dst[:, None] + cols[None, :], qb, mask=mask)
    j = tl.arange(0, _SB)
    sbytes = ((sbits[:, None] >> (j[None, :] * 8)) & 0xFF).to(tl.uint8)
    tl.store(out_ptr + dst[:, None] + D + j[None, :], sbytes, mask=row_ok[:, None])


@triton.jit
def _decode_kernel(buf_ptr, out_ptr, n_rows, n1, n2, n3, s0, s1, s2, s3, sd,
                   UNIT: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (cols < D)[None, :]
    src = rows_triton.row_offsets(rows, n1, n2, n3, s0, s1, s2, s3, UNIT)
    qb = tl.load(buf_ptr + src[:, None] + cols[None, :] * sd, mask=mask, other=0)
    j = tl.arange(0, _SB)
    sb = tl.load(buf_ptr + src[:, None] + (D + j[None, :]) * sd, mask=row_ok[:, None], other=0)
    sbits = tl.sum(sb.to(tl.uint32) << (j[None, :] * 8).to(tl.uint32), axis=1)
    scale = sbits.to(tl.float32, bitcast=True)
    y = qb.to(tl.int8, bitcast=True).to(tl.float32) * scale[:, None]
    dst = rows.to(tl.int64) * D
    tl.store(out_ptr + dst[:, None] + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


encode = functools.partial(rows_triton.encode, _encode_kernel)
encode.__doc__ = "``int8_encode`` on a CUDA tensor (inputs, and ``out`` if given, already validated)."
decode = functools.partial(rows_triton.decode, _decode_kernel)
decode.__doc__ = "``int8_decode`` on a CUDA byte buffer (inputs already validated)."
