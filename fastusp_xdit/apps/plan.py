"""Performance model and degree planner: predicted step time for every (ulysses, ring, wire, pipelined, staged).

Inputs are a model shape (:class:`Model`: heads, head_dim, tokens, layers, batch, MLP ratio), a
world size and a device :class:`Profile` of measured numbers. Per attention layer, per rank:

* attention compute ``4*B*H*S^2*D / world / attn_tflops``, times ``1 + ring_step_overhead*(R-1)``
  when the keys arrive in ``R`` ring blocks (shorter kernels plus one LSE merge per extra block);
* Ulysses (U > 1): one packed Q|K|V all-to-all and one O all-to-all (``packed=False``: separate
  Q, K, V all-to-alls, as diffusers and stock xfuser do), each costing
  ``latency + buffer*(U-1)/U / bw(buffer)``; plus layout copies at HBM copy speed (one per tensor
  packed, two per tensor unpacked: permute before, permute after);
* ring (R > 1): ``R-1`` transfers of the K/V block at the p2p link. FastUSP's ring (``packed``,
  every registry variant) issues each block's transfer before computing on the previous block, so
  it hides behind that compute (``(R-1)*max(c, p) + c``); the unpacked comparison path pays them
  serially (``R*c + (R-1)*p``) unless ``pipelined``;
* ``pipelined`` pipelines the Ulysses all-to-alls with attention by head groups (``chunks`` groups,
  as ``usp_attention(head_groups=chunks)`` cuts them and the registry's head-group variant runs
  them: balanced, the best count is chosen unless ``chunks`` is given): a two-resource
  schedule, link then compute. A profile's ``head_group_ratios`` ((G, time of G calls / one call) at
  one Ulysses-2 rank's heads, from benchmarks/micro.py) prices the smaller kernels and limits G to
  the measured counts; without it any G is considered at no compute cost;
* ``staged`` (``usp_attention_staged``, the registry's staged variant): V's, Q's and K's
  all-to-alls run one after another on the link, each starting once its projection
  (``2*B*S_local*(H*D)^2`` FLOPs at ``dense_tflops``) is done, so only the time past the three
  projections counts; the output's all-to-all hides behind the MLP up-projection
  (``2*B*S_local*(H*D)*ratio*(H*D)`` FLOPs) in the model's ``parallel_mlp_layers`` (FLUX's
  single-stream blocks). Assumes NCCL and matmuls run concurrently at full speed (no SM
  contention): an upper bound on the gain;
* ``wire`` (a :class:`fastusp_xdit.comm.codecs.WireSpec` string: the codec of each of Q, K, V, O
  and the ring's K/V) sets each tensor's wire bytes to its codec's ``nbytes`` for that tensor's
  shape: e4m3 and int8 rows alike are ``D`` bytes + an fp32 scale per (token, head) row (0.516 of
  bf16 at D=128), plus the codec's fp32 per-(batch, head, channel) statistics, ``B*H*D*4`` bytes
  each (e4m3: K's mean over tokens; int8: every tensor's mean and rms deviation), so codecs differ
  only there. A lossy tensor's pack copy becomes an encode and a decode at ``codec_gbps`` (bytes
  read + written, like ``copy_gbps``; the statistics' passes are not priced). Every lossy codec is
  priced at that one rate, the e4m3 encoder's measured speed: int8 is assumed to encode as fast
  until it is measured.

The rest of the step (projections, MLP, norms) is ``layers * 2*(4+2*mlp_ratio)*B*S*(H*D)^2`` FLOPs
at ``dense_tflops``, divided by the world size; ``dense_tflops`` is calibrated so that world 1
reproduces a measured one-GPU step (:func:`calibrate`).

:func:`plan` considers the wire specs ``"none"``, every registry variant's
(:data:`fastusp_xdit.xdit.variants.VARIANTS`) and one extra (``wire_on``), each with and without
head-group pipelining and staging (Ulysses > 1), plus each registry variant's own head-group
count; every :class:`Prediction` names the registry variant (``--attention_backend``) that runs its
choice, or ``"-"`` where only ``usp_attention(wire=..., head_groups=...)`` arguments do
(:func:`variant_of`). FastUSP's ring always overlaps its transfers, so at Ulysses 1 the rows differ
only in ``wire``.

A link's bandwidth is piecewise linear in log(buffer bytes) over measured points (clamped at the
ends) plus a fixed latency; :func:`fit_link` derives both from lone-call timings (each collective
timed alone, as it runs inside a step between the kernel producing its input and the one consuming
it). Profiles are data: :data:`PROFILES` holds ``h200x2`` and ``h100``, built only from DESIGN.md
section 3 (row cited at each number); a JSON file of the same schema (``"profile"`` key of a
benchmark result, or the bare object) overrides fields. Step timings measured later enter through
:func:`calibrate` (one-GPU step) and a profile's ``measured_steps`` (checked by :func:`validate`).

Error against the one measured multi-GPU step (2xH200, FLUX.1-dev size at 1024^2, compiled):
diffusers' Ulysses-2 (``Choice(2, 1, packed=False)``) measured 89.3 ms, predicted 89.5 ms (+0.2%);
tests/test_plan.py holds it to 5%. It is one point, and the copy count of the unpacked path is an
assumption, so treat the model as good to ~10% for ranking, not as a timing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch

from .. import layout
from ..comm.codecs import WireSpec
from ..xdit.variants import VARIANTS

_BF16 = 2


@dataclass(frozen=True)
class Model:
    """Shape of a diffusion transformer: every layer attends over all ``tokens`` (text included)."""

    heads: int
    head_dim: int
    tokens: int
    layers: int
    batch: int = 1
    mlp_ratio: float = 4.0
    parallel_mlp_layers: int = 0  # layers whose MLP does not read the attention output (FLUX single-stream)

    def attention_flops(self) -> float:
        """One layer's attention FLOPs on one device (QK^T and PV)."""
        return 4.0 * self.batch * self.heads * self.tokens ** 2 * self.head_dim

    def dense_flops(self) -> float:
        """One layer's non-attention FLOPs: QKV + out projections (4 h^2) and MLP (2 ratio h^2) per token."""
        hidden = self.heads * self.head_dim
        return 2.0 * (4 + 2 * self.mlp_ratio) * self.batch * self.tokens * hidden ** 2


