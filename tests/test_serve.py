"""``fastusp-xdit serve``: request validation, the size rule, the output folder, outcome -> answer,
bounded group timeouts, and the server itself.

The server tests start ``python -m fastusp_xdit.apps.serve --port 0`` as a subprocess (the tiny random
FLUX.1 pipeline, 2 gloo ranks, loopback only), read the port it prints, and talk HTTP to it; one
server is shared by the tests of this module that leave it running (started once, ~15 s). The size
rule (:mod:`fastusp_xdit.apps.sizes`) is checked against xfuser 0.7.0's own split check for every
size up to 300, then a real sweep shows each size answering 200 or 400, never 422: 18 x 18 passed
the old check (a multiple of 2) and failed on every rank with xfuser's "The height of the input is
not divisible by the number of sequence parallel devices" (9 latent rows over 2 ranks).
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
from fastusp_xdit.apps.serve_output import OutputFolder
from fastusp_xdit.apps.serve_request import MAX_BODY_BYTES, GenerateRequest, Limits, RequestError, parse_request
from fastusp_xdit.apps.sizes import TINY_FLUX, ModelGeometry, read_geometry, size_rule

REPO = Path(__file__).resolve().parents[1]
FLUX_DEV = ModelGeometry("FluxPipeline", heads=24, vae_scale_factor=8, patch_size=1, packing=2)  # FLUX.1-dev
SD3_MEDIUM = ModelGeometry("StableDiffusion3Pipeline", heads=24, vae_scale_factor=8, patch_size=2, packing=1,
                           max_patches=192)
TINY_SD3 = ModelGeometry("StableDiffusion3Pipeline", heads=4, vae_scale_factor=1, patch_size=1, packing=1,
                         max_patches=96)  # fastusp_xdit.xdit.tiny.build_tiny_sd3
LIMITS = Limits.fitting(size_rule(FLUX_DEV, max_size=2048), max_steps=100)  # multiples of 16


# ---- validation (rank 0, before any broadcast) ---------------------------------------------------------------


def test_request_defaults_are_xdits():
    assert parse_request(b'{"prompt": "a cat"}', LIMITS) == GenerateRequest(
        prompt="a cat", num_inference_steps=50, seed=42, cfg=7.5, height=1024, width=1024, save_disk_path=None)
    full = {"prompt": "p", "num_inference_steps": 3, "seed": 7, "cfg": 2, "height": 512, "width": 256,
            "save_disk_path": "out"}
    assert parse_request(json.dumps(full).encode(), LIMITS) == GenerateRequest(**dict(full, cfg=2.0))
    assert parse_request(b'{"prompt": "p", "seed": null}', LIMITS).seed == 42  # null: the default


def test_request_defaults_fit_the_model():
    """A request of only a prompt works on the tiny model: xDiT's 1024 x 1024 would not, 64 x 64 does."""
    for ulysses, size in ((1, (64, 64)), (2, (64, 64)), (3, (60, 64))):  # heights: multiples of 2 x ulysses
        limits = Limits.fitting(size_rule(TINY_FLUX, ulysses, max_size=128), max_steps=100, preferred_size=64)
        got = parse_request(b'{"prompt": "a"}', limits)
        assert (got.height, got.width, got.num_inference_steps) == (*size, 50), (ulysses, got)
    limits = Limits.fitting(size_rule(FLUX_DEV, 2, 2, max_size=2048), max_steps=20)
    got = parse_request(b'{"prompt": "a"}', limits)
    assert (got.height, got.width, got.num_inference_steps) == (1024, 1024, 20), got


@pytest.mark.parametrize("body,status,words", [
    (b'{"num_inference_steps": 2}', 400, "prompt is required"),
    (b'{"prompt": "   "}', 400, "prompt is required"),
    (b'{"prompt": 3}', 400, "prompt is required"),
    (b'{"prompt": "p", "height": 1000}', 400, "heights are multiples of 16 from 16 to 2048"),
    (b'{"prompt": "p", "height": 1000}', 400, "nearest: 992 or 1008"),
    (b'{"prompt": "p", "width": 0}', 400, "width=0 is not accepted"),
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
    (b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}', 413, "exceeds the 64 KiB limit"),
])
def test_bad_requests_are_refused_with_a_message(body, status, words):
    with pytest.raises(RequestError) as err:
        parse_request(body, LIMITS)
    assert err.value.status == status and words in str(err.value), (err.value.status, str(err.value))


