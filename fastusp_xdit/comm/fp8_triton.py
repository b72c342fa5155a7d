"""Triton kernels of the FP8 e4m3 codec (format and formulas: ``fastusp_xdit.comm.fp8``).

Imported by ``fp8`` on the first CUDA call only; never at package import. Both kernels read a strided
input of up to 4 row dims (+ the row itself, stride given), walk the rows in logical order and write a
contiguous output, one program per ``block_rows`` rows:

* encode: load the row (any float dtype) as float32, the row scale of :func:`.rows_triton.row_scale`
  (absmax on the bit patterns, correctly rounded divisions), quantize with the hardware
  round-to-nearest-even e4m3 cast, store the D value bytes and the 4 scale bytes;
* decode: load the D value bytes and the 4 scale bytes, multiply in float32, cast, store.

The row walk, the host-side layout coalescing and the launch are :mod:`.rows_triton`'s.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

from . import rows_triton
from .fp8 import E4M3_MAX, NAN_BYTE
from .rows import AMAX_FLOOR, NAN_SCALE_BITS

_MAX = tl.constexpr(E4M3_MAX)
_FLOOR = tl.constexpr(AMAX_FLOOR)
_NAN_BYTE = tl.constexpr(NAN_BYTE)
_NAN_BITS = tl.constexpr(NAN_SCALE_BITS)


@triton.jit
def _encode_kernel(x_ptr, out_ptr, n_rows, n1, n2, n3, s0, s1, s2, s3, sd,
                   UNIT: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    x, rows, row_ok, mask = rows_triton.load_rows(x_ptr, n_rows, n1, n2, n3, s0, s1, s2, s3, sd,
                                                  UNIT, D, BLOCK_D, BLOCK_R)
    inv, sbits, bad = rows_triton.row_scale(x, _MAX, _FLOOR, _NAN_BITS, BLOCK_R)
    q = tl.clamp(x * inv[:, None], -_MAX, _MAX)
    qb = q.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
    qb = tl.where(bad[:, None], _NAN_BYTE, qb).to(tl.uint8)
    rows_triton.store_rows(out_ptr, rows, row_ok, mask, qb, sbits, D, BLOCK_D)


@triton.jit
def _decode_kernel(buf_ptr, out_ptr, n_rows, n1, n2, n3, s0, s1, s2, s3, sd,
                   UNIT: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    qb, scale, rows, mask = rows_triton.load_encoded(buf_ptr, n_rows, n1, n2, n3, s0, s1, s2, s3, sd,
                                                     UNIT, D, BLOCK_D, BLOCK_R)
    y = qb.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, None]
    rows_triton.store_decoded(out_ptr, rows, mask, y, D, BLOCK_D)


encode = functools.partial(rows_triton.encode, _encode_kernel)
encode.__doc__ = "``fp8_encode`` on a CUDA tensor (inputs, and ``out`` if given, already validated)."
decode = functools.partial(rows_triton.decode, _decode_kernel)
decode.__doc__ = "``fp8_decode`` on a CUDA byte buffer (inputs already validated)."