#: FLUX.1-dev at 1024x1024: 4096 image + 512 text tokens, 19 double + 38 single blocks.
FLUX = Model(heads=24, head_dim=128, tokens=4608, layers=57, parallel_mlp_layers=38)


@dataclass(frozen=True)
class Choice:
    """One parallel configuration.

    ``wire``: the codec of each travelling tensor, a :class:`fastusp_xdit.comm.codecs.WireSpec`
    spec string as ``usp_attention(wire=...)`` takes it, any codec: ``"none"``, ``"qvo"``,
    ``"qvo,k"``, ``"qvo,k,ring_kv"`` (bare items are e4m3), ``"qvo=int8,k=int8"``...
    ``pipelined``: the Ulysses all-to-alls pipelined with attention over ``chunks`` head groups,
    ``usp_attention(head_groups=chunks)`` (``chunks`` None = the best count; a no-op at Ulysses 1).
    ``packed``: one Q|K|V all-to-all and FastUSP's pipelined ring, or three all-to-alls (diffusers,
    stock xfuser) and a serial ring. ``staged``: ``usp_attention_staged`` (the registry's staged FLUX
    variant): V's, Q's and K's all-to-alls each issued after its projection, the output's behind a
    parallel MLP; one head group. (Formerly ``fp8`` and ``overlap``; profile JSON with those keys
    still loads.)
    """

    ulysses: int
    ring: int
    wire: str = "none"
    pipelined: bool = False
    packed: bool = True
    chunks: Optional[int] = None
    staged: bool = False


@dataclass(frozen=True)
class Link:
    """Time of one collective: ``latency_s + wire_bytes / bw(buffer_bytes)``; ``points``: (bytes, GB/s)."""

    latency_s: float
    points: tuple

    def bandwidth(self, buffer_bytes: float) -> float:
        """Bytes/s at this buffer size: linear in log(size) between points, clamped outside."""
        pts = sorted(self.points)
        if buffer_bytes <= pts[0][0]:
            return pts[0][1] * 1e9
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if buffer_bytes <= x1:
                t = math.log(buffer_bytes / x0) / math.log(x1 / x0)
                return (y0 + t * (y1 - y0)) * 1e9
        return pts[-1][1] * 1e9

    def time(self, buffer_bytes: float, wire_bytes: float) -> float:
        return self.latency_s + wire_bytes / self.bandwidth(buffer_bytes) if wire_bytes > 0 else 0.0


