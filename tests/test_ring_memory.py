"""The pipelined ring holds at most two K/V blocks (computed + in flight), whatever its degree,
and issues each block's transfer before computing on the previous one."""
import weakref

import pytest
import torch

from fastusp_xdit.apps.launch import run_distributed


def ring_liveness_worker(ring: int, seed: int) -> dict:
    """Track every K/V block the ring touches; count the ones still referenced at each attention.

    The real collective gets a copy of the block, so a finished collective that the backend releases
    late (gloo's worker thread) cannot keep a tracked block alive: what is counted is the algorithm's
    own references.
    """
    import torch.distributed._functional_collectives as ft_c

    import fastusp_xdit.usp.steps as steps
    from fastusp_xdit.usp import usp_attention
    from fastusp_xdit import layout
    from fastusp_xdit.usp.groups import usp_groups

    tracked, live_counts, events = [], [], []
    real_shift, real_attend = steps.ring_shift, steps.local_attention

    def shift(x, rows, group):
        base = x._base if x._base is not None else x
        if not any(ref() is base for ref in tracked):
            tracked.append(weakref.ref(base))
        out = ft_c.wait_tensor(real_shift(x.clone(), rows, group))
        tracked.append(weakref.ref(out))
        events.append("shift")
        return out

    def attend(q_tm, k_tm, v_tm, spec):
        live_counts.append(sum(ref() is not None for ref in tracked))
        events.append("attend")
        return real_attend(q_tm, k_tm, v_tm, spec)

    steps.ring_shift, steps.local_attention = shift, attend
    _, rg = usp_groups(1, ring)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 64 * ring + 3, 8, generator=g) for _ in range(3))
    loc = [layout.shard(t, 2, rg.rank(), 1, ring) for t in (q, k, v)]
    usp_attention(*loc, ring_group=rg, seq_len_q=q.shape[2], seq_len_kv=k.shape[2])
    return {"live": live_counts, "events": events}


@pytest.mark.parametrize("ring", [4])
def test_at_most_two_blocks_alive_and_transfers_issued_first(ring, seed):
    expected = ["shift", "attend"] * (ring - 1) + ["attend"]
    for rank, res in enumerate(run_distributed(ring_liveness_worker, ring, ring, seed, timeout=90)):
        assert res["events"] == expected, f"rank {rank}: order {res['events']}"
        assert max(res["live"]) <= 2, f"rank {rank}: live blocks per step {res['live']}"
