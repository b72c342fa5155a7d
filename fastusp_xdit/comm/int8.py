"""INT8 row codec for the tensors the Ulysses all-to-all and the ring rotation carry (beside ``fp8``).

Format (the frame of the e4m3 codec, ``fastusp_xdit.comm.fp8``). The last dim (head_dim, ``D``) is a
*row*; each row gets one absmax scale and is encoded as ``D + 4`` bytes: ``D`` int8 values (two's
complement, -127..127) followed by the scale as the 4 little-endian bytes of a float32 (0.516 of bf16
at ``D = 128``). Every quantity is computed in float32 with these formulas, in this order, by the torch
implementation (any device) and the Triton kernels (CUDA) alike:

* ``amax = max |x|`` over the row; ``a = max(amax, 2**-100)`` (keeps ``127 / a`` finite);
* value ``q = round_half_even(clamp(x * (127 / a), -127, 127))``, ``127 / a`` one correctly rounded
  division, the product rounded once (torch's ``round`` / the kernels' exact ``_rint``);
* ``scale = a / 127`` (correctly rounded), or ``0`` for an all-zero row;
* decode: ``y = (float32(q) * scale).to(dtype)`` (round to nearest even).

Every step is an IEEE-exact operation, so CPU and CUDA bytes agree exactly (``benchmarks/int8_codec.py``
checks it on the GPU). Round-trip error: the step is ``a / 127``, uniform rounding error gives
``step / sqrt(12)`` rms per value, ~0.6% rms per row on Gaussian rows of ``D = 128`` (e4m3: ~2.6%),
but a row's step follows its largest value: a few large channels (outliers) make every other value of
the row coarse, where e4m3 keeps a constant relative precision (``benchmarks/int8_accuracy.py``
measures both, with error controls). Special rows: an all-zero row encodes to zeros and decodes to
exact zeros. A row holding ``inf`` or ``nan`` encodes to values ``0`` and scale bits ``0x7FC00000``
(NaN), so it decodes to all NaN: garbage never becomes silently finite. Nothing here syncs with the
host, so encode/decode are CUDA-graph capturable; :func:`check_finite` (of :mod:`.rows`) is the eager,
syncing guard.

API, as ``fp8``'s: :func:`int8_encode` reads ``x`` through its strides and writes the rows in ``x``'s
*logical* order (pass a permuted view to fuse the permute); ``out=`` writes into a slot of a packed send
buffer. :func:`int8_decode` reads a (possibly permuted) byte view and writes a contiguous tensor. Both
run ``torch.library`` custom ops (``torch.ops.fastusp.int8_encode``, ``int8_encode_into``,
``int8_decode``) with fake implementations, so ``torch.compile(fullgraph=True)`` traces them; CUDA
tensors on compute capability >= 8.0 run the Triton kernels of ``int8_triton`` (imported on first use),
everything else runs :func:`encode_torch` / :func:`decode_torch`. No autograd: inference only.
"""
from __future__ import annotations

import torch

from .rows import RowOps, check_finite, encoded_row_bytes, torch_decode_rows, torch_row_scale, torch_write_rows

INT8_MAX = 127.0

__all__ = ["INT8_MAX", "encoded_row_bytes", "int8_encode", "int8_decode", "encode_torch", "decode_torch",
           "check_finite", "triton_serves"]


def encode_torch(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference encoder in plain torch ops (any device); the format is in the module docstring."""
    xf = x.float()
    inv, scale, bad = torch_row_scale(xf, INT8_MAX)
    scaled = (xf * inv).masked_fill(bad, 0.0)  # non-finite rows: values 0 (no NaN cast)
    q = torch.round(scaled.clamp(-INT8_MAX, INT8_MAX)).to(torch.int8).view(torch.uint8)  # ties to even
    return torch_write_rows(x, out, q, scale, bad)


def decode_torch(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reference decoder in plain torch ops (any device): contiguous ``buf.shape[:-1] + (D,)`` of ``dtype``."""
    return torch_decode_rows(buf, torch.int8, dtype)


ROW_OPS = RowOps("int8", encode_torch, decode_torch, "fastusp_xdit.comm.int8_triton", (8, 0), "INT8 codec")


# the validated entry points (docstrings on :class:`~.rows.RowOps`); Triton kernels need sm >= 8.0
int8_encode, int8_decode, triton_serves = ROW_OPS.encode, ROW_OPS.decode, ROW_OPS.triton_serves
