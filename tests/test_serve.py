"""``fastusp-xdit serve``: request validation, outcome -> answer, bounded group timeouts, and the server itself.

The server tests start ``python -m fastusp_xdit.apps.serve --port 0`` as a subprocess (the tiny random
FLUX.1 pipeline, 2 gloo ranks, loopback only), read the port it prints, and talk HTTP to it. The
pipeline failure used is real: a 18 x 18 image passes the server's checks (a multiple of the tiny
pipeline's patch multiple, 2) but its 9 x 9 latent rows do not split over 2 sequence-parallel ranks,
so xfuser 0.7.0 raises ``ValueError`` on every rank.
"""
from __future__ import annotations

import base64
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fastusp_xdit.apps.launch import run_distributed
from fastusp_xdit.apps.serve import answer, bound_timeouts
from fastusp_xdit.apps.serve_request import MAX_BODY_BYTES, GenerateRequest, Limits, RequestError, parse_request

REPO = Path(__file__).resolve().parents[1]
LIMITS = Limits(patch_multiple=16, max_size=2048, max_steps=100)


# ---- validation (rank 0, before any broadcast) ---------------------------------------------------------------


def test_request_defaults_are_xdits():
    assert parse_request(b'{"prompt": "a cat"}', LIMITS) == GenerateRequest(
        prompt="a cat", num_inference_steps=50, seed=42, cfg=7.5, height=1024, width=1024, save_disk_path=None)
    full = {"prompt": "p", "num_inference_steps": 3, "seed": 7, "cfg": 2, "height": 512, "width": 256,
            "save_disk_path": "out"}
    assert parse_request(json.dumps(full).encode(), LIMITS) == GenerateRequest(**dict(full, cfg=2.0))
    assert parse_request(b'{"prompt": "p", "seed": null}', LIMITS).seed == 42  # null: the default


@pytest.mark.parametrize("body,status,words", [
    (b'{"num_inference_steps": 2}', 400, "prompt is required"),
    (b'{"prompt": "   "}', 400, "prompt is required"),
    (b'{"prompt": 3}', 400, "prompt is required"),
    (b'{"prompt": "p", "height": 1000}', 400, "multiple of 16"),
    (b'{"prompt": "p", "width": 0}', 400, "width=0 is out of range"),
    (b'{"prompt": "p", "height": 4096}', 400, "--max_size"),
    (b'{"prompt": "p", "height": 512.0}', 400, "height must be an integer"),
    (b'{"prompt": "p", "num_inference_steps": 0}', 400, "num_inference_steps=0 is out of range"),
    (b'{"prompt": "p", "num_inference_steps": -3}', 400, "num_inference_steps=-3 is out of range"),
    (b'{"prompt": "p", "num_inference_steps": 101}', 400, "--max_steps"),
    (b'{"prompt": "p", "num_inference_steps": true}', 400, "must be an integer"),
    (b'{"prompt": "p", "seed": -1}', 400, "seed=-1 is out of range"),
    (b'{"prompt": "p", "cfg": "high"}', 400, "cfg must be a finite number"),
    (b'{"prompt": "p", "cfg": NaN}', 400, "NaN is not a JSON number"),
    (b'{"prompt": "p", "save_disk_path": ""}', 400, "save_disk_path"),
    (b'{"prompt": "p", "negative_prompt": "x"}', 400, "unknown field(s) negative_prompt"),
    (b'{"prompt": "p",', 400, "not valid JSON"),
    (b'\xff\xfe', 400, "not valid JSON"),
    (b'["prompt"]', 400, "JSON object"),
    (b'{"prompt": "' + b"x" * 5000 + b'"}', 400, "limit is 4096"),
    (b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}', 413, "exceeds"),
])
def test_bad_requests_are_refused_with_a_message(body, status, words):
    with pytest.raises(RequestError) as err:
        parse_request(body, LIMITS)
    assert err.value.status == status and words in str(err.value), (err.value.status, str(err.value))


# ---- every rank's outcome -> the answer ----------------------------------------------------------------------

REQ = GenerateRequest(prompt="p", height=16, width=16)


