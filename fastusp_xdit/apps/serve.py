"""``fastusp-xdit serve``: xDiT's HTTP service (``POST /generate``, ``GET /health``) with any attention backend.

Same request and answer as xDiT's service (``entrypoints/launch.py``; schema in :mod:`.serve_request`),
without Ray or FastAPI: this process is rank 0 and starts ranks 1..N-1 itself (spawned processes
joined by gloo on CPU, NCCL with one GPU each). ``--attention_backend`` (default ``fastusp``),
``--ulysses_degree`` and ``--ring_degree`` are honoured; ``--model PATH`` takes a local FLUX.1 or SD3
checkpoint, and without it the tiny random-weight FLUX.1 pipeline is built offline.

Start-up, fastest checks first: the port is bound before anything else (a busy port: one line,
exit 2); the options, the checkpoint (its JSON files), the Ulysses degree against the model's heads
and the sizes (:func:`.sizes.size_rule`: the one rule, reported by ``/health`` and by every 400
about a size) are checked before any model loads or any rank starts. Images a request asks to save
(``save_disk_path``) go only into ``--output_dir`` (:mod:`.serve_output`).

Flow: HTTP threads validate each request on rank 0 (bad input: 4xx, nothing broadcast) and queue it;
rank 0's pipeline thread takes requests one at a time in arrival order, broadcasts each on a gloo
control group, every rank runs the pipeline, the ranks' outcomes are gathered to rank 0, which
answers. An exception raised by the pipeline on every rank alike (the pipeline's own input checks:
422 for ``ValueError``, else 500) leaves the ranks in step and the service ready. Anything else
makes the service *unhealthy*: a dead rank (seen within 0.2 s), ranks that failed differently (some
may have skipped a collective; the waiting ones raise after ``--collective_timeout``, which this
module applies to every process group, xfuser's included). Unhealthy: ``/health`` and ``/generate``
answer 503 at once; restart the service. SIGTERM/SIGINT stop it (exit 0): idle ranks are told to
stop; a request in flight is answered 503, said so on stderr, and its ranks are killed rather than
waited for (a second signal exits at once).
"""
from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import multiprocessing as mp
import os
import queue
import signal
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from ..xdit import variants
from .launch import free_port
from ..xdit.pipeline import PipelineSpec, backend_names
from .serve_output import OutputFolder
from .serve_request import MAX_BODY_BYTES, GenerateRequest, Limits, RequestError, parse_request, too_large
from .sizes import DEFAULT_MAX_SIZE, TINY_FLUX, TINY_NAME, degree_problem, read_geometry, size_rule

PING_S = 30.0  # rank 0 broadcasts a heartbeat this often when idle (ranks waiting for work would time out)
_STOP, _PING = "stop", "ping"
_DISCARD_BYTES = 1 << 20  # an oversized body up to this size is read and dropped, so the client sees the 413
ROUTES = {"/health": "GET", "/generate": "POST"}


# ---- every rank --------------------------------------------------------------------------------------------


def bound_timeouts(seconds: float) -> None:
    """Make every process group created from now on in this process time out after ``seconds``.

    xfuser 0.7.0 and yunchang create their groups without a timeout, i.e. torch's defaults (30 min
    gloo, 10 min NCCL); ``torch.distributed.distributed_c10d.default_pg_timeout`` / ``_nccl_timeout``
    are what ``new_group`` falls back to.
    """
    import torch.distributed as dist

    c10d = dist.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = datetime.timedelta(seconds=seconds)


def _init_rank(rank: int, world: int, port: int, pg: str, collective_timeout: float, threads: int):
    """Default process group and the gloo control group (request broadcast, outcome gather)."""
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    if pg == "nccl":
        torch.cuda.set_device(rank)
    bound_timeouts(collective_timeout)
    dist.init_process_group(pg, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=collective_timeout))
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=collective_timeout + 2 * PING_S))


def _broadcast(obj, ctrl):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=ctrl)
    return box[0]