def fit_link(samples) -> Link:
    """Link from lone-call timings ``[(buffer_bytes, wire_bytes, seconds), ...]`` (two or more sizes).

    The latency is the intercept of a least-squares line of seconds over wire bytes (kept in
    ``[0, 0.9 * fastest call]``); each point's bandwidth is what remains after it, so the link
    reproduces every sample exactly.
    """
    if len({s[1] for s in samples}) < 2:
        raise ValueError("fit_link needs timings at two or more message sizes: measure more sizes")
    n = len(samples)
    mw = sum(s[1] for s in samples) / n
    mt = sum(s[2] for s in samples) / n
    slope = sum((s[1] - mw) * (s[2] - mt) for s in samples) / sum((s[1] - mw) ** 2 for s in samples)
    latency = min(max(mt - slope * mw, 0.0), 0.9 * min(s[2] for s in samples))
    return Link(latency, tuple(sorted((float(b), w / (t - latency) / 1e9) for b, w, t in samples)))


@dataclass(frozen=True)
class Measurement:
    """A measured step time, for :func:`validate`."""

    source: str
    model: Model
    choice: Choice
    seconds: float


@dataclass(frozen=True)
class Profile:
    """Measured rates of one machine (see :data:`PROFILES` for the meaning of each field)."""

    name: str
    attn_tflops: float
    dense_tflops: float
    copy_gbps: float
    codec_gbps: float
    ring_step_overhead: float
    head_group_ratios: tuple = ()
    a2a: Optional[Link] = None
    p2p: Optional[Link] = None
    measured_steps: tuple = field(default=())

    def to_dict(self) -> dict:
        """JSON-ready dict (the schema :meth:`from_dict` and ``--device-profile`` read)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(f"device profile lacks {', '.join(missing)}: start from a complete profile, e.g. "
                             f"--device-profile h200x2 --device-profile <file.json>")
        unknown = set(d) - set(_REQUIRED) - set(_OPTIONAL)
        if unknown:
            raise ValueError(f"unknown device profile keys {sorted(unknown)}: allowed are "
                             f"{', '.join(_REQUIRED + _OPTIONAL)}")
        links = {k: None if d.get(k) is None else Link(float(d[k]["latency_s"]),
                                                       tuple((float(b), float(g)) for b, g in d[k]["points"]))
                 for k in ("a2a", "p2p")}
        steps = tuple(Measurement(m["source"], Model(**m["model"]), _choice(m["choice"]), float(m["seconds"]))
                      for m in d.get("measured_steps", ()))
        return cls(name=str(d["name"]), **{k: float(d[k]) for k in _REQUIRED[1:]},
                   head_group_ratios=tuple((int(g), float(x)) for g, x in d.get("head_group_ratios", ())),
                   measured_steps=steps, **links)


def _choice(d: dict) -> Choice:
    """A Choice from its JSON dict; the former keys ``fp8`` / ``overlap`` are read as ``wire`` / ``pipelined``."""
    renamed = {"fp8": "wire", "overlap": "pipelined"}
    return Choice(**{renamed.get(k, k): v for k, v in d.items()})


_REQUIRED = ("name", "attn_tflops", "dense_tflops", "copy_gbps", "codec_gbps", "ring_step_overhead")
_OPTIONAL = ("head_group_ratios", "a2a", "p2p", "measured_steps")


def calibrate(profile: Profile, model: Model, step_1gpu_s: float) -> Profile:
    """Profile whose ``dense_tflops`` makes world 1 predict ``step_1gpu_s`` for ``model``.

    The entry point for measured step timings: pass a one-GPU step of the model being planned.
    """
    attention = model.layers * model.attention_flops() / (profile.attn_tflops * 1e12)
    if step_1gpu_s <= attention:
        raise ValueError(f"a one-GPU step of {step_1gpu_s * 1e3:.1f} ms is shorter than its attention alone "
                         f"({attention * 1e3:.1f} ms at {profile.attn_tflops:.0f} TFLOP/s): check the model shape")
    return replace(profile, dense_tflops=model.layers * model.dense_flops() / (step_1gpu_s - attention) / 1e12)


def _lone_calls(rows, wire_fraction: float) -> dict:
    """Link dict from DESIGN's lone-call rows ``[(buffer bytes, GB/s bus), ...]``."""
    link = fit_link([(b, b * wire_fraction, b * wire_fraction / (g * 1e9)) for b, g in rows])
    return {"latency_s": link.latency_s, "points": [list(p) for p in link.points]}


