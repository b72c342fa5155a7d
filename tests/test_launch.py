"""The process harness fails fast: a failing rank's traceback surfaces, a hang becomes TimeoutError."""
import time

import pytest

from fastusp_xdit.apps.launch import WorkerError, run_distributed


def raise_on_rank_one():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise RuntimeError("boom on purpose")
    dist.barrier()  # rank 0 would wait here forever without the harness


def sleep_forever():
    time.sleep(3600)


def rank_and_world():
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def test_results_in_rank_order():
    assert run_distributed(rank_and_world, 3, timeout=60) == [(0, 3), (1, 3), (2, 3)]


def test_failing_rank_is_reported_quickly():
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank 1 of 2 failed:(.|\n)*boom on purpose"):
        run_distributed(raise_on_rank_one, 2, timeout=60)
    assert time.monotonic() - t0 < 30


def test_hang_becomes_timeout():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\]"):
        run_distributed(sleep_forever, 2, timeout=8)
    assert time.monotonic() - t0 < 20
