"""The frame shared by the 8-bit row codecs (:mod:`.fp8` e4m3, :mod:`.int8`): checks, constants, custom ops.

A *row* is the last dim (head_dim, ``D``); an encoded row is ``D`` one-byte values followed by the
4 little-endian bytes of its float32 scale. A format module supplies its torch reference
``encode_torch(x, out=None)`` / ``decode_torch(buf, dtype)`` and its Triton module; :class:`RowOps`
registers the three ``torch.library`` custom ops ``fastusp::<name>_encode``, ``<name>_encode_into``
and ``<name>_decode`` (fake implementations included, so ``torch.compile(fullgraph=True)`` traces
them; CUDA tensors take the Triton kernels when :func:`~fastusp_xdit.triton_gate.kernels_on` says
they serve the device) and gives the validated ``encode``/``decode`` entry points.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..triton_gate import kernels_on

SCALE_BYTES = 4
MAX_DIMS = 5  # logical dims the Triton kernels address (4 row dims + D)
AMAX_FLOOR = 2.0**-100
NAN_SCALE_BITS = 0x7FC00000
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def encoded_row_bytes(d: int) -> int:
    """Bytes of one encoded row of ``d`` values: ``d`` one-byte values + a float32 scale."""
    if d < 1:
        raise ValueError(f"row length must be >= 1, got {d}")
    return d + SCALE_BYTES


def check_finite(x: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``x`` holds inf/nan (syncs with the host: eager callers only)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError("input holds non-finite values (inf/nan), which 8-bit communication cannot carry: "
                         "disable 8-bit communication (use backend fastusp) or fix the input")


def exact_strides() -> tuple:
    """The op tag that makes Inductor hand the op the strides eager would (a permuted view stays a
    view: the fused permute)."""
    tag = getattr(torch.Tag, "needs_exact_strides", None)
    return (tag,) if tag is not None else ()


def _check_rank(shape, what: str) -> None:
    if not 1 <= len(shape) <= MAX_DIMS:
        raise ValueError(f"{what} must have 1 to {MAX_DIMS} dims, got shape {tuple(shape)}: "
                         f"reshape (flatten) the leading dims")


def check_encode_input(x: torch.Tensor, what: str) -> None:
    """Validate an encoder input (``what``: the entry point's name, e.g. ``fp8_encode``)."""
    _check_rank(x.shape, f"{what} input")
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f"{what} takes float16/bfloat16/float32, got {x.dtype}: cast with .to(torch.bfloat16)")
    if x.shape[-1] < 1:
        raise ValueError(f"{what} needs a last dim >= 1, got shape {tuple(x.shape)}")
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{what} needs last-dim stride 1, got strides {x.stride()}: permute so the "
                         f"head dim stays innermost, or call .contiguous()")


def check_decode_input(buf: torch.Tensor, dtype: torch.dtype, what: str, encoder: str) -> None:
    """Validate a decoder input (``what``: the decoder's name, ``encoder``: the encoder's)."""
    _check_rank(buf.shape, f"{what} input")
    if buf.dtype != torch.uint8:
        raise ValueError(f"{what} takes the uint8 buffer {encoder} made, got {buf.dtype}: use .view(torch.uint8)")
    if buf.shape[-1] <= SCALE_BYTES:
        raise ValueError(f"{what} needs rows of D + {SCALE_BYTES} bytes with D >= 1, got shape {tuple(buf.shape)}")
    if buf.stride(-1) != 1:
        raise ValueError(f"{what} needs last-dim stride 1, got strides {buf.stride()}: call .contiguous()")
    if dtype not in INPUT_DTYPES:
        raise ValueError(f"{what} produces float16/bfloat16/float32, got {dtype}")


def torch_row_scale(xf: torch.Tensor, qmax: float):
    """Per row of float32 ``xf``: ``(qmax / a, scale, bad)`` as the kernels compute them (``a`` the absmax
    floored at ``AMAX_FLOOR``, ``scale = a / qmax`` or 0 for a zero row, ``bad`` the rows with inf/nan).
    Tensor-by-tensor divisions: torch turns ``qmax / a`` into a reciprocal product, which is not
    correctly rounded and would differ from the kernels' ``div_rn``."""
    amax = xf.abs().amax(-1, keepdim=True)
    a = amax.clamp_min(AMAX_FLOOR)
    q_max = torch.full_like(a, qmax)
    return q_max / a, torch.where(amax == 0, 0.0, a / q_max), ~torch.isfinite(amax)