def _flux_tflops(ms_per_layer: float) -> float:
    return FLUX.attention_flops() / (ms_per_layer * 1e-3) / 1e12


def _with_step(d: dict, step_1gpu_s: float) -> dict:
    """``d`` with ``dense_tflops`` calibrated on a one-GPU FLUX step."""
    return {**d, "dense_tflops": calibrate(Profile.from_dict({**d, "dense_tflops": 1.0}), FLUX,
                                           step_1gpu_s).dense_tflops}


# ring_step_overhead, from two H100 rows of DESIGN section 3: "4-block ring on one GPU (flash +
# merge) vs one cuDNN call: compiled 2.1x slower" and "SDPA cuDNN / flash 613 / 335 TFLOP/s":
# four flash blocks + merges cost 2.1 * 335 / 613 = 1.148 flash calls, i.e. 4.9% per extra block.
_RING_STEP_OVERHEAD = (2.1 * 335 / 613 - 1) / 3

_H100 = {
    "name": "h100",
    "attn_tflops": 613.0,        # "SDPA at (1,24,4608,128): cuDNN 613 TFLOP/s" (H100)
    "copy_gbps": 3020.0,         # "HBM copy (read+write) 3020 GB/s" (H100)
    "codec_gbps": 2115.0,        # "FP8 per-(token,head) quant in torch: compiled 2115 GB/s" (H100)
    "ring_step_overhead": _RING_STEP_OVERHEAD,
    # a2a / p2p: DESIGN section 3 has no multi-GPU H100 measurement; pass a dist_layer.py result.
}
_H200X2 = {
    "name": "h200x2",
    # "one GPU, whole sequence (cuDNN) 0.404 ms" (FLUX layer table, 2xH200): 646 TFLOP/s.
    "attn_tflops": _flux_tflops(0.404),
    "copy_gbps": 3020.0,         # "HBM copy 3020 GB/s": the H100 row, no H200 row (a lower bound on H200)
    "codec_gbps": 2115.0,        # "FP8 quant compiled 2115 GB/s": the H100 row, no H200 row
    "ring_step_overhead": _RING_STEP_OVERHEAD,  # H100 rows, see above
    # One H200: 12 heads (a Ulysses-2 rank's) in G cuDNN calls / one call (benchmarks/results/micro-h200.json).
    "head_group_ratios": [[2, 1.021], [3, 1.490], [4, 1.775], [6, 2.599]],
    # "NCCL all_to_all_single, 8 MB / 64 MB buffer, each call timed alone: 56 / 241 GB/s bus" (2 ranks:
    # half the buffer crosses the link) -> 63 us latency, 456 GB/s.
    "a2a": _lone_calls([(8e6, 56.0), (64e6, 241.0)], wire_fraction=0.5),
    # "NCCL p2p 8 MB / 64 MB, each call timed alone: 65 / 268 GB/s" -> 107 us latency, 484 GB/s.
    "p2p": _lone_calls([(8e6, 65.0), (64e6, 268.0)], wire_fraction=1.0),
    # "diffusers context parallel Ulysses-2 step: compiled 89.3 ms" (separate Q/K/V all-to-alls).
    "measured_steps": [{"source": "DESIGN 3: diffusers Ulysses-2 compiled step", "model": asdict(FLUX),
                        "choice": asdict(Choice(2, 1, packed=False)), "seconds": 89.3e-3}],
}
#: Built-in profiles (JSON schema of :meth:`Profile.to_dict`), compiled execution, bf16. dense_tflops
#: from "one transformer step, 1 GPU: compiled 130.7 ms (H100) / 134.8 ms (2xH200)".
PROFILES = {"h200x2": _with_step(_H200X2, 134.8e-3), "h100": _with_step(_H100, 130.7e-3)}


