"""The one-GPU launcher (``benchmarks/one_gpu/launch.py``) on CPU: its P2P host staging and its process handling.

The staging only acts on CUDA tensors of gloo groups; here it is forced onto CPU tensors
(``install_p2p_staging(force=True)``), which runs the same code paths: host copies, a send whose
``wait()`` returns at once, receives copied in on ``wait()``, batches posted in op order. The
launcher tests run small scripts on 2 real processes with a deadline.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.one_gpu import launch as L  # noqa: E402
from fastusp_xdit.apps.launch import run_distributed  # noqa: E402


# ------------------------------------------------------------------ staging semantics (2 gloo ranks)

def staging_worker() -> dict:
    """Every staging property on 2 ranks; returns the facts each rank observed."""
    import torch
    import torch.distributed as dist

    L.install_p2p_staging(force=True)
    try:
        rank = dist.get_rank()
        peer = 1 - rank
        facts: dict = {}

        # the wrappers are what torch.distributed exposes now, and P2POp accepts them
        facts["wired"] = dist.isend is L.isend and dist.batch_isend_irecv is L.batch_isend_irecv
        facts["p2pop_ok"] = isinstance(dist.P2POp(dist.isend, torch.zeros(1), peer), dist.P2POp)

        # 1. both ranks send, wait, and only then receive; rank 0 posts its receive 1.5 s late, so a
        # send whose wait() blocked until delivery would stall rank 1 for that long (and, with both
        # ranks waiting, deadlock)
        x = torch.arange(1000, dtype=torch.float32) + 1000 * rank
        t0 = time.monotonic()
        work = dist.isend(x, dst=peer)
        facts["send_is_work"] = isinstance(work, dist.Work)
        assert work.wait() is True
        facts["send_wait_s"] = time.monotonic() - t0
        x.fill_(-1.0)  # the host copy was taken at isend: the peer still gets the original values
        if rank == 0:
            time.sleep(1.5)
        got = torch.zeros(1000)
        rw = dist.irecv(got, src=peer)
        facts["recv_is_work"] = isinstance(rw, dist.Work)
        rw.wait()
        facts["send_first_ok"] = bool(torch.equal(got, torch.arange(1000, dtype=torch.float32) + 1000 * peer))

        # 2. a receive lands in its tensor on wait(), not before
        dist.barrier()
        dest = torch.zeros(64)
        if rank == 0:
            dist.isend(torch.full((64,), 7.0), dst=1)
        else:
            rw = dist.irecv(dest, src=0)
            time.sleep(0.5)  # the bytes have arrived in the host buffer by now
            facts["untouched_before_wait"] = bool((dest == 0).all())
            rw.wait()
            facts["filled_after_wait"] = bool((dest == 7).all())

        # 3. batch_isend_irecv: same-pair same-direction messages match in op order, both directions in
        # one batch, ops built with the original isend/irecv too, and waiting only on the last work
        # completes every receive of the batch
        dist.barrier()
        mine = [torch.full((3 + i,), float(10 * rank + i)) for i in range(3)]
        theirs = [torch.zeros(3 + i) for i in range(3)]
        ops = [dist.P2POp(dist.isend if i % 2 else L._orig["isend"], t, peer) for i, t in enumerate(mine)]
        recvs = [dist.P2POp(dist.irecv if i % 2 else L._orig["irecv"], t, peer) for i, t in enumerate(theirs)]
        batch = ops + recvs if rank == 0 else recvs + ops  # rank 1 posts its receives first
        works = dist.batch_isend_irecv(batch)
        facts["batch_works"] = len(works) == 6 and all(isinstance(w, dist.Work) for w in works)
        works[-1 if rank == 0 else 0].wait()  # one receive of the batch (rank 0: its last, rank 1: its first)
        facts["batch_order_ok"] = all(torch.equal(t, torch.full((3 + i,), float(10 * peer + i)))
                                      for i, t in enumerate(theirs))
        for w in works:
            w.wait()

        # 4. xfuser's _communicate_shapes: int64 dims then shapes, each stage [irecv(prev), isend(next)]
        dims = torch.empty(1, dtype=torch.int64)
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.irecv, dims, peer),
                                       dist.P2POp(dist.isend, torch.tensor(3 + rank, dtype=torch.int64), peer)])
        for r in reqs:
            r.wait()
        shape = torch.empty(int(dims.item()), dtype=torch.int64)
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.irecv, shape, peer),
                                       dist.P2POp(dist.isend, torch.arange(3 + rank, dtype=torch.int64), peer)])
        for r in reqs:
            r.wait()
        facts["shapes_ok"] = shape.tolist() == list(range(3 + peer))

        # 5. blocking send/recv, float8 (gloo rejects it: sent as bytes), a non-contiguous destination,
        # group-relative peers
        if rank == 0:
            dist.send(torch.arange(6, dtype=torch.float32).reshape(2, 3), dst=1)
            dist.send(torch.linspace(-2, 2, 16).to(torch.float8_e4m3fn), dst=1)
            dist.send(torch.arange(12, dtype=torch.float32).reshape(3, 4), group_dst=1)
        else:
            buf = torch.zeros(2, 3)
            facts["recv_sender"] = dist.recv(buf, src=0)
            facts["blocking_ok"] = bool(torch.equal(buf, torch.arange(6, dtype=torch.float32).reshape(2, 3)))
            f8 = torch.zeros(16, dtype=torch.float8_e4m3fn)
            dist.recv(f8, src=0)
            facts["fp8_ok"] = bool(torch.equal(f8.float(), torch.linspace(-2, 2, 16).to(torch.float8_e4m3fn).float()))
            big = torch.zeros(4, 3)
            view = big.t()  # (3, 4), non-contiguous
            dist.recv(view, group_src=0)
            facts["noncontig_ok"] = bool(torch.equal(big.t(), torch.arange(12, dtype=torch.float32).reshape(3, 4)))

        # 6. in-flight sends are held until complete; drain() settles them
        dist.barrier()
        facts["drained"] = L.drain(10.0) == 0
        dist.barrier()
        return facts
    finally:
        L.uninstall_p2p_staging()


def passthrough_worker() -> dict:
    """Unforced, CPU tensors are not staged: the original functions and Works are used."""
    import torch
    import torch.distributed as dist

    L.install_p2p_staging(force=False)
    try:
        rank = dist.get_rank()
        t = torch.full((4,), float(rank))
        if rank == 0:
            work = dist.isend(t, dst=1)
            native = type(work).__name__ != "StagedSendWork"
            work.wait()
        else:
            work = dist.irecv(t, src=0)
            native = type(work).__name__ != "StagedRecvWork"
            work.wait()
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.ones(2), 1 - rank),
                                       dist.P2POp(dist.irecv, got := torch.zeros(2), 1 - rank)])
        for r in reqs:
            r.wait()
        return {"native": native, "value_ok": bool((t == 0).all()), "batch_ok": bool((got == 1).all())}
    finally:
        L.uninstall_p2p_staging()


def test_p2p_staging_semantics():
    facts = run_distributed(staging_worker, 2, timeout=90)
    for rank, f in enumerate(facts):
        assert f["wired"] and f["p2pop_ok"], (rank, f)
        assert f["send_is_work"] and f["recv_is_work"] and f["batch_works"], (rank, f)
        assert f["send_wait_s"] < 0.75, f"rank {rank}: a staged send's wait() blocked ({f['send_wait_s']:.2f} s)"
        assert f["send_first_ok"], (rank, f)
        assert f["batch_order_ok"] and f["shapes_ok"], (rank, f)
        assert f["drained"], (rank, f)
    assert facts[1]["untouched_before_wait"] and facts[1]["filled_after_wait"], facts[1]
    assert facts[1]["recv_sender"] == 0 and facts[1]["blocking_ok"], facts[1]
    assert facts[1]["fp8_ok"] and facts[1]["noncontig_ok"], facts[1]


def test_p2p_staging_passes_cpu_tensors_through_when_not_forced():
    for rank, f in enumerate(run_distributed(passthrough_worker, 2, timeout=60)):
        assert f == {"native": True, "value_ok": True, "batch_ok": True}, (rank, f)


def test_install_is_idempotent_and_uninstall_restores():
    import torch.distributed as dist

    before = (dist.isend, dist.irecv, dist.send, dist.recv, dist.batch_isend_irecv)
    L.install_p2p_staging(force=True)
    L.install_p2p_staging(force=True)
    try:
        assert dist.isend is L.isend and dist.distributed_c10d.isend is L.isend
        assert L._orig["isend"] is before[0]
    finally:
        L.uninstall_p2p_staging()
    assert (dist.isend, dist.irecv, dist.send, dist.recv, dist.batch_isend_irecv) == before


# ------------------------------------------------------------------ the launcher (2 real processes)

CHECK_ENV = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    import xfuser.envs
    from diffusers import AutoencoderKL
    launch = sys.modules["fastusp_one_gpu_launch"]
    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False)
    vae.decode(torch.full((1, 1, 4, 4), float(dist.get_rank())), return_dict=False)
    facts = dict(rank=os.environ["RANK"], world=os.environ["WORLD_SIZE"], local=os.environ["LOCAL_RANK"],
                 backend=xfuser.envs.get_torch_distributed_backend(), total=t.item(), argv=sys.argv,
                 path0=sys.path[0], staged=dist.isend is launch.isend,
                 timeouts=getattr(dist.init_process_group, "__fastusp_one_gpu__", False),
                 name=__name__)
    print("FACTS " + json.dumps(facts))
    dist.destroy_process_group()
""")