def _gather(obj, ctrl) -> list | None:
    import torch.distributed as dist

    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=ctrl)
    return out


def _load(spec: PipelineSpec, ctrl):
    """Load on every rank; (session, errors of all ranks), identical verdict everywhere."""
    import torch.distributed as dist

    from ..xdit.pipeline import PipelineSession

    session, error = None, None
    try:
        session = PipelineSession(spec)
    except Exception as e:  # reported by rank 0; every rank then exits
        error = f"rank {dist.get_rank()}: {type(e).__name__}: {e}"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error, group=ctrl)
    return session, [e for e in errors if e]


def _png(image) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _run(session, request: GenerateRequest) -> dict:
    """This rank's outcome for one request: ``ok``, the PNG (output rank), elapsed seconds or the error."""
    start = time.perf_counter()
    try:
        image = session.generate(request.prompt, request.num_inference_steps, request.seed, request.height,
                                 request.width, request.cfg)
        return {"ok": True, "png": None if image is None else _png(image), "elapsed": time.perf_counter() - start}
    except Exception as e:  # answered by rank 0; the rank stays up
        return {"ok": False, "type": type(e).__name__, "error": str(e), "dist": _is_dist_error(e)}


def _is_dist_error(e: Exception) -> bool:
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, dist.DistError) or any(s in text for s in ("gloo", "NCCL", "Timed out", "Connection closed"))


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)  # the server process is gone: nobody will send work or stop


def _worker_main(rank, world, port, pg, spec, collective_timeout, threads, parent_pid):
    """Ranks 1..N-1: load, then run what rank 0 broadcasts until it says stop."""
    import torch.distributed as dist

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; rank 0 coordinates
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    ctrl = _init_rank(rank, world, port, pg, collective_timeout, threads)
    session, errors = _load(spec, ctrl)
    if errors:
        sys.exit(1)
    while (msg := _broadcast(None, ctrl)) != _STOP:
        if msg != _PING:
            _gather(_run(session, msg), ctrl)
    dist.destroy_process_group()


# ---- rank 0: outcome -> answer -------------------------------------------------------------------------------


def answer(request: GenerateRequest, outcomes: list, seq: int,
           output: OutputFolder | None = None) -> tuple[int, dict, str | None]:
    """(HTTP status, JSON body, reason the service is now unhealthy or None) from every rank's outcome.

    A ``save_disk_path`` is written inside ``output`` only (re-checked here: see :mod:`.serve_output`).
    """
    failed = [(r, o) for r, o in enumerate(outcomes) if not o["ok"]]
    if not failed:
        out = next(o for o in outcomes if o["png"] is not None)
        body = {"message": "Image generated successfully", "elapsed_time": f"{out['elapsed']:.2f} sec"}
        if request.save_disk_path:
            if output is None:
                return 500, {"detail": "image generated but not saved: this service has no output folder"}, None
            name = f"generated_image_{time.strftime('%Y%m%d-%H%M%S')}_{seq}.png"
            try:
                path = output.save(request.save_disk_path, name, out["png"])
            except RequestError as e:
                return e.status, {"detail": f"image generated but not saved: {e}"}, None
            except OSError as e:
                return 500, {"detail": f"image generated but not saved: {e}"}, None
            return 200, dict(body, output=path, save_to_disk=True), None
        return 200, dict(body, output=base64.b64encode(out["png"]).decode(), save_to_disk=False), None
    kinds = {(o["type"], o["error"]) for _, o in failed}
    if len(failed) == len(outcomes) and len(kinds) == 1 and not failed[0][1]["dist"]:
        kind, error = kinds.pop()  # every rank raised the same: they stayed in step
        status = 422 if kind == "ValueError" else 500
        return status, {"detail": f"pipeline raised {kind} on every rank: {error}"}, None
    detail = "; ".join(f"rank {r}: {o['type']}: {o['error']}" for r, o in failed)
    reason = f"ranks failed differently on request {seq} ({detail}); their process groups may be out of step"
    return 500, {"detail": detail}, reason