def load_profile(specs) -> Profile:
    """Profile from names in :data:`PROFILES` and/or JSON paths, later ones overriding earlier fields."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    merged: dict = {}
    for spec in specs:
        if spec in PROFILES:
            d = PROFILES[spec]
        elif os.path.isfile(spec):
            with open(spec) as f:
                d = json.load(f)
            d = d.get("profile", d)
        else:
            raise ValueError(f"unknown device profile {spec!r}: use one of {', '.join(PROFILES)} or the path "
                             f"of a JSON profile (benchmarks/results/*.json)")
        merged.update(d)
    return Profile.from_dict(merged)


@dataclass(frozen=True)
class Prediction:
    """Per-step seconds of one choice; ``comm_s`` is communication left exposed (not hidden).

    ``variant``: the registry variant (``--attention_backend`` name) that runs ``choice``, or ``"-"``
    where only ``usp_attention`` arguments do (:func:`variant_of`).
    """

    choice: Choice
    step_s: float
    rest_s: float
    attention_s: float
    comm_s: float
    layout_s: float
    variant: str = "-"


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


def _validate(model: Model, profile: Profile, choice: Choice, world: Optional[int]):
    for name in ("heads", "head_dim", "tokens", "layers", "batch"):
        _check(getattr(model, name) >= 1, f"{name} must be >= 1, got {getattr(model, name)}")
    _check(0 <= model.parallel_mlp_layers <= model.layers,
           f"parallel_mlp_layers must be in [0, layers={model.layers}], got {model.parallel_mlp_layers}")
    u, r = choice.ulysses, choice.ring
    _check(u >= 1 and r >= 1, f"ulysses ({u}) and ring ({r}) must be >= 1")
    _check(isinstance(choice.wire, str),
           f"wire must be a spec string such as 'none', 'qvo,k' or 'qvo=int8,k=int8', got {choice.wire!r}")
    WireSpec.parse(choice.wire)  # raises ValueError naming the accepted words
    _check(world is None or u * r == world, f"ulysses {u} x ring {r} = {u * r} does not factor world size "
           f"{world}: pick degrees whose product is {world}")
    _check(u <= model.heads, f"ulysses degree {u} exceeds the {model.heads} heads: use ulysses <= {model.heads} "
           f"and put the rest of the world in the ring degree")
    _check(model.tokens >= u * r, f"{model.tokens} tokens cannot be split over {u * r} ranks: use fewer ranks")
    for kind, deg, link in (("a2a", u, profile.a2a), ("p2p", r, profile.p2p)):
        _check(deg == 1 or link is not None,
               f"profile {profile.name!r} has no {kind} measurements: run benchmarks/dist_layer.py on this "
               f"machine and pass --device-profile {profile.name} "
               f"--device-profile benchmarks/results/dist_layer-cuda-w<N>.json")
    _check(not (choice.staged and (choice.pipelined or not choice.packed)),
           "staged runs its own all-to-all schedule with one head group: pass staged=True alone")
    if choice.chunks is not None:
        heads = min(layout.head_split(model.heads, model.heads, u)[0])
        _check(1 <= choice.chunks <= heads, f"chunks={choice.chunks} must be in [1, {heads}], the heads per "
               f"Ulysses rank")


def _pipeline(ins, comps, outs) -> float:
    """Link runs every input chunk, then outputs as they become ready; compute runs chunk g after its input."""
    link = comp = 0.0
    done = []
    for a, c in zip(ins, comps):
        link += a
        comp = max(comp, link) + c
        done.append(comp)
    for d, o in zip(done, outs):
        link = max(link, d) + o
    return link


def _layer(model: Model, p: Profile, ch: Choice, parallel_mlp: bool = False) -> tuple:
    """(total, compute, layout) seconds of one attention layer on one rank, and the chunk count used;
    ``parallel_mlp``: the layer's MLP can hide a staged output all-to-all."""
    u, r, d = ch.ulysses, ch.ring, model.head_dim
    spec = WireSpec.parse(ch.wire)
    heads = max(layout.head_split(model.heads, model.heads, u)[0])
    block = max(layout.block_sizes(model.tokens, u, r))
    shard = max(layout.shard_sizes(model.tokens, u, r))

    # Wire bytes of each tensor from its codec (bf16 inputs): one of Q/K/V/O is this rank's shard, all
    # heads, token-major as the all-to-all sends it; the ring sends this rank's K and V block.
    a2a_shape = (shard, model.batch, model.heads, d)
    ring_shape = (block, model.batch, heads, d)
    tensor = math.prod(a2a_shape) * _BF16
    half = math.prod(ring_shape) * _BF16  # the ring's K (or V) block in bf16
    sent = {t: spec.codec(t).nbytes(a2a_shape, torch.bfloat16) for t in "qkvo"}
    ring_sent = {t: spec.codec(t).nbytes(ring_shape, torch.bfloat16) for t in ("ring_k", "ring_v")}
    kv_wire = sum(ring_sent.values())

    compute = 4.0 * model.batch * heads * block * model.tokens * d / (p.attn_tflops * 1e12)
    compute *= 1 + p.ring_step_overhead * (r - 1)

    def ring(frac: float) -> float:
        """Attention of ``frac`` of the local heads; R-1 K/V transfers, hidden behind compute in FastUSP's ring."""
        step_c = compute * frac / r
        xfer = p.p2p.time(kv_wire * frac, kv_wire * frac) if r > 1 else 0.0
        hidden = ch.packed or ch.pipelined or ch.staged
        return (r - 1) * max(step_c, xfer) + step_c if hidden else r * step_c + (r - 1) * xfer

    # Layout work, bytes read + written: a pack/unpack copy per raw tensor sent (two unpacked), an
    # encode and a decode per lossy tensor (bf16 side + wire side), lossy ring blocks decoded on arrival.
    codec = copy = 0.0
    if u > 1:
        for t in "qkvo":
            if spec.codec(t).lossy:
                codec += 2 * (tensor + sent[t])
            else:
                copy += (1 if ch.packed else 2) * 2 * tensor
    if r > 1:
        for t, nbytes in ring_sent.items():
            if spec.codec(t).lossy:
                codec += r * (half + nbytes)  # encode the own block, decode R-1 arrivals
            elif u == 1:
                copy += 2 * half  # K and V packed into one ring block
    lay = codec / (p.codec_gbps * 1e9) + copy / (p.copy_gbps * 1e9)
    if u == 1:
        return ring(1.0) + lay, compute, lay, 1

    def a2a(buf):
        return p.a2a.time(buf, buf * (u - 1) / u)

    if ch.staged:  # projections and the MLP are in the rest of the step: only what they cannot hide counts
        hidden = model.heads * d
        proj = 2.0 * model.batch * shard * hidden ** 2 / (p.dense_tflops * 1e12)  # one of V, Q, K
        link = 0.0
        for i, t in enumerate("vqk", 1):  # V, Q, K, each after its projection
            link = max(link, i * proj) + a2a(sent[t])
        out = a2a(sent["o"])
        mlp = 2.0 * model.batch * shard * hidden * model.mlp_ratio * hidden / (p.dense_tflops * 1e12)
        return link - 3 * proj + ring(1.0) + (max(0.0, out - mlp) if parallel_mlp else out) + lay, compute, lay, 1

    ratios = dict(p.head_group_ratios)

    def ulysses(g: int) -> float:
        fracs = [h / heads for h in layout.split_sizes(heads, g)]
        qkv = [a2a((sent["q"] + sent["k"] + sent["v"]) * f) if ch.packed else
               sum(a2a(sent[t] * f) for t in "qkv") for f in fracs]
        comps = [ring(f) * ratios.get(g, 1.0) for f in fracs]
        outs = [a2a(sent["o"] * f) for f in fracs]
        return _pipeline(qkv, comps, outs)

    if ch.pipelined:
        most = min(layout.head_split(model.heads, model.heads, u)[0])
        counts = [1] + [g for g, _ in p.head_group_ratios if 1 < g <= most] if p.head_group_ratios else \
            range(1, most + 1)
        g = min([ch.chunks] if ch.chunks else counts, key=ulysses)
    else:
        g = 1
    return ulysses(g) + lay, compute, lay, g


