"""Cross-rank agreement check: every sequence-parallel rank must plan the same collectives.

``usp_attention`` derives every split size from global shapes, so ranks that were handed different
configurations (another global length, dtype, FP8 spec, joint strategy...) would issue mismatched
collectives: a hang until the collective timeout, a transport error, or silently wrong output.
:func:`check_same_plan` all-gathers a fixed-length int64 encoding of the call (:data:`FIELDS`) over
the Ulysses and ring groups (two tiny collectives before any data collective) and raises the same
``ValueError`` on every rank, naming the ranks and fields that differ.

Policy (:func:`due`): the check runs on the first call of a process, on every call when
``FASTUSP_CHECK_CONSISTENCY=1``, never when it is ``0``, and never while ``torch.compile`` traces
(a compiled graph holds no check). With ``1`` (the debugging mode) FP8 calls also refuse inputs
holding inf/nan on every rank: the codec turns such a row into an all-NaN row, which some attention
kernels silently turn into zeros; the test costs a pass over the inputs, hence only there.

The first-call rule needs no communication to stay consistent: the ranks of one sequence-parallel
group run the same program on the same schedule (SPMD), so their first calls are the same call and
all of them take part. The variable must have the same value on every rank (launchers copy the
environment).
"""
from __future__ import annotations

import os
import struct

import torch
import torch.distributed as dist

from .. import layout
from ..comm.codecs import CODECS, TENSORS, WireSpec

ENV = "FASTUSP_CHECK_CONSISTENCY"

FIELDS = (
    "rank",  # global rank (names the rank; may differ)
    "arguments_rejected",  # 1 if this rank's own argument validation raised ValueError
    "ulysses", "ring",
    "batch", "heads_q", "heads_kv", "head_dim",
    "dtype_q", "dtype_kv",
    "seq_len_q", "seq_len_kv",  # global lengths, as passed or derived (local x U x R)
    "local_len_q", "local_len_kv",  # this rank's shard (may differ: checked against the layout)
    "joint_strategy", "joint_len_q", "joint_len_kv",
    "shards_q", "shards_kv",  # 63-bit digest of an explicit layout (0: the balanced one)
    "wire",  # codec index per tensor, 4 bits each in TENSORS order; -1 unparseable
    "scale",  # float64 bits of the effective softmax scale
    "kv_hook",
    "head_groups",  # as requested (-1 if not an int)
    "nonfinite_fp8_input",  # 1 if FP8 is on and an input holds inf/nan (FASTUSP_CHECK_CONSISTENCY=1 only)
)
PER_RANK = ("rank", "local_len_q", "local_len_kv", "nonfinite_fp8_input")
_DTYPES = (None, torch.float16, torch.bfloat16, torch.float32, torch.float64)
_JOINT = (None, "front", "rear")

_first_call_pending = True


def due() -> bool:
    """Whether this call is checked (see the module docstring); consumes the first-call turn."""
    global _first_call_pending
    if torch.compiler.is_compiling():
        return False
    mode = os.environ.get(ENV, "")
    if mode not in ("", "0", "1"):
        raise ValueError(f"{ENV}={mode!r}: set it to 1 (check every call), 0 (never) or leave it unset "
                         "(check the first call)")
    first, _first_call_pending = _first_call_pending, False
    return mode == "1" or (mode == "" and first)


def _dim(t, i: int) -> int:
    return t.shape[i] if isinstance(t, torch.Tensor) and t.dim() > i else -1


def _code(value, table) -> int:
    return table.index(value) if value in table else len(table)


def _global_len(given, local: int, n: int) -> int:
    if given is None:
        return local * n if local >= 0 else -1
    try:
        return int(given)
    except (TypeError, ValueError):
        return -1


_CODEC_NAMES = tuple(CODECS)


def _wire_bits(wire) -> int:
    try:
        spec = WireSpec.of(wire)
    except ValueError:
        return -1
    return sum(_CODEC_NAMES.index(getattr(spec, t)) << 4 * i for i, t in enumerate(TENSORS))


def _wire_of(bits: int) -> WireSpec:
    return WireSpec(**{t: _CODEC_NAMES[bits >> 4 * i & 15] for i, t in enumerate(TENSORS)})