# ---- rank 0: the service -------------------------------------------------------------------------------------


class _Job:
    def __init__(self, request: GenerateRequest, seq: int):
        self.request, self.seq = request, seq
        self.done = threading.Event()
        self.abandoned = False
        self.started: float | None = None  # monotonic time rank 0 took it
        self.status, self.body = 500, {}
        self._lock = threading.Lock()

    def finish(self, status: int, body: dict) -> bool:
        """Set the answer once (a later call changes nothing: False)."""
        with self._lock:
            if self.done.is_set():
                return False
            self.status, self.body = status, body
            self.done.set()
            return True


class Service:
    """Rank 0's state: the HTTP side (:meth:`health`, :meth:`generate`) and the pipeline thread."""

    def __init__(self, args, model_name: str, pg: str, limits: Limits, output: OutputFolder):
        self.args, self.model_name, self.pg, self.limits, self.output = args, model_name, pg, limits, output
        self.spec: PipelineSpec | None = None  # set once the checkpoint is in place
        self.world = args.ulysses_degree * args.ring_degree
        self.lock = threading.Lock()
        self.status, self.detail = "loading", "loading the pipeline on every rank"
        self.jobs: queue.Queue = queue.Queue()
        self.procs: dict[int, mp.Process] = {}
        self.counts = {"served": 0, "failed": 0, "interrupted": 0}
        self.seq = 0
        self.current: _Job | None = None  # the job the ranks are running
        self.replying = 0  # HTTP /generate calls not yet answered (waited for at shutdown)
        self.rank0_done = threading.Event()
        self.hard_exit = False  # leave with os._exit (see _main)

    # -- state
    def _set(self, status: str, detail: str, only_from=("loading", "ready")) -> None:
        with self.lock:
            if self.status in only_from:
                self.status, self.detail = status, detail
                if status in ("unhealthy", "failed"):
                    print(f"fastusp-xdit serve: {status}: {detail}", file=sys.stderr, flush=True)

    def check_ranks(self) -> None:
        dead = [f"rank {r} (pid {p.pid}) exited with code {p.exitcode}"
                for r, p in self.procs.items() if p.exitcode is not None]
        if dead and self.status != "stopping":
            self._set("unhealthy", "; ".join(dead))

    # -- HTTP side
    def health(self) -> tuple[int, dict]:
        self.check_ranks()
        ranks = [{"rank": 0, "pid": os.getpid(), "alive": not self.rank0_done.is_set()}]
        ranks += [{"rank": r, "pid": p.pid, "alive": p.exitcode is None} for r, p in sorted(self.procs.items())]
        current = self.current
        body = {"status": self.status, "detail": self.detail, "model": self.model_name,
                "attention_backend": self.args.attention_backend, "ulysses_degree": self.args.ulysses_degree,
                "ring_degree": self.args.ring_degree, "world_size": self.world, "process_group": self.pg,
                "sizes": self.limits.sizes.as_json(), "defaults": self.limits.defaults,
                "max_steps": self.limits.max_steps, "max_body_bytes": MAX_BODY_BYTES,
                "output_dir": self.output.root, "ranks": ranks, "queued": self.jobs.qsize(),
                "in_flight": None if current is None else current.seq, **self.counts}
        return (200 if self.status == "ready" else 503), body

    def generate(self, body: bytes) -> tuple[int, dict]:
        self.check_ranks()
        if self.status != "ready":
            return 503, {"detail": f"service {self.status}: {self.detail}"}
        try:
            request = parse_request(body, self.limits)
            if request.save_disk_path:
                self.output.prepare(request.save_disk_path)
        except RequestError as e:
            return e.status, {"detail": str(e)}
        if self.jobs.qsize() >= self.args.max_queue:
            return 503, {"detail": f"busy: {self.args.max_queue} requests queued (--max_queue); retry later"}
        with self.lock:
            self.seq += 1
            job = _Job(request, self.seq)
        self.jobs.put(job)
        deadline = time.monotonic() + self.args.request_timeout
        while not job.done.wait(0.2):
            self.check_ranks()
            if self.status == "stopping" and job.done.wait(2.0):  # stop() answers the job it interrupts
                break
            if self.status != "ready":
                job.abandoned = True
                return 503, {"detail": f"service {self.status}: {self.detail}"}
            if time.monotonic() > deadline:
                job.abandoned = True
                return 504, {"detail": f"not finished within --request_timeout {self.args.request_timeout:g} s"}
        return job.status, job.body

    # -- pipeline thread
    def rank0_main(self, port: int, threads: int) -> None:
        import torch.distributed as dist

        clean = False
        try:
            ctrl = _init_rank(0, self.world, port, self.pg, self.args.collective_timeout, threads)
            session, errors = _load(self.spec, ctrl)
            if errors:
                self._set("failed", "loading failed: " + "; ".join(errors))
                return
            if session.patch_multiple != self.limits.sizes.width_multiple:  # the size rule read the same model
                self._set("failed", f"the loaded pipeline takes multiples of {session.patch_multiple} pixels, the "
                                    f"size rule says {self.limits.sizes.width_multiple} (fastusp_xdit.apps.sizes)")
                _broadcast(_STOP, ctrl)
                return
            self._set("ready", f"serving; {self.limits.sizes.describe()}", only_from=("loading",))
            print(f"fastusp-xdit serve: ready ({self.detail}; a request of only a prompt gets "
                  f"{self.limits.defaults['height']}x{self.limits.defaults['width']}, "
                  f"{self.limits.defaults['num_inference_steps']} steps)", flush=True)
            clean = self._loop(session, ctrl)
        except Exception as e:
            self._set("failed" if self.status == "loading" else "unhealthy", f"rank 0: {type(e).__name__}: {e}")
        finally:
            if clean:
                dist.destroy_process_group()
            self.rank0_done.set()

    def _take(self, job):
        """True: run ``job``; it becomes :attr:`current` under the lock that :meth:`stop` reads it under."""
        with self.lock:
            run = isinstance(job, _Job) and self.status == "ready" and not job.abandoned
            if run:
                self.current, job.started = job, time.monotonic()
            return run

    def _loop(self, session, ctrl) -> bool:
        """Serve jobs until stopped (True: ranks told to stop) or unhealthy (False)."""
        while True:
            try:
                job = self.jobs.get(timeout=PING_S)
            except queue.Empty:
                job = _PING
            if self._take(job):
                try:
                    _broadcast(job.request, ctrl)
                    outcomes = _gather(_run(session, job.request), ctrl)
                except Exception as e:  # the control group itself failed: a rank is gone or stuck
                    self._set("unhealthy", f"control group: {type(e).__name__}: {e}")
                    job.finish(503, {"detail": f"service unhealthy: {self.detail}"})
                    return False
                finally:
                    self.current = None
                status, body, reason = answer(job.request, outcomes, job.seq, self.output)
                if job.finish(status, body):
                    self.counts["served" if status == 200 else "failed"] += 1
                if reason:
                    self._set("unhealthy", reason)
                    _broadcast(_STOP, ctrl)  # the control group still works: let the other ranks exit
                    return False
                continue
            if job == _STOP or self.status != "ready":
                if isinstance(job, _Job):
                    job.finish(503, {"detail": f"service {self.status}: {self.detail}"})
                if self.status == "unhealthy":
                    return False
                _broadcast(_STOP, ctrl)
                return True
            _broadcast(_PING, ctrl)  # idle (or an abandoned job): keep the ranks' control group alive

    def stop(self, grace: float) -> None:
        """Refuse new work, fail queued jobs, stop every rank (killing those that do not stop in time).

        A request in flight is answered 503 now and its ranks are killed: they would finish it first.
        """
        with self.lock:
            job = self.current
            if self.status in ("loading", "ready"):  # an unhealthy service stays so: its ranks are not told to stop
                self.status, self.detail = "stopping", "shutting down"
        if job is not None and job.finish(503, {"detail": "service stopping: this request was interrupted by the "
                                                          "shutdown; send it again once the service runs"}):
            self.counts["interrupted"] += 1
            print(f"fastusp-xdit serve: stopping with request {job.seq} in flight "
                  f"({time.monotonic() - (job.started or time.monotonic()):.1f} s in): answered 503; its ranks are "
                  "stopped without finishing it", file=sys.stderr, flush=True)
            grace = 0.0
        while True:
            try:
                queued = self.jobs.get_nowait()
            except queue.Empty:
                break
            if isinstance(queued, _Job):
                queued.finish(503, {"detail": "service stopping: the request was not started"})
        self.jobs.put(_STOP)
        deadline = time.monotonic() + grace
        self.rank0_done.wait(grace)
        for p in self.procs.values():
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
                p.join(5)
        until = time.monotonic() + 2.0  # let the HTTP threads send the answers just given
        while self.replying and time.monotonic() < until:
            time.sleep(0.02)