def _facts(result, rank):
    line = [ln for ln in result.log(rank).splitlines() if ln.startswith("FACTS ")]
    assert line, result.log(rank)[-3000:]
    return json.loads(line[-1][6:])


def test_launch_runs_a_script_with_one_gpu_environment(tmp_path):
    script = tmp_path / "scripts" / "check_env.py"
    script.parent.mkdir()
    script.write_text(CHECK_ENV)
    res = L.launch([str(script), "--flag", "x y"], 2, timeout=180, cwd=tmp_path, log_dir=tmp_path / "logs",
                   env={L.ENV_LATENTS: str(tmp_path / "latents")})
    assert res.ok, res.summary()
    for rank in range(2):
        f = _facts(res, rank)
        assert (f["rank"], f["world"], f["local"]) == (str(rank), "2", "0"), f
        assert f["backend"] == "gloo" and f["total"] == 3.0 and f["staged"] and f["timeouts"], f
        assert f["argv"] == [str(script), "--flag", "x y"] and f["path0"] == str(script.parent), f
        assert f["name"] == "__main__", f
    import torch

    for rank in range(2):
        z = torch.load(tmp_path / "latents" / f"latents_rank{rank}_0.pt")
        assert z.shape == (1, 1, 4, 4) and (z == rank).all(), z
    assert res.log_path(0) == tmp_path / "logs" / "rank0.log" and "ok" in res.summary()