def _shards_digest(shards) -> int:
    if shards is None:
        return 0
    try:
        return hash(tuple(int(s) for s in shards)) & (2**62 - 1) | 1
    except (TypeError, ValueError):
        return -1


def _float_bits(x) -> int:
    try:
        return struct.unpack("<q", struct.pack("<d", float(x)))[0]
    except (TypeError, ValueError, OverflowError):
        return -1


def _nonfinite(tensors) -> int:
    return int(any(isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
                   for t in tensors))


def call_signature(query, key, value, *, ulysses_group, ring_group, seq_len_q, seq_len_kv, joint, joint_strategy,
                   scale, kv_hook, wire, rejected: bool, head_groups=1, shards_q=None, shards_kv=None,
                   values: bool = False) -> tuple[int, ...]:
    """Encode one ``usp_attention`` call as ``len(FIELDS)`` ints; unreadable arguments encode as -1.
    ``values``: also test 8-bit inputs for inf/nan (a pass over them and a host sync)."""
    u = 1 if ulysses_group is None else ulysses_group.size()
    r = 1 if ring_group is None else ring_group.size()
    jq, jk, jv = joint
    head_dim = _dim(query, 3)
    wire_bits = _wire_bits(wire)
    if scale is None and head_dim > 0:
        scale = head_dim ** -0.5
    sig = dict(
        rank=dist.get_rank(), arguments_rejected=int(rejected), ulysses=u, ring=r,
        batch=_dim(query, 0), heads_q=_dim(query, 1), heads_kv=_dim(key, 1), head_dim=head_dim,
        dtype_q=_code(getattr(query, "dtype", None), _DTYPES), dtype_kv=_code(getattr(key, "dtype", None), _DTYPES),
        seq_len_q=_global_len(seq_len_q, _dim(query, 2), u * r),
        seq_len_kv=_global_len(seq_len_kv, _dim(key, 2), u * r),
        local_len_q=_dim(query, 2), local_len_kv=_dim(key, 2),
        joint_strategy=_code(joint_strategy, _JOINT),
        joint_len_q=0 if jq is None else _dim(jq, 2), joint_len_kv=0 if jk is None else _dim(jk, 2),
        shards_q=_shards_digest(shards_q), shards_kv=_shards_digest(shards_kv),
        wire=wire_bits, scale=_float_bits(scale) if scale is not None else -1, kv_hook=int(kv_hook is not None),
        head_groups=head_groups if isinstance(head_groups, int) else -1,
        nonfinite_fp8_input=_nonfinite((query, key, value, jq, jk, jv)) if values and wire_bits > 0 else 0,
    )
    return tuple(sig[f] for f in FIELDS)


def _show(field: str, v: int) -> str:
    if field.startswith("dtype"):
        return ("non-tensor", "float16", "bfloat16", "float32", "float64", "other")[v]
    if field == "joint_strategy":
        return repr(_JOINT[v]) if v < len(_JOINT) else "invalid"
    if field == "wire":
        return "invalid" if v < 0 else repr(str(_wire_of(v)))
    if field == "scale":
        return "invalid" if v == -1 else f"{struct.unpack('<d', struct.pack('<q', v))[0]:.6g}"
    return str(v)


def _gather(sig: tuple[int, ...], groups, device) -> list[list[int]]:
    """All signatures of the sequence-parallel replica, in sequence-parallel rank order
    (ring-major: the Ulysses gather first, then the ring gather of the Ulysses rows)."""
    rows = torch.tensor(sig, dtype=torch.int64, device=device)
    for group in groups:
        if group is not None and group.size() > 1:
            parts = [torch.empty_like(rows) for _ in range(group.size())]
            dist.all_gather(parts, rows, group=group)
            rows = torch.cat(parts)
    return rows.view(-1, len(sig)).tolist()