class _Handler(BaseHTTPRequestHandler):
    server_version = "fastusp-xdit"
    timeout = 60  # seconds a client may take to send its request

    def __getattr__(self, name: str):
        # every method without a do_ method here (PUT, DELETE, HEAD, ...): a JSON 405, not http.server's HTML 501
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def do_GET(self):
        if urlsplit(self.path).path == "/health":
            self._reply(*self.server.service.health())
        else:
            self._not_allowed()

    def do_POST(self):
        if urlsplit(self.path).path != "/generate":
            return self._not_allowed()
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            self.close_connection = True
            return self._reply(411, {"detail": "send the body with a Content-Length (no chunked encoding)"})
        try:
            length = int(self.headers["Content-Length"])
            if length < 0:
                raise ValueError
        except (TypeError, ValueError):
            self.close_connection = True
            return self._reply(411, {"detail": "a non-negative Content-Length header is required"})
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            if length <= _DISCARD_BYTES:
                self.rfile.read(length)
            return self._reply(413, {"detail": too_large(length)})
        body = self.rfile.read(length)
        if len(body) < length:
            return self._reply(400, {"detail": f"body ended after {len(body)} of {length} bytes"})
        service = self.server.service
        with service.lock:
            service.replying += 1
        try:
            self._reply(*service.generate(body))
        finally:
            with service.lock:
                service.replying -= 1

    def _not_allowed(self):
        path = urlsplit(self.path).path
        self.close_connection = True  # a body we do not read must not be taken for the next request
        allowed = ROUTES.get(path)
        routes = " or ".join(f"{m} {p}" for p, m in ROUTES.items())
        if allowed is None:
            return self._reply(404, {"detail": f"no route {self.command} {path}: use {routes}"})
        self._reply(405, {"detail": f"{self.command} {path} is not supported: use {allowed} {path}"},
                    {"Allow": allowed})

    def _reply(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, fmt, *args):
        sys.stderr.write(f"fastusp-xdit serve: {self.address_string()} {fmt % args}\n")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastusp-xdit serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "--model_path", dest="model",
                   help="local FLUX.1 / SD3 diffusers checkpoint (default: build the tiny random FLUX.1)")
    p.add_argument("--attention_backend", "--attention-backend", default=variants.plain(),
                   help=f"any xfuser backend name, fastusp ones included (default {variants.plain()})")
    p.add_argument("--ulysses_degree", "--ulysses-degree", "--ulysses_parallel_degree", type=int,
                   help="default: world_size / ring_degree, or 2")
    p.add_argument("--ring_degree", "--ring-degree", type=int, default=1, help="default 1")
    p.add_argument("--world_size", "--world-size", type=int, help="must equal ulysses x ring (default: that product)")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback only)")
    p.add_argument("--port", type=int, default=6000, help="default 6000; 0: any free port (printed)")
    p.add_argument("--output_dir", "--output-dir", default="fastusp_serve_output",
                   help="the one folder a request's save_disk_path may write into (a relative save_disk_path is "
                        "taken from it; anything leading outside answers 400); default ./fastusp_serve_output")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default float32 tiny, bfloat16 --model")
    p.add_argument("--max_size", type=int, help=f"largest height/width accepted (default {DEFAULT_MAX_SIZE['tiny']} "
                                                f"tiny, {DEFAULT_MAX_SIZE['model']} --model); the multiples come from "
                                                "the model and the degrees (GET /health lists them)")
    p.add_argument("--max_steps", type=int, default=100, help="largest num_inference_steps accepted (default 100)")
    p.add_argument("--max_queue", type=int, default=16, help="queued requests beyond which /generate answers 503 "
                                                             "(default 16)")
    p.add_argument("--request_timeout", type=float, default=1800.0,
                   help="seconds a /generate call may wait before a 504 (default 1800)")
    p.add_argument("--collective_timeout", type=float, default=600.0,
                   help="seconds before a rank stuck in a collective raises, making the service unhealthy "
                        "(default 600)")
    return p


