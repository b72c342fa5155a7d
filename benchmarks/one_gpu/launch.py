"""Run N ranks of any xDiT script or module on ONE GPU over gloo: tooling for tests and benchmarks, not production.

NCCL refuses two ranks on one GPU; gloo stages CUDA tensors through the host for its collectives, so
2-4 processes that all use ``cuda:0`` run the real CUDA kernels inside real distributed calls (numerics
are real, timings are not). Each worker, before the target runs:

* gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK=0``, ``LOCAL_WORLD_SIZE=1``, ``MASTER_ADDR``, ``MASTER_PORT``;
* forces gloo: ``xfuser.envs.get_torch_distributed_backend`` returns ``"gloo"`` (patched the moment
  ``xfuser.envs`` executes, through :func:`fastusp_xdit.xdit.hooks.after_import`);
* gives process groups a default collective timeout (``FASTUSP_ONE_GPU_COLL_TIMEOUT`` seconds), so a
  hang becomes an error before the launcher's deadline;
* installs the P2P host staging (:func:`install_p2p_staging`): gloo's send/recv of CUDA tensors fail
  ("writev ... Bad address"), so ``torch.distributed.send/recv/isend/irecv/batch_isend_irecv`` stage
  CUDA tensors through host copies, with NCCL's host-side semantics (see :func:`install_p2p_staging`);
* with ``FASTUSP_ONE_GPU_LATENTS=DIR``: saves the input of every ``AutoencoderKL.decode`` call (the
  final latents, after the pipeline's scaling) as ``DIR/latents_rank<R>_<i>.pt`` (float32, CPU), so
  an unmodified example that writes only a PNG also yields its latents;
* calls :func:`fastusp_xdit.xdit.activate` (the ``.pth`` autoload may not be installed), then runs
  the target as ``__main__`` the way ``python SCRIPT ARGS`` / ``python -m MODULE ARGS`` would.

The parent enforces a hard deadline (every rank's process group is killed), kills the other ranks
``grace`` seconds after a first failure, captures each rank's output to ``LOG_DIR/rank<R>.log`` and
summarises the failing ranks.

CLI::

    python -m benchmarks.one_gpu.launch --nproc 2 [--timeout S] [--log-dir DIR] [--cwd DIR] [--latents DIR] \\
        -- examples/flux_example.py --model PATH --attention_backend fastusp --ulysses_degree 2
    python -m benchmarks.one_gpu.launch --nproc 2 -- -m xfuser.runner --model black-forest-labs/FLUX.1-dev ...

Python: :func:`launch` (one run -> :class:`LaunchResult`), :func:`launch_all` (several runs at once),
:func:`install_p2p_staging` / :func:`uninstall_p2p_staging` / :func:`drain` (the staging alone).
``FASTUSP_ONE_GPU_STAGE_CPU=1`` (or ``install_p2p_staging(force=True)``) stages CPU tensors too: the
CPU tests of the staging logic use it.
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import functools
import inspect
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

THIS_FILE = Path(__file__).resolve()
REPO = THIS_FILE.parents[2]

ENV_LATENTS = "FASTUSP_ONE_GPU_LATENTS"
ENV_STAGE_CPU = "FASTUSP_ONE_GPU_STAGE_CPU"
ENV_COLL_TIMEOUT = "FASTUSP_ONE_GPU_COLL_TIMEOUT"
ENV_PARENT = "FASTUSP_ONE_GPU_PARENT"

# The worker bootstrap loads this file by path (not through the ``benchmarks`` namespace package,
# which another distribution's ``benchmarks`` folder could shadow) and registers it in sys.modules
# so dataclasses and pickling see a real module.
_BOOT = ("import importlib.util as u, sys; p = sys.argv.pop(1); "
         "s = u.spec_from_file_location('fastusp_one_gpu_launch', p); m = u.module_from_spec(s); "
         "sys.modules[s.name] = m; s.loader.exec_module(m); sys.exit(m.worker_main(sys.argv[1:]))")


# --------------------------------------------------------------------------------------------
# P2P host staging (runs inside each worker)
# --------------------------------------------------------------------------------------------

_orig: dict[str, Callable] = {}
_pending: list = []          # (gloo Work, host buffer) of staged sends not yet seen complete
_lock = threading.RLock()
_force = False


def _dist():
    import torch.distributed as dist

    return dist


def _c10d():
    from torch.distributed import distributed_c10d

    return distributed_c10d


def _needs_staging(tensor, group) -> bool:
    """CUDA (non-CPU) tensors on a gloo group; every tensor when forced (tests)."""
    if _force:
        return True
    if tensor.device.type == "cpu":
        return False
    try:
        backend = str(_dist().get_backend(group)).lower()
    except Exception:  # not a member, not initialised: let torch report it
        return False
    if ":" in backend:  # "cpu:gloo,cuda:nccl": the backend of this tensor's device
        backend = dict(item.split(":", 1) for item in backend.split(",")).get(tensor.device.type, "")
    return backend == "gloo"


def _wire(host):
    """gloo rejects float8 dtypes: ship their bytes (a same-shape uint8 view)."""
    import torch

    return host.view(torch.uint8) if "float8" in str(host.dtype) else host


def _opt(**kwargs) -> dict:
    """Only the keyword arguments that were given (older torch lacks group_dst/group_src)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _keep(work, host) -> None:
    """Keep a staged send's Work and host copy alive until gloo completes it."""
    with _lock:
        _pending[:] = [(w, h) for w, h in _pending if not _completed(w)]
        _pending.append((work, host))