def _head_groups(variant) -> int:
    return int(variant.usp_kwargs.get("head_groups", 1))


def _priced(variant) -> bool:
    """Whether the model prices everything the variant changes (its usp_attention arguments)."""
    return set(variant.usp_kwargs) <= {"wire", "head_groups"}


def variant_of(choice: Choice) -> str:
    """The registry variant (:data:`fastusp_xdit.xdit.variants.VARIANTS`) that runs ``choice``, else ``"-"``.

    It matches when its wire spec equals ``choice.wire`` (as parsed), its staged flag ``choice.staged``
    and its head groups the choice's (``chunks`` when ``pipelined``, else 1; at Ulysses 1, where
    there are no head groups, 1). Unpacked choices (diffusers' separate all-to-alls) run no variant;
    a pipelined choice with ``chunks`` 1 runs what the unpipelined one does.
    """
    wire = WireSpec.parse(choice.wire)
    groups = choice.chunks if choice.pipelined and choice.ulysses > 1 else 1
    for v in VARIANTS.values():
        if (_priced(v) and choice.packed and v.staged == choice.staged and _head_groups(v) == groups
                and WireSpec.parse(v.wire) == wire):
            return v.name
    return "-"


def predict(model: Model, profile: Profile, choice: Choice) -> Prediction:
    """Predicted step of ``model`` under ``choice`` (world = ulysses x ring)."""
    _validate(model, profile, choice, None)
    world = choice.ulysses * choice.ring
    layer, compute, lay, g = _layer(model, profile, choice)
    rest = model.layers * model.dense_flops() / (profile.dense_tflops * 1e12) / world
    n = model.layers
    par = min(model.parallel_mlp_layers, n) if choice.staged else 0
    layers = (n - par) * layer + (par * _layer(model, profile, choice, parallel_mlp=True)[0] if par else 0.0)
    resolved = replace(choice, chunks=g)
    return Prediction(resolved, rest + layers, rest, n * compute, layers - n * (compute + lay), n * lay,
                      variant_of(resolved))


