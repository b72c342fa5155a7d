"""Triton kernels of the FP8 e4m3 codec (format and formulas: ``fastusp_xdit.comm.fp8``).

Imported by ``fp8`` on the first CUDA call only; never at package import. Both kernels read a strided
input of up to 4 row dims (+ the row itself, stride given), walk the rows in logical order and write a
contiguous output, one program per ``block_rows`` rows:

* encode: load the row (any float dtype) as float32, take the absmax on the bit patterns
  (``bits & 0x7FFFFFFF``: its integer max is the float absmax, and values >= ``0x7F800000`` flag
  inf/nan without relying on NaN-propagating float max), quantize with correctly rounded divisions
  (``div_rn``) and the hardware round-to-nearest-even e4m3 cast, store the D value bytes and the 4
  scale bytes;
* decode: load the D value bytes and the 4 scale bytes, multiply in float32, cast, store.

The row walk, the host-side layout coalescing and the launch are :mod:`.rows_triton`'s.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

from . import rows_triton
from .fp8 import E4M3_MAX, NAN_BYTE
from .rows import AMAX_FLOOR, NAN_SCALE_BITS, SCALE_BYTES

_MAX = tl.constexpr(E4M3_MAX)
_FLOOR = tl.constexpr(AMAX_FLOOR)
_NAN_BYTE = tl.constexpr(NAN_BYTE)
_NAN_BITS = tl.constexpr(NAN_SCALE_BITS)
_SB = tl.constexpr(SCALE_BYTES)


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
    q = tl.clamp(x * inv[:, None], -_MAX, _MAX)
    qb = q.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
    qb = tl.where(bad[:, None], _NAN_BYTE, qb).to(tl.uint8)
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
    y = qb.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, None]
    dst = rows.to(tl.int64) * D
    tl.store(out_ptr + dst[:, None] + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


encode = functools.partial(rows_triton.encode, _encode_kernel)
encode.__doc__ = "``fp8_encode`` on a CUDA tensor (inputs, and ``out`` if given, already validated)."
decode = functools.partial(rows_triton.decode, _decode_kernel)
decode.__doc__ = "``fp8_decode`` on a CUDA byte buffer (inputs already validated)."