def _completed(work) -> bool:
    try:
        return work.is_completed()
    except Exception:  # a failed work: nothing more to keep alive for it
        return True


def pending_sends() -> int:
    """Staged sends not yet known complete (held alive by the staging)."""
    with _lock:
        _pending[:] = [(w, h) for w, h in _pending if not _completed(w)]
        return len(_pending)


def drain(timeout_s: float = 30.0) -> int:
    """Wait (at most ``timeout_s`` in all) for the staged sends still in flight; return how many remain."""
    deadline = time.monotonic() + timeout_s
    with _lock:
        items = list(_pending)
    for work, _host in items:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            work.wait(datetime.timedelta(seconds=left))
        except Exception:
            pass
    return pending_sends()


def _base_work():
    return _dist().Work


class _SentWork:
    """Factory for the Work of a staged send (a ``torch.distributed.Work`` subclass, made lazily)."""

    made = None

    @classmethod
    def make(cls, inner):
        if cls.made is None:
            base = _base_work()

            class StagedSendWork(base):
                """A staged send: the data already sits in a host copy kept alive until gloo sends it, so
                ``wait()`` returns at once, as NCCL's does for the host. Waiting for delivery here would
                deadlock PipeFusion, whose stages both send before either receives."""

                def __init__(self, inner_work):
                    super().__init__()
                    self.inner = inner_work

                def wait(self, timeout=None):
                    return True

                def is_completed(self):
                    return True

                def is_success(self):
                    return True

                def exception(self):
                    return None

                def synchronize(self):
                    return None

            cls.made = StagedSendWork
        return cls.made(inner)


class _RecvWork:
    """Factory for the Work of a staged receive (made lazily, as above)."""

    made = None

    @classmethod
    def make(cls, inner, host, dest, batch=None):
        if cls.made is None:
            base = _base_work()

            class StagedRecvWork(base):
                """A staged receive: gloo receives into a host buffer; ``wait()`` (or a completed
                ``is_completed()``) copies it into the destination tensor, once. Waiting on any receive
                of a ``batch_isend_irecv`` batch completes the whole batch's receives in op order, like
                NCCL's single coalesced work."""

                def __init__(self, inner_work, host_buf, dest_tensor, batch_list):
                    super().__init__()
                    self.inner, self.host, self.dest, self.batch = inner_work, host_buf, dest_tensor, batch_list
                    self.done = False

                def _finish(self):
                    with _lock:
                        if not self.done:
                            self.dest.copy_(self.host)
                            self.done, self.host = True, None

                def _complete(self, timeout=None):
                    if not self.done:
                        if timeout is None:
                            self.inner.wait()
                        else:
                            self.inner.wait(timeout)
                        self._finish()

                def wait(self, timeout=None):
                    for work in (self.batch if self.batch is not None else [self]):
                        work._complete(timeout)
                    return True

                def is_completed(self):
                    if self.done:
                        return True
                    if self.inner.is_completed():
                        self._finish()
                        return True
                    return False

                def is_success(self):
                    return self.done or self.inner.is_success()

                def exception(self):
                    return None if self.done else self.inner.exception()

                def source_rank(self):
                    return self.inner.source_rank()

                def synchronize(self):
                    return None

            cls.made = StagedRecvWork
        return cls.made(inner, host, dest, batch)


def _stage_out(tensor):
    """A fresh contiguous host copy of ``tensor`` (synchronous: it reflects every kernel queued so far)."""
    return tensor.detach().to("cpu", copy=True).contiguous()