def wire_specs(wire_on: Optional[str] = "qvo,k,ring_kv") -> list:
    """The wire specs :func:`plan` considers, canonical and deduplicated: ``"none"``, every registry
    variant's, then ``wire_on`` (None: no extra)."""
    out: list = []
    for spec in ("none", *(v.wire for v in VARIANTS.values()), *([wire_on] if wire_on is not None else [])):
        canonical = str(WireSpec.parse(spec))
        if canonical not in out:
            out.append(canonical)
    return out


def plan(model: Model, profile: Profile, world: int, ulysses: Optional[int] = None,
         ring: Optional[int] = None, wire_on: Optional[str] = "qvo,k,ring_kv") -> list:
    """Predictions for every (ulysses, ring, wire, pipelined, staged) with ulysses x ring == world, fastest first.

    ``ulysses`` / ``ring`` restrict the degrees. The wire specs are :func:`wire_specs` (``"none"``,
    the registry variants', ``wire_on``: default e4m3 on every tensor sent); each runs plain and,
    where Ulysses > 1, pipelined (the best head-group count; left out when that is one group, the
    plain row) and staged; every registry variant's own head-group count is priced too where it
    differs from the best one. Wire and modes vary only where there is communication (world > 1).
    Each prediction's ``variant`` names the registry variant that runs it, or ``"-"``.
    """
    _check(world >= 1, f"world size must be >= 1, got {world}")
    for name, deg in (("ulysses", ulysses), ("ring", ring)):
        _check(deg is None or (deg >= 1 and world % deg == 0),
               f"{name} degree {deg} does not divide world size {world}: pick a divisor of {world}")
    if ulysses is not None and ring is not None:
        _validate(model, profile, Choice(ulysses, ring), world)
    modes = ((False, False), (True, False), (False, True))  # (pipelined, staged)
    flags = [("none", False, False)] if world == 1 else \
        [(w, pl, st) for w in wire_specs(wire_on) for pl, st in modes]
    out: dict = {}  # resolved choice -> prediction; one group pipelined is the plain row, a fixed count may be the best
    for u in range(1, min(world, model.heads) + 1):
        r = world // u
        if world % u or (ulysses is not None and u != ulysses) or (ring is not None and r != ring):
            continue
        # head groups and staging need an all-to-all (Ulysses > 1)
        choices = [Choice(u, r, w, pl, staged=st) for w, pl, st in flags if u > 1 or not (pl or st)]
        most = min(layout.head_split(model.heads, model.heads, u)[0])
        if u > 1:  # each registry variant's own head-group count
            choices += [Choice(u, r, v.wire, True, chunks=_head_groups(v)) for v in VARIANTS.values()
                        if _priced(v) and not v.staged and 1 < _head_groups(v) <= most]
        for choice in choices:
            _validate(model, profile, choice, world)
            pred = predict(model, profile, choice)
            c = pred.choice
            out.setdefault(replace(c, pipelined=False) if c.pipelined and c.chunks == 1 else c, pred)
    _check(bool(out), f"no ulysses x ring factorization of world {world} has ulysses <= {model.heads} heads: "
           f"use a ring degree of at least {math.ceil(world / model.heads)}")
    return sorted(out.values(), key=lambda p: p.step_s)