# ---- the size rule (fastusp_xdit.apps.sizes): xfuser's own check, swept --------------------------------------


def _xfuser_splits(monkeypatch, geometry: ModelGeometry, sp: int, height: int) -> bool:
    """Whether xfuser 0.7.0's DiTRuntimeState._calc_patches_metadata takes ``height`` on ``sp`` ranks."""
    from types import SimpleNamespace

    from fastusp_xdit.xdit import activate

    activate()  # its compat layer lets xfuser import on a machine without an accelerator
    from xfuser.core.distributed import runtime_state

    monkeypatch.setattr(runtime_state, "get_sequence_parallel_world_size", lambda: sp)
    monkeypatch.setattr(runtime_state, "get_sequence_parallel_rank", lambda: 0)
    state = SimpleNamespace(  # what _check_pipeline_class_name sets: FLUX's scale factor x 2 (its packing)
        backbone_patch_size=geometry.patch_size, vae_scale_factor=geometry.vae_scale_factor * geometry.packing,
        input_config=SimpleNamespace(height=height, width=64),
        parallel_config=SimpleNamespace(pp_config=SimpleNamespace(num_pipeline_patch=1)))
    try:
        runtime_state.DiTRuntimeState._calc_patches_metadata(state)
        return True
    except ValueError as e:
        assert "not divisible by the number of sequence parallel devices" in str(e) or "pipeline patch" in str(e)
        return False


@pytest.mark.parametrize("geometry", [TINY_FLUX, FLUX_DEV, TINY_SD3, SD3_MEDIUM],
                         ids=["tiny_flux", "flux_dev", "tiny_sd3", "sd3_medium"])
def test_size_rule_is_xfusers_split_check_and_the_pipelines_own(monkeypatch, geometry):
    """Every height 1..300 and width 1..300 at 8 degree pairs: accepted exactly when xfuser splits it over the
    ranks and diffusers takes it as is (a multiple of the pixels per token), within the caps."""
    t = geometry.pixels_per_token
    for ulysses, ring in ((1, 1), (2, 1), (1, 2), (3, 1), (2, 2), (4, 1), (1, 3), (4, 2)):
        rule = size_rule(geometry, ulysses, ring, max_size=256)
        top = min(256, geometry.max_pixels or 256)
        for size in range(1, 301):
            fits = size % t == 0 and size <= top
            assert (rule.problem("width", size) is None) == fits, (ulysses, ring, size, rule)
            want = fits and _xfuser_splits(monkeypatch, geometry, ulysses * ring, size)
            assert (rule.problem("height", size) is None) == want, (ulysses, ring, size, rule)


def test_size_rule_messages_name_the_valid_sizes():
    rule = size_rule(TINY_FLUX, 2, 1, max_size=128)
    assert rule.describe() == "height: multiples of 4 up to 128; width: multiples of 2 up to 128"
    assert "nearest: 16 or 20" in rule.problem("height", 18) and "ulysses 2 x ring 1" in rule.problem("height", 18)
    assert "nearest: 128" in rule.problem("width", 1000)
    assert size_rule(FLUX_DEV, max_size=2048).describe() == "height and width: multiples of 16 up to 2048"
    assert size_rule(SD3_MEDIUM, max_size=4096).max_height == 192 * 2 * 8  # its positional embedding's reach
    with pytest.raises(ValueError, match="no height fits"):
        size_rule(TINY_FLUX, 4, 2, max_size=8)


@pytest.mark.timeout(120)
def test_read_geometry_of_the_tiny_checkpoints(tmp_path):
    """TINY_FLUX (the demo's pre-check and serve read it without building) is what build_tiny_flux writes."""
    from fastusp_xdit.xdit.tiny import build_tiny_flux, build_tiny_sd3

    assert read_geometry(build_tiny_flux(tmp_path / "flux")) == TINY_FLUX
    assert read_geometry(build_tiny_sd3(tmp_path / "sd3")) == TINY_SD3
    with pytest.raises(ValueError, match="no model_index.json"):
        read_geometry(str(tmp_path / "nonexistent"))