def _host_like(tensor):
    import torch

    return torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device="cpu")


def isend(tensor, dst=None, group=None, tag=0, group_dst=None):
    """``torch.distributed.isend``; a staged tensor is copied to the host and its Work returns at once."""
    if not _needs_staging(tensor, group):
        return _orig["isend"](tensor, dst=dst, group=group, tag=tag, **_opt(group_dst=group_dst))
    host = _stage_out(tensor)
    work = _orig["isend"](_wire(host), dst=dst, group=group, tag=tag, **_opt(group_dst=group_dst))
    if work is None:  # not a member of the group (torch warned)
        return None
    _keep(work, host)
    return _SentWork.make(work)


def irecv(tensor, src=None, group=None, tag=0, group_src=None, _batch=None):
    """``torch.distributed.irecv``; a staged tensor is received on the host and copied in on ``wait()``."""
    if not _needs_staging(tensor, group):
        return _orig["irecv"](tensor, src=src, group=group, tag=tag, **_opt(group_src=group_src))
    host = _host_like(tensor)
    work = _orig["irecv"](_wire(host), src=src, group=group, tag=tag, **_opt(group_src=group_src))
    if work is None:
        return None
    out = _RecvWork.make(work, host, tensor, _batch)
    if _batch is not None:
        _batch.append(out)
    return out


def send(tensor, dst=None, group=None, tag=0, group_dst=None):
    """``torch.distributed.send``; a staged tensor returns once its host copy is queued (NCCL-like)."""
    if not _needs_staging(tensor, group):
        return _orig["send"](tensor, dst=dst, group=group, tag=tag, **_opt(group_dst=group_dst))
    host = _stage_out(tensor)
    work = _orig["isend"](_wire(host), dst=dst, group=group, tag=tag, **_opt(group_dst=group_dst))
    if work is not None:
        _keep(work, host)
    return None


def recv(tensor, src=None, group=None, tag=0, group_src=None):
    """``torch.distributed.recv``; a staged tensor is received on the host, then copied in."""
    if not _needs_staging(tensor, group):
        return _orig["recv"](tensor, src=src, group=group, tag=tag, **_opt(group_src=group_src))
    host = _host_like(tensor)
    sender = _orig["recv"](_wire(host), src=src, group=group, tag=tag, **_opt(group_src=group_src))
    tensor.copy_(host)
    return sender


def _is_send_op(op) -> bool:
    return op in (isend, _orig.get("isend"))


def _check_op(op) -> None:
    """P2POp's check, accepting the staged and the original isend/irecv."""
    if op not in (isend, irecv, _orig.get("isend"), _orig.get("irecv")):
        raise ValueError("Invalid ``op``. Expected ``op`` to be of type ``torch.distributed.isend`` or "
                         "``torch.distributed.irecv``.")


def batch_isend_irecv(p2p_op_list):
    """``torch.distributed.batch_isend_irecv``: ops are posted in list order (so same-pair,
    same-direction messages match in order) and one Work per op is returned in that order."""
    _c10d()._check_p2p_op_list(p2p_op_list)
    for op in p2p_op_list:  # the original tells sends by ``op.op is isend`` (this module's, once installed)
        op.op = isend if _is_send_op(op.op) else irecv
    if not any(_needs_staging(op.tensor, op.group) for op in p2p_op_list):
        return _orig["batch_isend_irecv"](p2p_op_list)
    batch: list = []
    works = []
    for op in p2p_op_list:
        peer = getattr(op, "group_peer", None)
        if op.op is isend:
            kw = {"group_dst": peer} if peer is not None else {"dst": op.peer}
            work = isend(op.tensor, group=op.group, tag=op.tag, **kw)
        else:
            kw = {"group_src": peer} if peer is not None else {"src": op.peer}
            work = irecv(op.tensor, group=op.group, tag=op.tag, _batch=batch, **kw)
        if work is not None:
            works.append(work)
    return works


_NAMES = ("isend", "irecv", "send", "recv", "batch_isend_irecv")