def validate(profile: Profile) -> list:
    """``[(measurement, predicted seconds, relative error), ...]`` for the profile's measured steps."""
    rows = []
    for m in profile.measured_steps:
        pred = predict(m.model, profile, m.choice).step_s
        rows.append((m, pred, pred / m.seconds - 1))
    return rows


def format_table(preds: list, step_1gpu_s: float) -> str:
    ww = max([len("wire")] + [len(p.choice.wire) for p in preds])
    vw = max([len("variant")] + [len(p.variant) for p in preds])
    head = f"{'#':>2} {'ulysses':>7} {'ring':>4} {'wire':>{ww}} {'pipelined':>9} {'chunks':>6} {'staged':>6} " \
           f"{'variant':>{vw}} {'attn ms':>8} {'comm ms':>8} {'layout ms':>9} {'step ms':>8} {'speedup':>7}"
    lines = [head, "-" * len(head)]
    for i, p in enumerate(preds, 1):
        c = p.choice
        lines.append(f"{i:>2} {c.ulysses:>7} {c.ring:>4} {c.wire:>{ww}} "
                     f"{'on' if c.pipelined else 'off':>9} {c.chunks:>6} {'on' if c.staged else 'off':>6} "
                     f"{p.variant:>{vw}} {p.attention_s * 1e3:>8.2f} "
                     f"{p.comm_s * 1e3:>8.2f} {p.layout_s * 1e3:>9.2f} {p.step_s * 1e3:>8.2f} "
                     f"{step_1gpu_s / p.step_s:>6.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastusp_xdit.apps.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, default=FLUX.heads)
    ap.add_argument("--head-dim", type=int, default=FLUX.head_dim)
    ap.add_argument("--tokens", type=int, default=FLUX.tokens, help="sequence length, joint text tokens included")
    ap.add_argument("--layers", type=int, default=FLUX.layers, help="attention layers per step")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--mlp-ratio", type=float, default=FLUX.mlp_ratio)
    ap.add_argument("--parallel-mlp-layers", type=int, default=FLUX.parallel_mlp_layers,
                    help="layers whose MLP does not read the attention output (FLUX: its 38 single-stream blocks)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--ulysses", type=int, help="only this Ulysses degree")
    ap.add_argument("--ring", type=int, help="only this ring degree")
    ap.add_argument("--device-profile", action="append",
                    help=f"{' | '.join(PROFILES)} | JSON file; repeat to override fields (default h200x2)")
    ap.add_argument("--wire", "--fp8", dest="wire", default="qvo,k,ring_kv",
                    help="a wire spec to consider besides 'none' and the registry variants' (default: e4m3 on "
                         "every tensor sent; e.g. 'qvo=int8,k=int8,ring_kv=int8'); --fp8 is its former name")
    ap.add_argument("--step-1gpu-ms", type=float,
                    help="measured one-GPU step of this model: recalibrates dense_tflops")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    try:
        profile = load_profile(args.device_profile or ["h200x2"])
        model = Model(args.heads, args.head_dim, args.tokens, args.layers, args.batch, args.mlp_ratio,
                      args.parallel_mlp_layers)
        if args.step_1gpu_ms is not None:
            profile = calibrate(profile, model, args.step_1gpu_ms * 1e-3)
        preds = plan(model, profile, args.world, args.ulysses, args.ring, args.wire)
        single = predict(model, profile, Choice(1, 1)).step_s
        checks = validate(profile)
    except ValueError as e:
        ap.error(str(e))
    if args.json:
        print(json.dumps({"model": asdict(model), "world": args.world, "profile": profile.name,
                          "step_1gpu_s": single, "predictions": [asdict(p) for p in preds],
                          "validation": [{"source": m.source, "measured_s": m.seconds, "predicted_s": s,
                                          "rel_err": e} for m, s, e in checks]}, indent=1))
        return 0
    print(f"profile {profile.name}, {model}, world {args.world}; predicted 1-GPU step {single * 1e3:.1f} ms")
    print(format_table(preds, single))
    for m, s, e in checks:
        print(f"check: {m.source}: measured {m.seconds * 1e3:.1f} ms, model {s * 1e3:.1f} ms ({e:+.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