# ---- the output folder (save_disk_path) ------------------------------------------------------------------------


def test_save_disk_path_stays_inside_the_output_folder(tmp_path):
    out, outside = OutputFolder(str(tmp_path / "out")), tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out" / "link").symlink_to(outside)  # a symlink pointing out
    (tmp_path / "out" / "inner").mkdir()
    (tmp_path / "out" / "alias").symlink_to(tmp_path / "out" / "inner")  # one pointing in
    assert out.resolve("imgs/run1") == ("imgs", "run1")
    assert out.resolve(str(tmp_path / "out" / "abs")) == ("abs",)  # absolute, but inside
    assert out.resolve("a/../b") == ("b",) and out.resolve(".") == ()
    assert out.resolve("alias/x") == ("inner", "x")
    for bad in ("..", "../outside", "imgs/../../outside", "link", "link/deeper", str(outside), "/etc", "/"):
        with pytest.raises(RequestError) as err:
            out.prepare(bad)
        assert err.value.status == 400 and "outside the service's output folder" in str(err.value), bad
    path = out.save("imgs", "a.png", b"PNG")
    assert Path(path) == tmp_path / "out" / "imgs" / "a.png" and Path(path).read_bytes() == b"PNG"
    assert Path(out.save("imgs", "a.png", b"2")).name == "a_1.png"  # an existing file is never overwritten
    assert list(outside.iterdir()) == [] and not (tmp_path / "imgs").exists()


