"""Run a function on N real processes joined by a torch.distributed process group, with a deadline.

Used by the tests, the benchmarks' CPU mode and the demo. Each worker initialises the default group
(gloo on CPU, NCCL when ``backend="nccl"``) with a short collective timeout, runs ``fn(*args)`` and
reports its picklable result. The parent enforces a hard deadline: if any rank fails, the other ranks
are killed within a short grace period and every failing rank's traceback is raised; if the deadline passes, every rank is
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


_GRACE_S = 3.0  # after a first failure, how long to wait for the other ranks' reports


class WorkerError(RuntimeError):
    """One or more ranks raised; the message carries each failing rank's traceback.

    ``errors``: {rank: traceback text}, in the order the parent heard of them (the first is most likely
    the cause; peers of a failed rank usually fail next, on a broken connection).
    """

    def __init__(self, message: str, errors: dict | None = None):
        super().__init__(message)
        self.errors = dict(errors or {})


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, backend, coll_timeout, threads, one_gpu, fn, args, results):
    local = 0 if one_gpu else rank  # one_gpu: every rank on cuda:0 (xfuser reads LOCAL_RANK for its device)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        if backend == "nccl" or one_gpu:
            torch.cuda.set_device(local)
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=coll_timeout))
        try:
            out = fn(*args)
        except BaseException:
            # report before the group goes down (its peers then fail on a closed connection): the parent
            # hears of the cause first (WorkerError.errors keeps that order)
            results.put((rank, False, traceback.format_exc()))
            results.close()
            results.join_thread()
            try:
                dist.destroy_process_group()
            except BaseException:
                pass
            return
        dist.destroy_process_group()
        results.put((rank, True, out))
    except BaseException:  # report everything, including KeyboardInterrupt in a child
        results.put((rank, False, traceback.format_exc()))


def run_distributed(fn: Callable[..., Any], world_size: int, *args, timeout: float = 120.0,
                    backend: str = "gloo", collective_timeout: float | None = None,
                    threads: int = 1, one_gpu: bool = False) -> list:
    """Run ``fn(*args)`` on ``world_size`` processes; return the per-rank results in rank order.

    ``one_gpu``: every rank uses ``cuda:0`` (with gloo, which stages CUDA tensors for collectives: the
    real CUDA kernels inside real distributed calls; for tests and numerics, not for timings).

    ``fn`` must be importable by name (module level): workers are spawned, not forked.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    coll_timeout = collective_timeout if collective_timeout is not None else max(10.0, timeout / 2)
    port = free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(r, world_size, port, backend, coll_timeout, threads, one_gpu, fn, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outs: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outs) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                if errors:
                    break
                missing = sorted(set(range(world_size)) - set(outs))
                raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout:.0f} s")
            try:
                rank, ok, out = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                for r, p in enumerate(procs):
                    if p.exitcode not in (None, 0) and r not in outs and r not in errors:
                        errors[r] = f"died with exit code {p.exitcode}"
                        deadline = min(deadline, time.monotonic() + _GRACE_S)
                continue
            if ok:
                outs[rank] = out
                continue
            errors[rank] = out
            # A failing rank makes its peers fail too (connection reset, timeout): give them a moment to
            # report, then raise with every traceback so the root cause is among them.
            deadline = min(deadline, time.monotonic() + _GRACE_S)
        if errors:
            silent = sorted(set(range(world_size)) - set(outs) - set(errors))
            note = (f"\n\nranks {silent} of {world_size} neither finished nor failed within {_GRACE_S:.0f} s of the "
                    f"first failure (hung?) and were killed" if silent else "")
            raise WorkerError("\n\n".join(f"rank {r} of {world_size} failed:\n{tb}" for r, tb in sorted(errors.items()))
                              + note, errors)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
    return [outs[r] for r in range(world_size)]
