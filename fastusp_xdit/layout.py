"""Sequence and head partitioning shared by every rank.

Every size here is a pure function of global shapes and degrees, so all ranks derive identical split
sizes, offsets and rotation schedules without exchanging anything (no host gather, no ``.item()``).

Convention: a global sequence of ``length`` tokens is sharded over the ``U * R`` sequence-parallel
ranks in balanced contiguous pieces (the first ``length % n`` shards get one extra token), ordered by
``sp_rank = ring_rank * U + ulysses_rank`` -- Ulysses groups are contiguous, ring groups strided,
as yunchang and xfuser build them. A ring rank's *block* is the concatenation of its Ulysses group's
shards.
"""
from __future__ import annotations


def split_sizes(total: int, parts: int) -> list[int]:
    """Balanced contiguous split of ``total`` items into ``parts`` pieces (larger pieces first)."""
    if parts <= 0:
        raise ValueError(f"parts must be positive, got {parts}")
    base, extra = total // parts, total % parts  # not divmod: SymInts under torch.compile lack it
    return [base + (1 if i < extra else 0) for i in range(parts)]


def offsets(sizes: list[int]) -> list[int]:
    """Exclusive prefix sums of ``sizes``."""
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def shard_sizes(length: int, ulysses: int, ring: int) -> list[int]:
    """Tokens held by each sequence-parallel rank, indexed by ``ring_rank * ulysses + ulysses_rank``."""
    return split_sizes(length, ulysses * ring)


def block_sizes(length: int, ulysses: int, ring: int) -> list[int]:
    """Tokens in each ring rank's block after the Ulysses all-to-all."""
    shards = shard_sizes(length, ulysses, ring)
    return [sum(shards[r * ulysses:(r + 1) * ulysses]) for r in range(ring)]


def head_split(q_heads: int, kv_heads: int, ulysses: int) -> tuple[list[int], list[int]]:
    """Query and key/value heads per Ulysses rank.

    K/V heads are split in balanced contiguous chunks; each rank takes the query heads that attend to
    its K/V heads (``q_heads / kv_heads`` per K/V head), so grouped-query attention stays exact.
    """
    group = q_heads // kv_heads
    kv = split_sizes(kv_heads, ulysses)
    return [group * h for h in kv], kv


def shard(x, dim: int, length_rank: int, ulysses: int, ring: int):
    """This rank's shard of a global tensor along ``dim`` (``length_rank`` = its sp rank)."""
    sizes = shard_sizes(x.shape[dim], ulysses, ring)
    return x.narrow(dim, offsets(sizes)[length_rank], sizes[length_rank])


def chunk_sizes(total: int, parts: int) -> list[int]:
    """Lengths of ``torch.chunk(x, parts)`` along a dimension of ``total`` items, padded to ``parts`` entries.

    torch.chunk gives every chunk ``ceil(total / parts)`` items and the last one the rest, so it can
    return fewer than ``parts`` chunks (``chunk(5 items, 4)`` -> 2, 2, 1): the missing ones are 0 here
    (xfuser's ``torch.chunk(...)[rank]`` raises ``IndexError`` on such a rank). ``total = 0`` gives
    ``parts`` zeros, as torch.chunk does.
    """
    if parts <= 0:
        raise ValueError(f"parts must be positive, got {parts}")
    if total <= 0:
        return [0] * parts
    size = -(-total // parts)
    return [max(0, min(size, total - i * size)) for i in range(parts)]


def padded_chunk_real(total: int, parts: int) -> tuple[list[int], list[int]]:
    """xfuser's pad-then-chunk layout: (rows each rank holds, real rows among them, pad at the end).

    xfuser pads ``total`` with zeros to the next multiple of ``parts`` and ``torch.chunk``s it, so every
    rank holds ``ceil(total / parts)`` rows; the last ``pad`` rows overall are zeros.
    """
    size = -(-total // parts) if total > 0 else 0
    return [size] * parts, [max(0, min(size, total - i * size)) for i in range(parts)]