def _layout_problems(table: list[dict]) -> list[str]:
    """Local lengths that do not match the layout of the (agreed) global length."""
    problems = []
    for sp, row in enumerate(table):
        for kind in ("q", "kv"):
            total, local = row[f"seq_len_{kind}"], row[f"local_len_{kind}"]
            if total < 0 or row["ulysses"] < 1 or row["ring"] < 1 or row[f"shards_{kind}"]:
                continue
            want = layout.shard_sizes(total, row["ulysses"], row["ring"])[sp]
            if local != want:
                problems.append(f"rank {row['rank']} (sequence-parallel rank {sp}) holds {local} "
                                f"{'query' if kind == 'q' else 'key/value'} tokens where seq_len_{kind}={total} "
                                f"gives it {want}")
    return problems


def _device(groups) -> torch.device:
    """Where a collective on ``groups`` can run: CPU if their backend is gloo, else this rank's GPU."""
    backend = str(dist.get_backend(next(g for g in groups if g is not None))).lower()
    return torch.device("cpu") if "gloo" in backend else torch.device("cuda", torch.cuda.current_device())


def check_same_plan(signature: tuple[int, ...], groups, device: torch.device | None = None) -> None:
    """Raise ``ValueError`` on every rank of ``groups = (ulysses_group, ring_group)`` if their
    ``signature`` (see :func:`call_signature`) disagree; the message is identical on every rank.

    ``device``: where the int64 tensor goes, the inputs' device (CPU for gloo, the rank's GPU for
    NCCL); by default derived from the groups' backend. Nothing happens for trivial groups.
    """
    if len(signature) != len(FIELDS):
        raise ValueError(f"signature has {len(signature)} fields, expected {len(FIELDS)} ({', '.join(FIELDS)})")
    if all(g is None or g.size() == 1 for g in groups):
        return
    device = _device(groups) if device is None else device
    table = [dict(zip(FIELDS, row)) for row in _gather(signature, groups, device)]
    problems, rejected = [], None
    for field in FIELDS:
        if field in PER_RANK:
            continue
        values: dict[int, list[int]] = {}
        for row in table:
            values.setdefault(row[field], []).append(row["rank"])
        if len(values) > 1 and field == "arguments_rejected":
            rejected = (f"ranks {values[1]} rejected their arguments (their own ValueError is chained to this "
                        f"one there), ranks {values[0]} accepted them")
        elif len(values) > 1:
            problems.append(f"{field} differs: " + ", ".join(f"{_show(field, v)} on ranks {ranks}"
                                                             for v, ranks in values.items()))
    if not problems:
        problems = _layout_problems(table)
    nonfinite = [row["rank"] for row in table if row["nonfinite_fp8_input"]]
    if nonfinite:
        problems.append(f"ranks {nonfinite} hold inf/nan in query/key/value, which FP8 communication cannot carry "
                        f"(fix the input, or pass fp8=None)")
    if rejected:
        problems.append(rejected)
    if problems:
        raise ValueError(
            f"usp_attention: the {len(table)} sequence-parallel ranks {[row['rank'] for row in table]} cannot run "
            f"this call: {'; '.join(problems)}. Every rank must pass the same global lengths, head counts, "
            f"head_dim, dtypes, joint tensors and options, each with its own shard (fastusp_xdit.layout.shard); "
            f"{ENV}=0 turns this check off.")


def check_call(query, key, value, *, rejected: Exception | None, **call) -> None:
    """``usp_attention``'s hook, right after its argument validation: when :func:`due`, check that
    all ranks agree (``call`` = the keyword arguments of :func:`call_signature` but ``rejected``);
    then re-raise this rank's own validation error ``rejected``, if any.

    A rank-local rejection (e.g. one rank's shard does not match the global length) thus reaches the
    other ranks as a ``ValueError`` instead of stranding them in a collective; the rejecting rank's
    own message is chained as ``__cause__``.
    """
    groups = (call["ulysses_group"], call["ring_group"])
    if due() and any(g is not None and g.size() > 1 for g in groups):
        sig = call_signature(query, key, value, rejected=rejected is not None, values=os.environ.get(ENV) == "1",
                             **call)
        device = next((t.device for t in (query, key, value) if isinstance(t, torch.Tensor)), torch.device("cpu"))
        try:
            check_same_plan(sig, groups, device)
        except ValueError as report:
            raise report from rejected
    if rejected is not None:
        raise rejected