def test_launch_runs_a_module(tmp_path):
    (tmp_path / "one_gpu_probe_mod.py").write_text(
        "import os, sys\nprint('MOD', os.environ['RANK'], sys.argv[1:], __name__)\n")
    res = L.launch(["-m", "one_gpu_probe_mod", "--a", "1"], 2, timeout=120, cwd=tmp_path,
                   env={"PYTHONPATH": str(tmp_path)}, log_dir=tmp_path / "logs")
    assert res.ok, res.summary()
    for rank in range(2):
        assert f"MOD {rank} ['--a', '1'] __main__" in res.log(rank), res.log(rank)


def test_launch_reports_the_failing_rank_and_kills_the_rest(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent("""
        import os, time
        if os.environ["RANK"] == "1":
            raise RuntimeError("boom from rank 1")
        time.sleep(120)  # rank 0 would wait forever for its peer
    """))
    t0 = time.monotonic()
    res = L.launch([str(script)], 2, timeout=120, grace=2.0, cwd=tmp_path, log_dir=tmp_path / "logs")
    assert time.monotonic() - t0 < 60
    assert not res.ok and not res.timed_out and res.failed_ranks == [0, 1] and res.first_failure == 1
    assert res.killed == [0]
    text = res.summary()
    assert "rank 1: exit code 1" in text and "rank 0: killed by the launcher after rank 1 failed" in text, text
    assert "boom from rank 1" in text, text
    with pytest.raises(L.LaunchError, match="boom from rank 1"):
        res.check()


