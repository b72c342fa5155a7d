"""The process harness fails fast: a failing rank's traceback surfaces, a hang becomes TimeoutError."""
import os
import subprocess
import sys
import time
from pathlib import Path

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
    with pytest.raises(WorkerError, match=r"rank 1 of 2 failed:(.|\n)*boom on purpose") as err:
        run_distributed(raise_on_rank_one, 2, timeout=60)
    assert time.monotonic() - t0 < 30
    first_rank, first = next(iter(err.value.errors.items()))  # in arrival order: the cause first
    assert first_rank == 1 and "boom on purpose" in first, err.value.errors


def test_hang_becomes_timeout():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\]"):
        run_distributed(sleep_forever, 2, timeout=8)
    assert time.monotonic() - t0 < 20


def test_run_help_exits_zero():
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "fastusp_xdit.apps.run", "--help"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m fastusp_xdit.apps.run SCRIPT"), proc
    proc = subprocess.run([sys.executable, "-m", "fastusp_xdit.apps.run"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "usage" in proc.stderr, proc  # no target: still an error