def torch_write_rows(x: torch.Tensor, out, values: torch.Tensor, scale: torch.Tensor, bad: torch.Tensor):
    """Write value bytes and scale bytes (NaN for ``bad`` rows) into ``out`` (allocated if None)."""
    d = x.shape[-1]
    if out is None:
        out = torch.empty(x.shape[:-1] + (d + SCALE_BYTES,), dtype=torch.uint8, device=x.device)
    out[..., :d] = values
    out[..., d:] = scale.contiguous().view(torch.int32).masked_fill(bad, NAN_SCALE_BITS).view(torch.uint8)
    return out


def torch_decode_rows(buf: torch.Tensor, value_dtype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """``(float32(values as value_dtype) * scale).to(dtype)``, contiguous ``buf.shape[:-1] + (D,)``."""
    d = buf.shape[-1] - SCALE_BYTES
    q = buf[..., :d].view(value_dtype).float()
    scale = buf[..., d:].contiguous().view(torch.float32)
    return (q * scale).to(dtype).contiguous()


class RowOps:
    """The custom ops and validated entry points of one row format (see the module docstring)."""

    def __init__(self, name: str, encode_torch: Callable, decode_torch: Callable, kernel_module: str,
                 min_capability: tuple, what: str):
        self.name, self._kernel_module, self._min_cc, self._what = name, kernel_module, min_capability, what
        tags = exact_strides()

        def encode(x: torch.Tensor) -> torch.Tensor:
            return encode_torch(x)

        def encode_cuda(x):
            kernels = self._kernels(x)
            return kernels.encode(x) if kernels else encode_torch(x)

        def encode_into(x: torch.Tensor, out: torch.Tensor) -> None:
            encode_torch(x, out)

        def encode_into_cuda(x, out):
            kernels = self._kernels(x)
            if kernels:
                kernels.encode(x, out)
            else:
                encode_torch(x, out)

        def decode(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return decode_torch(buf, dtype)

        def decode_cuda(buf, dtype):
            kernels = self._kernels(buf)
            return kernels.decode(buf, dtype) if kernels else decode_torch(buf, dtype)

        ops = []
        for op_name, fn, cuda_fn, mutates, fake in (
                ("encode", encode, encode_cuda, (), lambda x: x.new_empty(
                    x.shape[:-1] + (x.shape[-1] + SCALE_BYTES,), dtype=torch.uint8)),
                ("encode_into", encode_into, encode_into_cuda, ("out",), lambda x, out: None),
                ("decode", decode, decode_cuda, (), lambda buf, dtype: buf.new_empty(
                    buf.shape[:-1] + (buf.shape[-1] - SCALE_BYTES,), dtype=dtype))):
            op = torch.library.custom_op(f"fastusp::{name}_{op_name}", mutates_args=mutates, tags=tags)(fn)
            op.register_kernel("cuda")(cuda_fn)
            op.register_fake(fake)
            ops.append(op)
        self._encode, self._encode_into, self._decode = ops

    def triton_serves(self, device_index: int) -> bool:
        """Whether the Triton kernels serve this CUDA device (triton importable, capability high enough)."""
        return kernels_on(self._kernel_module, device_index, self._min_cc, self._what)

    def _kernels(self, t: torch.Tensor):
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        if not self.triton_serves(index):
            return None
        import importlib

        return importlib.import_module(self._kernel_module)

    def encode(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Encode float16/bfloat16/float32 ``x`` (last-dim stride 1, <= 5 dims) to contiguous uint8
        ``x.shape[:-1] + (D + 4,)`` in ``x``'s logical order (pass a permuted view to fuse the permute).
        ``out``: a contiguous uint8 tensor of that shape (e.g. a slot of a packed send buffer) to write
        into instead of a new one; it is returned."""
        what = f"{self.name}_encode"
        check_encode_input(x, what)
        if out is None:
            return self._encode(x)
        want = tuple(x.shape[:-1]) + (x.shape[-1] + SCALE_BYTES,)
        if out.dtype != torch.uint8 or tuple(out.shape) != want or not out.is_contiguous() or out.device != x.device:
            raise ValueError(f"{what} out= must be a contiguous uint8 tensor of shape {want} on {x.device}, got "
                             f"{out.dtype} {tuple(out.shape)} strides {out.stride()} on {out.device}: "
                             f"view a contiguous byte slot with .view(*shape)")
        self._encode_into(x, out)
        return out

    def decode(self, buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Decode uint8 ``buf`` (rows of ``D + 4`` bytes, last-dim stride 1) to contiguous
        ``buf.shape[:-1] + (D,)`` of ``dtype``."""
        check_decode_input(buf, dtype, f"{self.name}_decode", f"{self.name}_encode")
        return self._decode(buf, dtype)