def test_launch_enforces_the_deadline(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import subprocess, sys, time\n"
                      "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
                      "time.sleep(300)\n")
    t0 = time.monotonic()
    res = L.launch([str(script)], 2, timeout=8, cwd=tmp_path, log_dir=tmp_path / "logs")
    assert time.monotonic() - t0 < 30
    assert res.timed_out and not res.ok and sorted(res.killed) == [0, 1], res.summary()
    assert "TIMED OUT" in res.summary() and "killed by the launcher at the deadline" in res.summary()


def test_cli(tmp_path):
    ok = tmp_path / "ok.py"
    ok.write_text("import os; print('hello from', os.environ['RANK'])\n")
    bad = tmp_path / "bad.py"
    bad.write_text("import os, sys; sys.exit(3 if os.environ['RANK'] == '0' else 0)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "benchmarks.one_gpu.launch", "--nproc", "2", "--timeout", "120",
           "--log-dir", str(tmp_path / "logs")]
    proc = subprocess.run([*cmd, "--", str(ok)], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hello from 1" in proc.stdout and "ok in" in proc.stdout, proc.stdout
    proc = subprocess.run([*cmd, "--grace", "1", "--", str(bad)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 1 and "rank 0: exit code 3" in proc.stdout, proc.stdout + proc.stderr
    proc = subprocess.run([*cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "after '--'" in proc.stderr


def test_ranks_die_with_a_killed_launcher(tmp_path):
    """A test runner killed mid-run (a timeout) takes its ranks with it: none is left on the GPU."""
    import signal

    script = tmp_path / "sleeper.py"
    script.write_text("import os, pathlib, time\n"
                      f"pathlib.Path({str(tmp_path)!r}, 'pid' + os.environ['RANK']).write_text(str(os.getpid()))\n"
                      "time.sleep(300)\n")
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.one_gpu import launch as L; "
            f"L.launch([{str(script)!r}], 2, timeout=300, log_dir={str(tmp_path / 'logs')!r})")
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        pids = [tmp_path / f"pid{r}" for r in range(2)]
        deadline = time.monotonic() + 60
        while not all(p.exists() and p.read_text() for p in pids):
            assert time.monotonic() < deadline and parent.poll() is None, "ranks did not start"
            time.sleep(0.2)
        ranks = [int(p.read_text()) for p in pids]
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        alive = ranks
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if _alive(pid)]
            time.sleep(0.1)
        assert not alive, f"ranks {alive} outlived their launcher"
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_pipefusion_runs_over_gloo_with_the_staging(tmp_path):
    """xDiT's PipeFusion on gloo needs the staging's NCCL-like P2P (both stages send shapes before either
    receives): with it forced onto CPU tensors, the FLUX example's PipeFusion 2 runs (without it, it
    stalls) and its latents match the 1-rank run up to PipeFusion's stale patch activations."""
    import torch

    from fastusp_xdit.xdit.tiny import build_tiny_flux

    model = build_tiny_flux(tmp_path / "tiny_flux")
    args = ["--model", model, "--height", "32", "--width", "32", "--num_inference_steps", "3",
            "--max_sequence_length", "8", "--prompt", "a tiny red cat"]
    latents = {}
    for name, nproc, extra in (("one", 1, []), ("pf2", 2, ["--attention_backend", "fastusp",
                                                            "--pipefusion_parallel_degree", "2"])):
        cwd = tmp_path / name
        cwd.mkdir()
        res = L.launch([str(REPO / "examples" / "flux_example.py"), *args, *extra], nproc, timeout=240, cwd=cwd,
                       log_dir=cwd / "logs",
                       env={L.ENV_LATENTS: str(cwd / "lat"), L.ENV_STAGE_CPU: "1", "FASTUSP_XDIT_AUTOLOAD": "0"})
        assert res.ok, res.summary()
        assert len(list((cwd / "results").glob("*.png"))) == 1
        latents[name] = torch.load(sorted((cwd / "lat").glob("*.pt"))[-1])
    err = ((latents["pf2"] - latents["one"]).norm() / latents["one"].norm()).item()
    assert 0 < err < 1e-2, err
