"""Run a function on N real processes joined by a torch.distributed process group, with a deadline.

Used by the tests, the benchmarks' CPU mode and the demo. Each worker initialises the default group
(gloo on CPU, NCCL when ``backend="nccl"``) with a short collective timeout, runs ``fn(*args)`` and
reports its picklable result. The parent enforces a hard deadline: if any rank fails, the other ranks
are killed at once and the failing rank's traceback is raised; if the deadline passes, every rank is
killed and ``TimeoutError`` names the ranks that never reported. A hang can never stall the caller.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable


class WorkerError(RuntimeError):
    """A rank raised; the message carries its traceback."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, backend, coll_timeout, threads, fn, args, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=coll_timeout))
        try:
            out = fn(*args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, out))
    except BaseException:  # report everything, including KeyboardInterrupt in a child
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn: Callable[..., Any], world_size: int, *args, timeout: float = 120.0,
                    backend: str = "gloo", collective_timeout: float | None = None,
                    threads: int = 1) -> list:
    """Run ``fn(*args)`` on ``world_size`` processes; return the per-rank results in rank order.

    ``fn`` must be importable by name (module level): workers are spawned, not forked.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    coll_timeout = collective_timeout if collective_timeout is not None else max(10.0, timeout / 2)
    port = _free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(r, world_size, port, backend, coll_timeout, threads, fn, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outs) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(outs))
                raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout:.0f} s")
            try:
                rank, ok, out = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outs]
                if dead:
                    raise WorkerError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                continue
            if not ok:
                raise WorkerError(f"rank {rank} of {world_size} failed:\n{out}")
            outs[rank] = out
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
    return [outs[r] for r in range(world_size)]