def _check_options(p: argparse.ArgumentParser, args) -> None:
    """The checks that need no torch; parser.error on bad options."""
    if args.ulysses_degree is None:
        args.ulysses_degree = (args.world_size or 2 * args.ring_degree) // max(args.ring_degree, 1)
    world = args.ulysses_degree * args.ring_degree
    if args.ulysses_degree < 1 or args.ring_degree < 1:
        p.error("--ulysses_degree and --ring_degree must be >= 1")
    if args.world_size is not None and args.world_size != world:
        p.error(f"--world_size {args.world_size} != ulysses {args.ulysses_degree} x ring {args.ring_degree}")
    for name in ("max_steps", "max_queue", "request_timeout", "collective_timeout", "max_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")


def _validate(p: argparse.ArgumentParser, args) -> str:
    """What needs torch and xfuser (process group kind returned); parser.error on bad options."""
    import torch

    world = args.ulysses_degree * args.ring_degree
    gpus = torch.cuda.device_count()
    if 0 < gpus < world:
        print(f"fastusp-xdit serve: {world} ranks but {gpus} GPU(s): running on CPU (gloo)", file=sys.stderr)
    names = backend_names()
    if args.attention_backend.lower() not in names:
        p.error(f"--attention_backend {args.attention_backend}: choose one of {', '.join(names)}")
    return "nccl" if gpus >= world else "gloo"