def _failed(kind="ValueError", error="bad size", dist=False):
    return {"ok": False, "type": kind, "error": error, "dist": dist}


def test_answer_success_is_xdits_schema(tmp_path):
    ok = [{"ok": True, "png": None, "elapsed": 1.0}, {"ok": True, "png": b"PNG", "elapsed": 1.234}]
    status, body, reason = answer(REQ, ok, 1)
    assert (status, reason) == (200, None)
    assert body == {"message": "Image generated successfully", "elapsed_time": "1.23 sec",
                    "output": base64.b64encode(b"PNG").decode(), "save_to_disk": False}
    status, body, _ = answer(GenerateRequest(prompt="p", save_disk_path=str(tmp_path)), ok, 2)
    assert status == 200 and body["save_to_disk"] and Path(body["output"]).read_bytes() == b"PNG", body


@pytest.mark.parametrize("outcomes,status,unhealthy", [
    ([_failed(), _failed()], 422, False),  # the pipeline's own input check, alike on every rank
    ([_failed("RuntimeError", "oom"), _failed("RuntimeError", "oom")], 500, False),
    ([_failed("RuntimeError", "Timed out waiting", True)] * 2, 500, True),
    ([_failed("RuntimeError", "Timed out waiting", True), _failed("ValueError", "boom")], 500, True),
    ([{"ok": True, "png": None, "elapsed": 1.0}, _failed()], 500, True),  # a rank may have skipped a collective
])
def test_answer_to_failures(outcomes, status, unhealthy):
    got, body, reason = answer(REQ, outcomes, 3)
    assert got == status and "detail" in body and (reason is not None) == unhealthy, (got, body, reason)


# ---- the timeout that turns a rank left alone in a collective into an error -----------------------------------


def skipped_collective_job() -> tuple:
    """Rank 1 raises instead of joining an all-reduce on a group created after bound_timeouts(2)."""
    import datetime

    import torch
    import torch.distributed as dist

    bound_timeouts(2.0)
    group = dist.new_group([0, 1])  # like xfuser's groups: no timeout argument
    ctrl = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=30))
    start, error = time.monotonic(), None
    try:
        if dist.get_rank() == 1:
            raise ValueError("raised before the collective")
        dist.all_reduce(torch.ones(4), group=group)
    except Exception as e:
        error = {"ok": False, "type": type(e).__name__, "error": str(e), "dist": "Timed out" in str(e)}
    waited = time.monotonic() - start
    outcomes = [None, None]
    dist.all_gather_object(outcomes, error, group=ctrl)  # the control group still works
    return outcomes, waited


def test_a_rank_left_in_a_collective_times_out_and_the_service_turns_unhealthy():
    (outcomes, waited), _ = run_distributed(skipped_collective_job, 2, timeout=60, collective_timeout=30)
    assert outcomes[0]["dist"] and 1.5 < waited < 15, (outcomes, waited)
    status, _, reason = answer(REQ, outcomes, 1)
    assert status == 500 and reason and "out of step" in reason, reason


# ---- the server, end to end ----------------------------------------------------------------------------------


class Server:
    """``python -m fastusp_xdit.apps.serve --port 0 ARGS`` with its output collected; HTTP helpers."""

    def __init__(self, *args: str, log: Path):
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",  # the CPU/gloo path on any machine
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "fastusp_xdit.apps.serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()
        self.url = None
        deadline = time.monotonic() + 120
        while self.url is None:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if "listening on http://" in line:
                self.url = line.split("listening on ")[1].split()[0]
        while True:
            status, body = self.get("/health")
            if status == 200:
                break
            assert body["status"] == "loading" and time.monotonic() < deadline, (body, self.tail())
            time.sleep(0.5)

    def tail(self) -> str:
        return self.log.read_text()[-4000:]

    def request(self, method: str, path: str, data: bytes | None = None, timeout: float = 120.0):
        req = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, body, timeout: float = 120.0):
        return self.request("POST", "/generate", body if isinstance(body, bytes) else json.dumps(body).encode(),
                            timeout)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _image(body: dict):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(body["output"])))


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] in ("Z", "X")  # a zombie has exited
    except FileNotFoundError:
        return True


