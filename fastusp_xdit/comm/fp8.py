"""FP8 e4m3 codec for the tensors the Ulysses all-to-all and the ring rotation carry.

Format. The last dim (head_dim, ``D``) is a *row*; each row gets one absmax scale, and is encoded as
``D + 4`` bytes: ``D`` float8_e4m3fn values followed by the scale as the 4 little-endian bytes of a
float32 (0.516 of bf16 at ``D = 128``). Every quantity is computed in float32 with these formulas, in
this order, by the torch implementation (any device) and the Triton kernels (CUDA) alike:

* ``amax = max |x|`` over the row; ``a = max(amax, 2**-100)`` (keeps ``448 / a`` finite: rows whose
  absmax is below ~7.9e-31 are quantized against 2**-100, i.e. effectively flushed toward zero);
* value ``q = e4m3(clamp(x * (448 / a), -448, 448))``, ``448 / a`` one correctly rounded division,
  the cast rounding to nearest even (torch's cast; ``cvt.rn.satfinite`` on the GPU);
* ``scale = a / 448`` (correctly rounded), or ``0`` for an all-zero row;
* decode: ``y = (float32(q) * scale).to(dtype)`` (round to nearest even).

Every step is an IEEE-exact operation, so CPU and CUDA bytes agree exactly (``benchmarks/fp8_codec.py``
checks it on the GPU). Round-trip error: ~2.6% rms per row on Gaussian rows. Special rows: an all-zero
row encodes to zeros and decodes to exact zeros. A row holding ``inf`` or ``nan`` encodes to scale
bits ``0x7FC00000`` (NaN) and values ``0x7F`` (e4m3 NaN), so it decodes to all NaN: garbage never
becomes silently finite. Finite values of any size are fine (the scale adapts, up to the float32
maximum). Nothing here syncs with the host, so encode/decode are CUDA-graph capturable;
:func:`check_finite` is the eager, syncing guard for callers that want an error instead of NaN rows.

API. :func:`fp8_encode` reads ``x`` through its strides and writes the rows in ``x``'s *logical* order:
pass a permuted view to fuse the permute (a ``(S, B, H, D)`` view of a ``(B, H, S, D)`` tensor gives
the send layout in one pass); ``out=`` writes into a slot of a packed send buffer instead.
:func:`fp8_decode` likewise reads a (possibly permuted) byte view and writes a contiguous tensor.
Both run ``torch.library`` custom ops (``torch.ops.fastusp.fp8_encode``, ``fp8_encode_into``,
``fp8_decode``) with fake implementations, so ``torch.compile(fullgraph=True)`` traces them; CUDA
tensors on compute capability >= 8.9 run the Triton kernels of ``fp8_triton`` (imported on first use),
everything else runs :func:`encode_torch` / :func:`decode_torch`. No autograd: inference only.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from .rows import RowOps, check_finite, encoded_row_bytes, torch_decode_rows, torch_row_scale, torch_write_rows

__all__ = ["E4M3_MAX", "FP8Options", "check_finite", "encoded_row_bytes", "encode_torch", "decode_torch",
           "fp8_encode", "fp8_decode", "triton_serves"]

E4M3_MAX = 448.0
NAN_BYTE = 0x7F


@dataclasses.dataclass(frozen=True)
class FP8Options:
    """Which tensors travel in FP8: Q, V and the output O (default), K (opt-in), the K/V ring (opt-in)."""

    qvo: bool = True
    k: bool = False
    ring_kv: bool = False

    WORDS: ClassVar[tuple[str, ...]] = ("qvo", "k", "ring_kv", "none")

    @classmethod
    def parse(cls, spec: str) -> FP8Options:
        """Parse a comma list of enabled parts: ``"qvo"``, ``"qvo,k"``, ``"qvo,k,ring_kv"``, ``"none"``."""
        words = [w.strip().lower() for w in spec.split(",")]
        bad = [w for w in words if w not in cls.WORDS]
        if bad or (len(words) > 1 and "none" in words):
            raise ValueError(f"FP8 spec {spec!r}: use a comma list of {', '.join(cls.WORDS[:-1])}, "
                             f"or 'none' alone")
        return cls(qvo="qvo" in words, k="k" in words, ring_kv="ring_kv" in words)

    def __str__(self) -> str:
        """The canonical spec, accepted by :meth:`parse`."""
        return ",".join(n for n in self.WORDS[:-1] if getattr(self, n)) or "none"


def encode_torch(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference encoder in plain torch ops (any device); the format is in the module docstring."""
    xf = x.float()
    inv, scale, bad = torch_row_scale(xf, E4M3_MAX)
    q = (xf * inv).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return torch_write_rows(x, out, q.masked_fill(bad, NAN_BYTE), scale, bad)


def decode_torch(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reference decoder in plain torch ops (any device): contiguous ``buf.shape[:-1] + (D,)`` of ``dtype``."""
    return torch_decode_rows(buf, torch.float8_e4m3fn, dtype)


ROW_OPS = RowOps("fp8", encode_torch, decode_torch, "fastusp_xdit.comm.fp8_triton", (8, 9), "FP8 codec")


# the validated entry points (docstrings on :class:`~.rows.RowOps`); Triton kernels need native e4m3: sm >= 8.9
fp8_encode, fp8_decode, triton_serves = ROW_OPS.encode, ROW_OPS.decode, ROW_OPS.triton_serves
