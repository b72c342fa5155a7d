"""Triton kernels of the INT8 row codec (format and formulas: ``fastusp_xdit.comm.int8``).

Imported by ``int8`` on the first CUDA call only; never at package import. The row walk, the host-side
layout coalescing and the launch are :mod:`.rows_triton`'s:
both kernels read a strided input of up to 4 row dims, walk the rows in logical order and write a
contiguous output, one program per ``block_rows`` rows. Only the per-value math differs from e4m3:

* encode: the row scale of :func:`.rows_triton.row_scale` (``127 / a`` and ``a / 127`` with
  ``div_rn``), the product rounded once, clamped, then :func:`_rint` (exact round-half-to-even, see
  there), stored as int8 bytes and the 4 scale bytes;
* decode: int8 bytes to float32, times the scale, cast, store.
"""
from __future__ import annotations

import functools
import os

import triton
import triton.language as tl

from . import rows_triton

try:  # triton >= 3.0
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older triton
    from triton.language.extra.cuda import libdevice
from .int8 import INT8_MAX
from .rows import AMAX_FLOOR, NAN_SCALE_BITS

_MAX = tl.constexpr(INT8_MAX)
_FLOOR = tl.constexpr(AMAX_FLOOR)
_NAN_BITS = tl.constexpr(NAN_SCALE_BITS)
# On the GPU one cvt.rni (libdevice.rint: round half to even); Triton's interpreter cannot run extern
# functions, so there the exact emulation below runs instead. Both give torch.round's bytes.
_HW_RINT = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def _rint(v):
    """Round float32 ``v`` (finite, |v| < 2**31) to the nearest integer, ties to even, as int32.

    Exact by construction: the truncation (``cvt.rzi``), ``v - trunc(v)`` (exact: same sign, no
    more bits) and the comparisons round nothing, and there is no multiply-add for the compiler to
    contract. The GPU uses ``libdevice.rint`` (one ``cvt.rni``); this form serves Triton's interpreter,
    which cannot run extern functions.
    """
    t = v.to(tl.int32)
    f = tl.abs(v - t.to(tl.float32))
    up = (f > 0.5) | ((f == 0.5) & ((t & 1) != 0))
    return tl.where(up, tl.where(v < 0, t - 1, t + 1), t)


@triton.jit
def _encode_kernel(x_ptr, out_ptr, n_rows, n1, n2, n3, s0, s1, s2, s3, sd,
                   UNIT: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    x, rows, row_ok, mask = rows_triton.load_rows(x_ptr, n_rows, n1, n2, n3, s0, s1, s2, s3, sd,
                                                  UNIT, D, BLOCK_D, BLOCK_R)
    inv, sbits, bad = rows_triton.row_scale(x, _MAX, _FLOOR, _NAN_BITS, BLOCK_R)
    scaled = tl.where(bad[:, None], 0.0, x * inv[:, None])  # non-finite rows: values 0
    clamped = tl.clamp(scaled, -_MAX, _MAX)
    if _HW_RINT:
        q = libdevice.rint(clamped).to(tl.int32)
    else:
        q = _rint(clamped)
    qb = q.to(tl.int8).to(tl.uint8, bitcast=True)
    rows_triton.store_rows(out_ptr, rows, row_ok, mask, qb, sbits, D, BLOCK_D)


@triton.jit
def _decode_kernel(buf_ptr, out_ptr, n_rows, n1, n2, n3, s0, s1, s2, s3, sd,
                   UNIT: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    qb, scale, rows, mask = rows_triton.load_encoded(buf_ptr, n_rows, n1, n2, n3, s0, s1, s2, s3, sd,
                                                     UNIT, D, BLOCK_D, BLOCK_R)
    y = qb.to(tl.int8, bitcast=True).to(tl.float32) * scale[:, None]
    rows_triton.store_decoded(out_ptr, rows, mask, y, D, BLOCK_D)


encode = functools.partial(rows_triton.encode, _encode_kernel)
encode.__doc__ = "``int8_encode`` on a CUDA tensor (inputs, and ``out`` if given, already validated)."
decode = functools.partial(rows_triton.decode, _decode_kernel)
decode.__doc__ = "``int8_decode`` on a CUDA byte buffer (inputs already validated)."
