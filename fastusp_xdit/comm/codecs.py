"""Wire codecs: how each tensor that travels (Q, K, V, O, the ring's K/V) is put into a send buffer.

A :class:`Codec` has one interface: ``nbytes(shape, dtype)`` (bytes of one part on the wire),
``encode(x, slot)`` (write ``x`` into a uint8 slot of a packed buffer) and ``decode(slot, shape,
dtype)``. Parts are token-major (tokens first, head_dim last). Side data a codec needs travels in
its own slot: :class:`PerChannel` sends K minus its per-(batch, head, channel) mean over tokens and
that fp32 mean (INT8 also divides every tensor by its channels' rms deviation), so no algorithm code
knows about it. :mod:`.packing` builds the all-to-all and ring
buffers from these sizes, for sending and receiving alike.

:class:`WireSpec` names a codec per tensor; :meth:`WireSpec.parse` reads the spec string
``usp_attention(wire=...)`` takes: a comma list of ``TENSORS`` or ``TENSORS=CODEC`` items, with
TENSORS one of ``qvo``, ``q``, ``k``, ``v``, ``o``, ``ring_kv`` and CODEC a key of :data:`CODECS`; a
bare item means ``e4m3`` (so today's ``"qvo"``, ``"qvo,k"``, ``"qvo,k,ring_kv"`` keep their meaning)
and ``"none"`` sends everything raw. Adding a codec is one class and one :data:`CODECS` line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from . import fp8, int8
from .fp8 import FP8Options
from .rows import encoded_row_bytes

TENSORS = ("q", "k", "v", "o", "ring_kv")


class Codec:
    """Raw bytes of the tensor's own dtype (the default codec, lossless)."""

    name = "raw"
    lossy = False
    rowwise = True  # each row encodes alone: a part may be written as several row ranges

    def nbytes(self, shape, dtype: torch.dtype) -> int:
        return math.prod(shape) * dtype.itemsize

    def encode(self, x: torch.Tensor, slot: torch.Tensor) -> None:
        _view(slot, x.dtype, x.shape).copy_(x)

    def decode(self, slot: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
        return _view(slot, dtype, shape)

    def kernel(self, device: torch.device) -> str:
        """Which implementation encodes on ``device``: ``"triton"`` or ``"torch"``."""
        return "torch"

    def for_tensor(self, tensor: str) -> Codec:
        """The codec as ``tensor`` uses it: lossy codecs send K (and the ring's K) centred."""
        return PerChannel(self) if self.lossy and tensor in ("k", "ring_k") else self


class RowCodec(Codec):
    """8-bit rows with an inline fp32 absmax scale (:mod:`.rows`): D + 4 bytes a row, 0.516 of bf16 at D=128."""

    lossy = True
    ops = None  # the format's :class:`~.rows.RowOps`

    def nbytes(self, shape, dtype):
        return math.prod(shape[:-1]) * encoded_row_bytes(shape[-1])

    def encode(self, x, slot):
        self.ops.encode(x, slot.view(*x.shape[:-1], encoded_row_bytes(x.shape[-1])))

    def decode(self, slot, shape, dtype):
        return self.ops.decode(slot.view(*shape[:-1], encoded_row_bytes(shape[-1])), dtype)

    def kernel(self, device):
        return "triton" if device.type == "cuda" and self.ops.triton_serves(device.index or 0) else "torch"


class E4M3(RowCodec):
    """FP8 e4m3 rows (:mod:`.fp8`): 3 mantissa bits, ~2.6% rms per tensor; K travels centred."""

    name = "e4m3"
    ops = fp8.ROW_OPS


class Int8(RowCodec):
    """INT8 rows (:mod:`.int8`): 7 bits, ~0.66% rms on Gaussian rows. Every tensor travels
    standardised per channel: a row's scale follows its largest value, so without it a few large
    channels (V's outliers, K's offsets) would make every other channel coarse
    (``benchmarks/int8_accuracy.py`` measured centring and several smoothings: this was best)."""

    name = "int8"
    ops = int8.ROW_OPS

    def for_tensor(self, tensor):
        return PerChannel(self, scale=True)


class PerChannel(Codec):
    """``inner`` applied to x minus its per-(batch, head, channel) mean over tokens (dim 0) and, with
    ``scale``, divided by the channel's rms deviation (1 where it is 0); the fp32 mean (and
    deviation) travel raw after the rows.

    Attention scores are shift-invariant per key set, and K carries large per-channel offsets in real
    activations; V carries channels many times larger than the rest. Removing them keeps them out of
    the 8-bit row scales. Decoded in fp32, the statistics applied, then rounded once to ``dtype``.
    """

    lossy = True
    rowwise = False

    def __init__(self, inner: Codec, scale: bool = False):
        self.inner, self.scale = inner, scale
        self.name = f"{inner.name}-{'standardised' if scale else 'centred'}"

    def _split(self, shape):
        return self.inner.nbytes(shape, torch.float32), math.prod(shape[1:]) * 4

    def nbytes(self, shape, dtype):
        rows, stat = self._split(shape)
        return rows + stat * (2 if self.scale else 1)

    def encode(self, x, slot):
        xf = x.float()
        mean = xf.mean(dim=0) if x.shape[0] else xf.new_zeros(x.shape[1:])
        centred = xf - mean
        n, stat = self._split(x.shape)
        _view(slot[n:n + stat], torch.float32, mean.shape).copy_(mean)
        if self.scale:
            dev = centred.pow(2).mean(dim=0).sqrt() if x.shape[0] else xf.new_ones(x.shape[1:])
            dev = torch.where(dev > 0, dev, 1.0)
            _view(slot[n + stat:], torch.float32, dev.shape).copy_(dev)
            centred = centred / dev
        self.inner.encode(centred, slot[:n])

    def decode(self, slot, shape, dtype):
        n, stat = self._split(shape)
        y = self.inner.decode(slot[:n], shape, torch.float32)
        if self.scale:
            y = y * _view(slot[n + stat:], torch.float32, shape[1:])
        return (y + _view(slot[n:n + stat], torch.float32, shape[1:])).to(dtype)

    def kernel(self, device):
        return self.inner.kernel(device)

    def for_tensor(self, tensor):
        return self


# codec name -> class: the one registry of wire formats
CODECS: dict[str, type] = {"raw": Codec, "e4m3": E4M3, "int8": Int8}


def _view(slot: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    """A buffer segment seen as a tensor of ``dtype`` and ``shape``."""
    return (slot.view(dtype) if slot.dtype != dtype else slot).view(shape)


@dataclass(frozen=True)
class WireSpec:
    """Which codec each travelling tensor uses (names of :data:`CODECS`)."""

    q: str = "raw"
    k: str = "raw"
    v: str = "raw"
    o: str = "raw"
    ring_kv: str = "raw"

    def __post_init__(self):
        # every travelling tensor's codec, chosen once (the steps look them up per call)
        codecs = {t: CODECS[getattr(self, "ring_kv" if t.startswith("ring_") else t)]().for_tensor(t)
                  for t in ("q", "k", "v", "o", "ring_k", "ring_v")}
        object.__setattr__(self, "_codecs", codecs)

    @classmethod
    def parse(cls, spec: str) -> WireSpec:
        """Parse a spec string (module docstring); ``ValueError`` names the accepted words."""
        items = [w.strip().lower() for w in spec.split(",")]
        if items == ["none"]:
            return cls()
        chosen: dict[str, str] = {}
        for item in items:
            tensors, _, codec = item.partition("=")
            codec = codec.strip() or "e4m3"
            names = list("qvo") if tensors.strip() == "qvo" else [tensors.strip()]
            if any(n not in TENSORS for n in names) or codec not in CODECS:
                raise ValueError(f"wire spec {spec!r}: use a comma list of TENSORS or TENSORS=CODEC with TENSORS in "
                                 f"qvo, {', '.join(TENSORS)} and CODEC in {', '.join(CODECS)} (a bare item means e4m3: "
                                 "'qvo', 'qvo,k', 'qvo,k,ring_kv'), or 'none' alone")
            chosen.update(dict.fromkeys(names, codec))
        return cls(**chosen)

    @classmethod
    def of(cls, wire) -> WireSpec:
        """A WireSpec from a WireSpec, an :class:`~.fp8.FP8Options` (all e4m3), a spec string or None (raw)."""
        if wire is None:
            return _RAW
        if isinstance(wire, WireSpec):
            return wire
        if isinstance(wire, str):
            if torch.compiler.is_compiling():
                return cls.parse(wire)
            spec = _PARSED.get(wire)
            if spec is None:
                if len(_PARSED) >= 256:
                    _PARSED.clear()
                spec = _PARSED[wire] = cls.parse(wire)
            return spec
        if isinstance(wire, FP8Options):
            e = lambda on: "e4m3" if on else "raw"  # noqa: E731
            return cls(q=e(wire.qvo), k=e(wire.k), v=e(wire.qvo), o=e(wire.qvo), ring_kv=e(wire.ring_kv))
        raise ValueError(f"wire (or fp8) must be a WireSpec, an FP8Options, a spec string like 'qvo,k' or "
                         f"'qvo=int8,k=int8', or None; got {wire!r}")

    @property
    def lossy(self) -> bool:
        return any(getattr(self, f.name) != "raw" for f in fields(self))

    def codec(self, tensor: str) -> Codec:
        """The codec of ``tensor``: ``"q"``, ``"k"``, ``"v"``, ``"o"``, ``"ring_k"`` or ``"ring_v"``."""
        return self._codecs[tensor]

    def __str__(self) -> str:
        """The canonical spec, accepted by :meth:`parse` (e4m3-only specs print as they always did)."""
        items, rest = [], [f.name for f in fields(self)]
        if self.q == self.v == self.o != "raw":
            items.append("qvo" if self.q == "e4m3" else f"qvo={self.q}")
            rest = ["k", "ring_kv"]
        for name in rest:
            codec = getattr(self, name)
            if codec != "raw":
                items.append(name if codec == "e4m3" else f"{name}={codec}")
        return ",".join(items) or "none"


_RAW = WireSpec()
_PARSED: dict[str, WireSpec] = {}  # spec string -> WireSpec, for eager calls