def _limits(p: argparse.ArgumentParser, args) -> tuple[str, Limits]:
    """The model's name and what requests may ask of it, from its JSON files (nothing loaded)."""
    tiny = args.model is None
    try:
        geometry = TINY_FLUX if tiny else read_geometry(args.model)
    except ValueError as e:
        p.error(str(e))
    name = TINY_NAME if tiny else args.model
    problem = degree_problem(geometry, args.ulysses_degree, name)
    if problem:
        p.error(f"--ulysses_degree {args.ulysses_degree}: {problem}")
    args.max_size = args.max_size or DEFAULT_MAX_SIZE["tiny" if tiny else "model"]
    try:
        rule = size_rule(geometry, args.ulysses_degree, args.ring_degree, args.max_size)
    except ValueError as e:
        p.error(f"--max_size {args.max_size}: {e}")
    return name, Limits.fitting(rule, args.max_steps, preferred_size=64 if tiny else 1024)


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    try:  # first of all, so that a busy port is reported at once, not after the model loads
        httpd = ThreadingHTTPServer((args.host, args.port), _Handler)
    except OSError as e:
        print(f"fastusp-xdit serve: cannot listen on {args.host}:{args.port}: {e.strerror or e} (another service "
              "on that port? --port 0 picks a free one)", file=sys.stderr)
        return 2
    try:
        return _main(p, args, httpd)
    finally:
        httpd.server_close()