def install_p2p_staging(force: Optional[bool] = None) -> None:
    """Wrap ``torch.distributed.{send, recv, isend, irecv, batch_isend_irecv}`` (and ``P2POp``'s op
    check) so CUDA tensors on gloo groups go through host copies:

    1. every staged send's Work and host copy are kept alive until gloo completes it (xfuser's
       ``pipeline_isend`` drops the handle);
    2. ``wait()`` on a staged send returns at once, as NCCL's does for the host;
    3. a staged receive lands in a host buffer, copied into the CUDA tensor on ``wait()``; batches are
       posted in op order and waiting on one of a batch's receives completes them all.

    ``force`` (default: ``FASTUSP_ONE_GPU_STAGE_CPU=1``) stages CPU tensors too. Idempotent.
    """
    global _force
    _force = bool(int(os.environ.get(ENV_STAGE_CPU, "0"))) if force is None else bool(force)
    dist, c10d = _dist(), _c10d()
    with _lock:
        if _orig:
            return
        for name in _NAMES:
            _orig[name] = getattr(c10d, name)
        _orig["_check_op"] = c10d._check_op
        mine = {"isend": isend, "irecv": irecv, "send": send, "recv": recv, "batch_isend_irecv": batch_isend_irecv}
        for name, fn in mine.items():
            setattr(c10d, name, fn)
            setattr(dist, name, fn)
        c10d._check_op = _check_op
    atexit.register(drain, 10.0)


def uninstall_p2p_staging() -> None:
    """Put the original functions back (tests)."""
    dist, c10d = _dist(), _c10d()
    with _lock:
        if not _orig:
            return
        for name in _NAMES:
            setattr(c10d, name, _orig[name])
            setattr(dist, name, _orig[name])
        c10d._check_op = _orig["_check_op"]
        _orig.clear()
    try:
        atexit.unregister(drain)
    except Exception:
        pass


# --------------------------------------------------------------------------------------------
# The rest of the worker set-up
# --------------------------------------------------------------------------------------------

def _gloo() -> str:
    """Stand-in for ``xfuser.envs.get_torch_distributed_backend`` in one-GPU runs."""
    return "gloo"


def _force_gloo(envs) -> None:
    envs.get_torch_distributed_backend = _gloo


def _default_timeout(fn: Callable, seconds: float) -> Callable:
    """``fn`` (init_process_group / new_group) with ``timeout`` defaulting to ``seconds``."""
    if getattr(fn, "__fastusp_one_gpu__", False):
        return fn
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            bound = sig.bind_partial(*args, **kwargs)
            if bound.arguments.get("timeout") is None:
                kwargs["timeout"] = datetime.timedelta(seconds=seconds)
        except TypeError:
            pass
        return fn(*args, **kwargs)

    wrapper.__fastusp_one_gpu__ = True
    return wrapper


def _install_collective_timeouts(seconds: float) -> None:
    dist, c10d = _dist(), _c10d()
    for name in ("init_process_group", "new_group"):
        fn = _default_timeout(getattr(c10d, name), seconds)
        setattr(c10d, name, fn)
        setattr(dist, name, fn)


_latent_count = [0]