@pytest.fixture
def server(tmp_path):
    servers = []

    def start(*args):
        servers.append(Server(*args, log=tmp_path / f"server{len(servers)}.log"))
        return servers[-1]

    yield start
    for s in servers:
        s.kill()


@pytest.mark.timeout(240)
def test_server_answers_good_bad_and_failing_requests_in_order_and_stops_cleanly(server, tmp_path, seed):
    srv = server("--ulysses_degree", "2", "--max_size", "64", "--collective_timeout", "60")
    status, health = srv.get("/health")
    assert status == 200 and health["status"] == "ready" and health["attention_backend"] == "fastusp", health
    assert health["world_size"] == 2 and all(r["alive"] for r in health["ranks"]), health

    good = {"prompt": "a tiny red cat", "num_inference_steps": 2, "seed": seed, "height": 16, "width": 32}
    status, body = srv.post(good)
    assert status == 200 and body["save_to_disk"] is False and body["elapsed_time"].endswith(" sec"), body
    first = _image(body)
    assert first.format == "PNG" and first.size == (32, 16), (first.format, first.size)

    status, body = srv.post(dict(good, save_disk_path=str(tmp_path / "imgs")))
    assert status == 200 and body["save_to_disk"] is True, body
    assert Path(body["output"]).read_bytes() == base64.b64decode(srv.post(good)[1]["output"]), "same seed, same PNG"

    bad = [({"num_inference_steps": 2}, 400, "prompt is required"),
           (dict(good, height=17), 400, "multiple of 2"),
           (dict(good, width=128), 400, "--max_size"),
           (dict(good, num_inference_steps=0), 400, "num_inference_steps=0"),
           (b'{"prompt": "x", "seed": ', 400, "not valid JSON"),
           (dict(good, guidance=3), 400, "unknown field(s) guidance"),
           (b'{"prompt": "' + b"x" * (2 * MAX_BODY_BYTES) + b'"}', 413, "exceeds")]
    for body_in, want, words in bad:
        status, body = srv.post(body_in)
        assert status == want and words in body["detail"], (status, body, str(body_in)[:80])
    assert srv.request("GET", "/nope")[0] == 404

    # a size the server accepts but xfuser refuses on every rank: an error answer, then business as usual
    status, body = srv.post(dict(good, height=18, width=18))
    assert status == 422 and "not divisible by the number of sequence parallel devices" in body["detail"], body
    with ThreadPoolExecutor(2) as pool:  # concurrent requests are served one at a time, both answered
        answers = list(pool.map(srv.post, [good, dict(good, prompt="another prompt")]))
    assert [a[0] for a in answers] == [200, 200], answers
    assert _image(answers[0][1]).tobytes() == first.tobytes(), "the request after the failure matches the first"

    status, health = srv.get("/health")
    assert status == 200 and health["served"] == 5 and health["failed"] == 1, health
    assert srv.stop() == 0, srv.tail()
    assert all(_gone(r["pid"]) for r in health["ranks"]), health["ranks"]
    assert "Traceback" not in srv.tail() and "leaked" not in srv.tail(), srv.tail()


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_server_with_ring_degree_reports_a_dead_rank_and_fails_fast(server):
    srv = server("--ulysses_degree", "1", "--ring_degree", "2", "--collective_timeout", "60")
    status, health = srv.get("/health")
    assert status == 200 and (health["ulysses_degree"], health["ring_degree"]) == (1, 2), health
    status, body = srv.post({"prompt": "ring", "num_inference_steps": 2, "height": 16, "width": 16})
    assert status == 200 and _image(body).size == (16, 16), body

    worker = next(r["pid"] for r in health["ranks"] if r["rank"] == 1)
    os.kill(worker, signal.SIGKILL)
    time.sleep(1.0)
    status, health = srv.get("/health")
    assert status == 503 and health["status"] == "unhealthy" and "rank 1" in health["detail"], health
    start = time.monotonic()
    status, body = srv.post({"prompt": "after", "num_inference_steps": 2, "height": 16, "width": 16}, timeout=10)
    assert status == 503 and "unhealthy" in body["detail"] and time.monotonic() - start < 5, body
    assert srv.stop() == 0, srv.tail()