def test_a_folder_swapped_for_a_symlink_after_the_check_is_not_followed(tmp_path):
    out, outside = OutputFolder(str(tmp_path / "out")), tmp_path / "outside"
    outside.mkdir()
    assert out.prepare("later") == ("later",)
    (tmp_path / "out" / "later").rmdir()
    (tmp_path / "out" / "later").symlink_to(outside)
    with pytest.raises(RequestError):  # resolve() sees it now points out
        out.save("later", "x.png", b"PNG")
    with pytest.raises(OSError):  # and the walk itself never follows a symlink
        os.close(out._open(("later",)))
    assert list(outside.iterdir()) == []


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
    output = OutputFolder(str(tmp_path / "out"))
    status, body, _ = answer(GenerateRequest(prompt="p", save_disk_path="imgs"), ok, 2, output)
    assert status == 200 and body["save_to_disk"] and Path(body["output"]).read_bytes() == b"PNG", body
    assert Path(body["output"]).parent == tmp_path / "out" / "imgs", body
    status, body, _ = answer(GenerateRequest(prompt="p", save_disk_path=str(tmp_path)), ok, 3, output)
    assert status == 400 and "outside" in body["detail"] and not list(tmp_path.glob("*.png")), body


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

    def __init__(self, *args: str, log: Path, cwd: Path):
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",  # the CPU/gloo path on any machine
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "fastusp_xdit.apps.serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env, cwd=cwd)
        self.lines: queue.Queue = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
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

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.stdout.append(line)
            self.lines.put(line)

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
        servers.append(Server(*args, log=tmp_path / f"server{len(servers)}.log", cwd=tmp_path))
        return servers[-1]

    yield start
    for s in servers:
        s.kill()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server (ulysses 2, tiny FLUX.1, output folder ``out``) for the tests that leave it running."""
    where = tmp_path_factory.mktemp("serve")
    srv = Server("--ulysses_degree", "2", "--output_dir", "out", "--collective_timeout", "60",
                 log=where / "server.log", cwd=where)
    srv.where = where
    yield srv
    srv.kill()


GOOD = {"prompt": "a tiny red cat", "num_inference_steps": 2, "height": 16, "width": 32}


@pytest.mark.timeout(240)
def test_server_answers_good_and_bad_requests_in_order(shared, seed):
    srv = shared
    status, health = srv.get("/health")
    assert status == 200 and health["status"] == "ready" and health["attention_backend"] == "fastusp", health
    assert health["world_size"] == 2 and all(r["alive"] for r in health["ranks"]), health
    assert health["sizes"]["height"] == {"multiple_of": 4, "min": 4, "max": 128}, health["sizes"]
    assert health["sizes"]["width"] == {"multiple_of": 2, "min": 2, "max": 128}, health["sizes"]
    assert health["max_body_bytes"] == 64 * 1024 and health["output_dir"] == str((srv.where / "out").resolve())
    served, failed = health["served"], health["failed"]

    good = dict(GOOD, seed=seed)
    status, body = srv.post(good)
    assert status == 200 and body["save_to_disk"] is False and body["elapsed_time"].endswith(" sec"), body
    first = _image(body)
    assert first.format == "PNG" and first.size == (32, 16), (first.format, first.size)

    status, body = srv.post(dict(good, save_disk_path="imgs"))
    assert status == 200 and body["save_to_disk"] is True, body
    assert Path(body["output"]).parent == (srv.where / "out" / "imgs").resolve(), body
    assert Path(body["output"]).read_bytes() == base64.b64decode(srv.post(good)[1]["output"]), "same seed, same PNG"

    bad = [({"num_inference_steps": 2}, 400, "prompt is required"),
           (dict(good, height=17), 400, "heights are multiples of 4 from 4 to 128"),
           (dict(good, width=130), 400, "--max_size"),
           (dict(good, num_inference_steps=0), 400, "num_inference_steps=0"),
           (b'{"prompt": "x", "seed": ', 400, "not valid JSON"),
           (dict(good, guidance=3), 400, "unknown field(s) guidance"),
           (b'{"prompt": "' + b"x" * (2 * MAX_BODY_BYTES) + b'"}', 413, "64 KiB")]
    for body_in, want, words in bad:
        status, body = srv.post(body_in)
        assert status == want and words in body["detail"], (status, body, str(body_in)[:80])

    with ThreadPoolExecutor(2) as pool:  # concurrent requests are served one at a time, both answered
        answers = list(pool.map(srv.post, [good, dict(good, prompt="another prompt")]))
    assert [a[0] for a in answers] == [200, 200], answers
    assert _image(answers[0][1]).tobytes() == first.tobytes(), "the same request, the same image"
    status, health = srv.get("/health")
    assert status == 200 and (health["served"] - served, health["failed"] - failed) == (5, 0), health


@pytest.mark.timeout(240)
def test_server_size_sweep_answers_200_or_400_never_422(shared):
    """Every height 1..130 (width 2) and width 1..130 (height 4), 1 step: 200 exactly where /health's rule says,
    400 naming the valid sizes elsewhere. 18 and 126 (422 from inside the pipeline before) are 400s now."""
    srv = shared
    rule = srv.get("/health")[1]["sizes"]
    for name, other in (("height", ("width", 2)), ("width", ("height", 4))):
        m, top = rule[name]["multiple_of"], rule[name]["max"]
        answers = {size: srv.post({"prompt": "s", "num_inference_steps": 1, name: size, other[0]: other[1]})
                   for size in range(1, 131)}
        assert {status for status, _ in answers.values()} == {200, 400}, answers
        for size, (status, body) in answers.items():
            assert status == (200 if size % m == 0 and size <= top else 400), (name, size, status, body)
            if status == 200:
                assert _image(body).size == ((size, 4) if name == "width" else (2, size)), (name, size)
            else:
                assert f"{name}s are multiples of {m}" in body["detail"], body
    for size in (18, 126, 6, 2):  # ulysses 2 split these into odd latent rows: 422 from xfuser before
        status, body = srv.post(dict(GOOD, height=size))
        assert status == 400 and "nearest" in body["detail"], (size, status, body)


@pytest.mark.timeout(240)
def test_server_confines_save_disk_path_to_its_output_folder(shared):
    """``..``, absolute paths and a symlink leading out answer 400 and write nothing; inside ones work."""
    srv = shared
    out, outside = srv.where / "out", srv.where / "outside"
    outside.mkdir()
    (out / "escape").symlink_to(outside)
    before = sorted(srv.where.rglob("*"))
    for path in ("../outside", "imgs/../../outside", str(outside), "/tmp", "escape", "escape/sub"):
        status, body = srv.post(dict(GOOD, save_disk_path=path))
        assert status == 400 and "outside the service's output folder" in body["detail"], (path, status, body)
    assert sorted(srv.where.rglob("*")) == before and list(outside.iterdir()) == [], "nothing written or created"
    for path, parent in (("a/b", out / "a" / "b"), (str(out.resolve() / "c"), out / "c"), ("a/../d", out / "d")):
        status, body = srv.post(dict(GOOD, save_disk_path=path))
        assert status == 200 and Path(body["output"]).parent == parent.resolve(), (path, body)
        assert Path(body["output"]).stat().st_size > 0


@pytest.mark.timeout(240)
def test_server_defaults_methods_and_routes(shared):
    srv = shared
    status, body = srv.post({"prompt": "a"})  # xDiT's 1024 x 1024 default would not fit the tiny model
    assert status == 200 and _image(body).size == (64, 64), (status, body)
    for method, path, allow in (("PUT", "/generate", "POST"), ("DELETE", "/generate", "POST"),
                                ("GET", "/generate", "POST"), ("POST", "/health", "GET"), ("PATCH", "/health", "GET")):
        req = urllib.request.Request(srv.url + path, data=b"{}" if method != "GET" else None, method=method)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 405 and err.value.headers["Allow"] == allow, (method, path, err.value.code)
        assert err.value.headers["Content-Type"] == "application/json"
        assert f"use {allow} {path}" in json.loads(err.value.read())["detail"]
    assert srv.request("GET", "/nope")[0] == 404 and srv.request("PUT", "/nope", b"x")[0] == 404
    assert srv.get("/health")[0] == 200, "still serving"


@pytest.mark.timeout(120)
def test_server_stops_cleanly(shared):
    """Idle: SIGTERM tells every rank to stop; exit 0, ranks gone, no traceback (last test on the shared server)."""
    status, health = shared.get("/health")
    assert status == 200, health
    assert shared.stop() == 0, shared.tail()
    assert all(_gone(r["pid"]) for r in health["ranks"]), health["ranks"]
    assert "Traceback" not in shared.tail() and "leaked" not in shared.tail(), shared.tail()


@pytest.mark.timeout(240)
def test_server_stops_promptly_with_a_request_in_flight(server):
    srv = server("--ulysses_degree", "2", "--max_steps", "100000")
    long = {"prompt": "long", "num_inference_steps": 100000, "height": 128, "width": 128}  # hours on a CPU
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(srv.post, long, 60)
        deadline = time.monotonic() + 60
        while srv.get("/health")[1]["in_flight"] is None:
            assert time.monotonic() < deadline and not pending.done(), pending
            time.sleep(0.1)
        ranks = srv.get("/health")[1]["ranks"]
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        status, body = pending.result(timeout=20)
        code = srv.proc.wait(timeout=20)
        took = time.monotonic() - start
    assert status == 503 and "interrupted by the shutdown" in body["detail"], (status, body)
    assert code == 0 and took < 10, (code, took, srv.tail())
    assert "in flight" in srv.tail() and "1 interrupted" in "".join(srv.stdout), (srv.tail(), srv.stdout)
    assert all(_gone(r["pid"]) for r in ranks), ranks


@pytest.mark.timeout(60)
def test_serve_refuses_a_busy_port_and_a_wrong_configuration_before_loading(tmp_path):
    """A busy port, a ulysses degree the model's heads refuse, a missing checkpoint: one line within seconds."""
    import socket

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for args, words in ((["--port", port], "cannot listen on 127.0.0.1:" + port),
                            (["--port", "0", "--ulysses_degree", "3"], "has 4 attention heads"),
                            (["--port", "0", "--model", str(tmp_path / "nope")], "no model_index.json")):
            start = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "fastusp_xdit.apps.serve", *args], env=env, cwd=tmp_path,
                                  capture_output=True, text=True, timeout=50)
            took = time.monotonic() - start
            assert proc.returncode == 2 and words in proc.stderr, (args, proc.returncode, proc.stderr[-2000:])
            assert took < 10 and "listening" not in proc.stdout, (args, took, proc.stdout)


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