def _save_latents(z) -> None:
    import torch

    out = Path(os.environ[ENV_LATENTS])
    out.mkdir(parents=True, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    path = out / f"latents_rank{rank}_{_latent_count[0]}.pt"
    _latent_count[0] += 1
    torch.save(z.detach().float().cpu(), path)


def _capture_decode(module) -> None:
    """Wrap ``AutoencoderKL.decode`` to save its input (the final, scaled latents)."""
    cls = module.AutoencoderKL
    if getattr(cls.decode, "__fastusp_one_gpu__", False):
        return
    original = cls.decode

    @functools.wraps(original)
    def decode(self, z, *args, **kwargs):
        _save_latents(z)
        return original(self, z, *args, **kwargs)

    decode.__fastusp_one_gpu__ = True
    cls.decode = decode


def setup_worker() -> None:
    """Everything a one-GPU worker needs before the target runs (see the module docstring)."""
    from fastusp_xdit.xdit import activate, hooks

    hooks.after_import("xfuser.envs", _force_gloo)
    _install_collective_timeouts(float(os.environ.get(ENV_COLL_TIMEOUT, "300")))
    install_p2p_staging()
    if os.environ.get(ENV_LATENTS):
        hooks.after_import("diffusers.models.autoencoders.autoencoder_kl", _capture_decode)
    activate()


def run_target(target: Sequence[str]) -> None:
    """Run ``SCRIPT ARGS`` or ``-m MODULE ARGS`` as ``__main__``, as ``python`` itself would."""
    target = list(target)
    if target[0] == "-m":
        sys.argv = target[1:]  # run_module puts the module's file in sys.argv[0]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = target
        script_dir = os.path.dirname(os.path.abspath(target[0]))
        if sys.path and sys.path[0] in ("", os.getcwd()):
            sys.path[0] = script_dir  # ``python SCRIPT`` puts the script's folder first, not the cwd
        else:
            sys.path.insert(0, script_dir)
        runpy.run_path(target[0], run_name="__main__")


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the launching thread's process dies (a killed test runner must not
    leave ranks running on the GPU)."""
    parent = int(os.environ.get(ENV_PARENT, "0") or 0)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:
        return
    if parent and os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(137)


def worker_main(target: Sequence[str]) -> int:
    """Entry point of each worker process (started by :func:`launch`)."""
    _die_with_parent()
    setup_worker()
    run_target(target)
    drain(30.0)
    return 0


# --------------------------------------------------------------------------------------------
# The parent: launch, deadline, logs, summary
# --------------------------------------------------------------------------------------------

_ports_lock = threading.Lock()
_ports_given: set = set()


def _free_port() -> int:
    """A free TCP port not handed out before by this process (concurrent launches)."""
    with _ports_lock:
        for _ in range(50):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _ports_given:
                _ports_given.add(port)
                return port
    raise RuntimeError("no free port")


class LaunchError(RuntimeError):
    """A launched run failed or timed out; the message is :meth:`LaunchResult.summary`."""


@dataclass
class LaunchResult:
    """What a :func:`launch` run did: per-rank exit codes (negative: killed by that signal) and logs."""

    target: list
    nproc: int
    cwd: str
    log_dir: Path
    returncodes: list
    timed_out: bool = False
    killed: list = field(default_factory=list)     # ranks the launcher killed
    first_failure: Optional[int] = None
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(rc == 0 for rc in self.returncodes)

    @property
    def failed_ranks(self) -> list:
        return [r for r, rc in enumerate(self.returncodes) if rc != 0]

    def log_path(self, rank: int) -> Path:
        return self.log_dir / f"rank{rank}.log"

    def log(self, rank: int) -> str:
        try:
            return self.log_path(rank).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _describe(self, rank: int) -> str:
        rc = self.returncodes[rank]
        if rc == 0:
            return "ok"
        if rank in self.killed:
            why = "at the deadline" if self.timed_out else f"after rank {self.first_failure} failed"
            return f"killed by the launcher {why}"
        if rc is not None and rc < 0:
            try:
                return f"died of {signal.Signals(-rc).name}"
            except ValueError:
                return f"died of signal {-rc}"
        return f"exit code {rc}"

    def summary(self, tail: int = 40) -> str:
        head = (f"{' '.join(self.target)} on {self.nproc} rank(s): "
                f"{'ok' if self.ok else 'TIMED OUT' if self.timed_out else 'FAILED'} in {self.wall_s:.1f} s "
                f"(logs in {self.log_dir})")
        if self.ok:
            return head
        lines = [head] + [f"  rank {r}: {self._describe(r)}" for r in range(self.nproc)]
        shown = [r for r in self.failed_ranks if r not in self.killed] or self.failed_ranks
        for r in shown[:4]:
            text = self.log(r).splitlines()
            lines.append(f"--- rank {r} log (last {min(tail, len(text))} lines) ---")
            lines.extend(text[-tail:])
        return "\n".join(lines)

    def check(self) -> "LaunchResult":
        """Raise :class:`LaunchError` unless every rank exited 0 in time."""
        if not self.ok:
            raise LaunchError(self.summary())
        return self


def _killpg(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the rank's own process group (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def launch(target: Sequence[str], nproc: int, *, timeout: float = 600.0, cwd=None, env: Optional[dict] = None,
           log_dir=None, grace: float = 10.0, collective_timeout: Optional[float] = None,
           master_port: Optional[int] = None, python: str = sys.executable) -> LaunchResult:
    """Run ``target`` (``[SCRIPT, *ARGS]`` or ``["-m", MODULE, *ARGS]``) on ``nproc`` ranks sharing one GPU.

    ``env`` adds to (a ``None`` value removes from) this process's environment. ``timeout`` is the hard
    deadline of the whole run; ``grace`` how long the other ranks may go on after a first failure;
    ``collective_timeout`` the workers' default process-group timeout (default ``min(300, timeout)``).
    Returns a :class:`LaunchResult` (call ``.check()`` to raise on failure).
    """
    target = [str(t) for t in target]
    if not target or (target[0] == "-m" and len(target) < 2):
        raise ValueError("target must be [SCRIPT, *ARGS] or ['-m', MODULE, *ARGS]")
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    cwd = str(cwd or os.getcwd())
    log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="one_gpu_logs_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    port = master_port or _free_port()

    base = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = str(value)
    base["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), base.get("PYTHONPATH", "")] if p)
    base.setdefault("PYTHONUNBUFFERED", "1")
    base.setdefault("OMP_NUM_THREADS", "1")
    base.setdefault(ENV_COLL_TIMEOUT, str(collective_timeout or min(300.0, timeout)))
    base[ENV_PARENT] = str(os.getpid())

    procs, files = [], []
    start = time.monotonic()
    result = LaunchResult(target=target, nproc=nproc, cwd=cwd, log_dir=log_dir, returncodes=[None] * nproc)
    try:
        for rank in range(nproc):
            wenv = dict(base, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            f = open(log_dir / f"rank{rank}.log", "wb")
            files.append(f)
            procs.append(subprocess.Popen([python, "-c", _BOOT, str(THIS_FILE), *target], cwd=cwd, env=wenv,
                                          stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True))
        deadline = start + timeout
        kill_at = deadline
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            now = time.monotonic()
            if result.first_failure is None:
                failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    result.first_failure = failed[0]
                    kill_at = min(deadline, now + grace)
            if now >= kill_at:
                result.timed_out = result.first_failure is None  # else the failure is the story
                for r, p in enumerate(procs):
                    if p.poll() is None:
                        result.killed.append(r)
                        _killpg(p)
                for p in procs:
                    p.wait(timeout=30)
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                _killpg(p)
                p.wait(timeout=30)
            _killpg(p)  # leftovers of a finished rank (compile workers...) in its process group
        for f in files:
            f.close()
    result.returncodes = [p.returncode for p in procs]
    result.wall_s = time.monotonic() - start
    return result


def launch_all(jobs: Sequence[dict], parallel: int = 2, max_procs: Optional[int] = None) -> list:
    """Run several :func:`launch` calls (each a dict of its keyword arguments, ``target`` and ``nproc``
    included), at most ``parallel`` at a time and, with ``max_procs``, at most that many ranks at a
    time (a job larger than ``max_procs`` runs alone); return their results in order."""
    slots = threading.Condition()
    free = [max_procs if max_procs else 1 << 30]

    def run(kw):
        need = min(int(kw["nproc"]), max_procs) if max_procs else 0
        with slots:
            slots.wait_for(lambda: free[0] >= need)
            free[0] -= need
        try:
            return launch(**kw)
        finally:
            with slots:
                free[0] += need
                slots.notify_all()

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        return list(pool.map(run, jobs))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: ``python -m benchmarks.one_gpu.launch --nproc N [options] -- SCRIPT|-m MODULE ARGS``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print(__doc__.split("CLI::")[1].split("Python:")[0], file=sys.stderr)
        print("error: put the target after '--'", file=sys.stderr)
        return 2
    split = argv.index("--")
    own, target = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.one_gpu.launch",
                                     description="N ranks of an xDiT script/module on one GPU over gloo "
                                                 "(tests and benchmarks only)")
    parser.add_argument("--nproc", type=int, required=True, help="number of ranks")
    parser.add_argument("--timeout", type=float, default=600.0, help="hard deadline of the whole run (s)")
    parser.add_argument("--grace", type=float, default=10.0, help="other ranks' time after a first failure (s)")
    parser.add_argument("--collective-timeout", type=float, default=None, help="process groups' timeout (s)")
    parser.add_argument("--log-dir", default=None, help="where rank<R>.log go (default: a new temp folder)")
    parser.add_argument("--cwd", default=None, help="the ranks' working directory")
    parser.add_argument("--latents", default=None, help="save every AutoencoderKL.decode input here")
    parser.add_argument("--echo", choices=("last", "all", "none"), default="last",
                        help="whose log to print after the run (default: the last rank's)")
    args = parser.parse_args(own)
    if not target:
        parser.error("no target after '--'")
    env = {ENV_LATENTS: os.path.abspath(args.latents)} if args.latents else None
    res = launch(target, args.nproc, timeout=args.timeout, cwd=args.cwd, env=env, log_dir=args.log_dir,
                 grace=args.grace, collective_timeout=args.collective_timeout)
    ranks = {"last": [args.nproc - 1], "all": list(range(args.nproc)), "none": []}[args.echo]
    if res.ok:
        for r in ranks:
            print(f"--- rank {r} log ---\n{res.log(r)}", end="" if res.log(r).endswith("\n") else "\n")
    print(res.summary())
    return 0 if res.ok else 124 if res.timed_out else 1


if __name__ == "__main__":
    sys.exit(main())