def _main(p: argparse.ArgumentParser, args, httpd: ThreadingHTTPServer) -> int:
    from ..xdit.pipeline import quiet_libraries

    _check_options(p, args)
    model_name, limits = _limits(p, args)  # the checkpoint's JSON files: a wrong one is refused within a second
    try:
        output = OutputFolder(args.output_dir)
    except OSError as e:
        p.error(f"--output_dir {args.output_dir}: {e.strerror or e}")
    quiet_libraries()
    pg = _validate(p, args)
    service = Service(args, model_name, pg, limits, output)
    httpd.daemon_threads = True
    httpd.service = service
    stop = threading.Event()

    def on_signal(*_):
        if stop.is_set():  # a second Ctrl-C / SIGTERM: do not wait for anything
            os._exit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    host, port = httpd.server_address[:2]
    print(f"fastusp-xdit serve: listening on http://{host}:{port} ({model_name}, {args.attention_backend}, "
          f"ulysses {args.ulysses_degree} x ring {args.ring_degree} on {service.world} ranks, {pg}; "
          f"{limits.sizes.describe()}; images saved under {output.root}; loading)", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="fastusp_serve_")
    code = 1
    try:
        if args.model is None:
            from ..xdit.tiny import build_tiny_flux

            service.detail = "building the tiny model"
            model, dtype, text = build_tiny_flux(os.path.join(tmp.name, "tiny-flux")), args.dtype or "float32", 32
            if read_geometry(model) != TINY_FLUX:
                print("fastusp-xdit serve: failed: the tiny model's config differs from fastusp_xdit.apps.sizes."
                      "TINY_FLUX", file=sys.stderr)
                return 1
            service.detail = "loading the pipeline on every rank"
        else:
            model, dtype, text = args.model, args.dtype or "bfloat16", 512
        service.spec = PipelineSpec(model, ulysses=args.ulysses_degree, ring=args.ring_degree,
                                    attention_backend=args.attention_backend, dtype=dtype, max_sequence_length=text)
        code = _serve(service, httpd, stop)
        return code
    finally:
        tmp.cleanup()
        if service.hard_exit:  # rank 0's thread is busy with an interrupted request or stuck in a collective,
            sys.stdout.flush()  # its peers were killed: interpreter shutdown would wait on it
            sys.stderr.flush()
            os._exit(code)


def _serve(service: Service, httpd: ThreadingHTTPServer, stop: threading.Event) -> int:
    args, spec, pg = service.args, service.spec, service.pg
    dist_port, world = free_port(), service.world
    threads = max(1, (os.cpu_count() or 1) // world) if pg == "gloo" else 1
    ctx = mp.get_context("spawn")
    if not stop.is_set():
        for r in range(1, world):
            service.procs[r] = ctx.Process(target=_worker_main, daemon=True, name=f"fastusp-serve-rank{r}",
                                           args=(r, world, dist_port, pg, spec, args.collective_timeout, threads,
                                                 os.getpid()))
            service.procs[r].start()
    rank0 = threading.Thread(target=service.rank0_main, args=(dist_port, threads), daemon=True)
    if not stop.is_set():
        rank0.start()
    else:
        service.rank0_done.set()
    while not stop.wait(0.2) and service.status != "failed":
        service.check_ranks()
    failed = service.status == "failed"
    service.stop(grace=30.0)
    httpd.shutdown()
    c = service.counts
    print(f"fastusp-xdit serve: stopped ({c['served']} served, {c['failed']} failed"
          + (f", {c['interrupted']} interrupted" if c["interrupted"] else "") + ")", flush=True)
    service.hard_exit = rank0.is_alive() or c["interrupted"] > 0
    return 1 if failed else 0


if __name__ == "__main__":
    from fastusp_xdit.apps.serve import main as _module_main  # workers unpickle this module's functions by name

    sys.exit(_module_main())
