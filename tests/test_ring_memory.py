"""The pipelined ring keeps at most two K/V blocks alive (computed + in flight), whatever its degree."""
import weakref

import pytest
import torch

from fastusp_xdit.launch import run_distributed


def ring_liveness_worker(ring: int, seed: int) -> dict:
    """Track every K/V block the ring touches; count the live ones at each attention call."""
    import fastusp_xdit.usp as usp
    from fastusp_xdit import layout
    from fastusp_xdit.groups import usp_groups

    tracked, live_counts, shifts = [], [], []
    real_shift, real_attend = usp.ring_shift, usp._attend

    def shift(x, rows, group):
        base = x._base if x._base is not None else x
        if not any(ref() is base for ref in tracked):
            tracked.append(weakref.ref(base))
        out = real_shift(x, rows, group)
        tracked.append(weakref.ref(out))
        shifts.append(rows)
        return out

    def attend(q_tm, k_tm, v_tm, scale, backend):
        live_counts.append(sum(ref() is not None for ref in tracked))
        return real_attend(q_tm, k_tm, v_tm, scale, backend)

    usp.ring_shift, usp._attend = shift, attend
    _, rg = usp_groups(1, ring)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 64 * ring + 3, 8, generator=g) for _ in range(3))
    loc = [layout.shard(t, 2, rg.rank(), 1, ring) for t in (q, k, v)]
    usp.usp_attention(*loc, ring_group=rg, seq_len_q=q.shape[2], seq_len_kv=k.shape[2])
    return {"live": live_counts, "shifts": shifts}


@pytest.mark.parametrize("ring", [4])
def test_at_most_two_blocks_alive(ring, seed):
    for rank, res in enumerate(run_distributed(ring_liveness_worker, ring, ring, seed, timeout=90)):
        assert len(res["shifts"]) == ring - 1, res
        assert len(res["live"]) == ring and max(res["live"]) <= 2, f"rank {rank}: live blocks per step {res['live']}"
