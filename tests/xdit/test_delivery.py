"""How fastusp reaches xfuser's entry points: the .pth import hook and its packaging, ``fastusp_xdit.apps.run``,
the runner CLI and the upstream plugin patch (``patches/xfuser-0.7.0-attention-backend-plugins.diff``).

Every check runs in a fresh interpreter (a subprocess with a deadline): what is tested is what a new
process does at start-up, and importing xfuser patches a process for good. ``FASTUSP_XDIT_AUTOLOAD=0``
keeps an installed copy of the .pth file out of the checks that must not see it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PTH = REPO / "fastusp_xdit_autoload.pth"
PATCH = REPO / "patches" / "xfuser-0.7.0-attention-backend-plugins.diff"
# find_spec of a top-level package locates it without importing it.
XFUSER_DIR = Path(importlib.util.find_spec("xfuser").submodule_search_locations[0])
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python(args: list[str], env: dict | None = None, pythonpath: list[Path] = (), cwd=None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` with the checkout importable (after ``pythonpath``), one thread, a deadline."""
    full_env = {k: v for k, v in os.environ.items() if k != "FASTUSP_XDIT_AUTOLOAD"}
    full_env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(map(str, [*pythonpath, REPO])))
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, *args], env=full_env, cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT)
    if check:
        assert proc.returncode == 0, f"python {args[:2]} exited {proc.returncode}:\n{proc.stderr[-6000:]}"
    return proc


def _result(proc: subprocess.CompletedProcess) -> dict:
    """The JSON a probe printed on its ``RESULT`` line."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"probe printed no RESULT line:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


_AUTOLOAD_PROBE = """
import json, sys
import fastusp_xdit._autoload
from fastusp_xdit.xdit import hooks
heavy = [m for m in ("torch", "numpy", "xfuser", "diffusers") if m in sys.modules]
print("RESULT " + json.dumps({"heavy": heavy, "installed": hooks.autoload_armed()}))
"""


def test_autoload_installs_hook_without_heavy_imports():
    res = _result(_python(["-c", _AUTOLOAD_PROBE]))
    assert res == {"heavy": [], "installed": True}, res


_HOOK_PROBE = """
import json, site, sys
site.addsitedir(sys.argv[1])  # processes the copy of fastusp_xdit_autoload.pth there, as at start-up
def armed():
    hooks = sys.modules.get("fastusp_xdit.xdit.hooks")
    return hooks is not None and hooks.autoload_armed()
trigger = armed()
before = {"trigger": trigger, "xfuser": [m for m in sys.modules if m.split(".")[0] == "xfuser"],
          "activated": "fastusp_xdit.xdit.backend" in sys.modules}
after = {}
try:
    import xfuser.model_executor.layers.usp as usp
    import xfuser
    from xfuser.core.distributed.attention_backend import AttentionBackendType
    from xfuser.model_executor.layers import attention_processor
    after = {"members": [m for m in AttentionBackendType.__members__ if m.startswith("FASTUSP")],
             "usp": usp.USP.__module__, "usp_copied_by_value": attention_processor.USP.__module__,
             "package_complete": hasattr(xfuser, "xFuserArgs"), "same_package": sys.modules["xfuser"] is xfuser}
except Exception as error:  # without fastusp's compat layer xfuser does not import on CPU-only machines
    after = {"import_error": type(error).__name__}
after["trigger"] = armed()
after["activated"] = "fastusp_xdit.xdit.backend" in sys.modules
print("RESULT " + json.dumps({"before": before, "after": after}))
"""


def test_pth_hook_activates_at_first_xfuser_import(tmp_path):
    shutil.copy(PTH, tmp_path)
    res = _result(_python(["-c", _HOOK_PROBE, str(tmp_path)]))
    assert res["before"] == {"trigger": True, "xfuser": [], "activated": False}, res
    after = res["after"]
    assert after["members"] == ["FASTUSP", "FASTUSP_FP8", "FASTUSP_INT8", "FASTUSP_PIPELINED", "FASTUSP_OVERLAP"], after
    assert after["usp"] == after["usp_copied_by_value"] == "fastusp_xdit.xdit.usp_adapter", after
    assert after["package_complete"] and after["same_package"], after
    assert not after["trigger"] and after["activated"], after


@pytest.mark.slow
def test_autoload_disabled_by_env(tmp_path):
    shutil.copy(PTH, tmp_path)
    res = _result(_python(["-c", _HOOK_PROBE, str(tmp_path)], env={"FASTUSP_XDIT_AUTOLOAD": "0"}))
    assert res["before"] == {"trigger": False, "xfuser": [], "activated": False}, res
    # xfuser imports (GPU machines) or fails (CPU-only machines), but never with fastusp in it
    assert not res["after"]["activated"] and res["after"].get("members", []) == [], res


_INSTALLED_PROBE = """
import json, site, sys
# run with -S: the temporary prefix's site dir first, then this environment's (which may hold the
# checkout's own install, whose .pth files would otherwise import fastusp_xdit from there first)
site.addsitedir(sys.argv[1])
site.addsitedir(sys.argv[2])
import fastusp_xdit
from fastusp_xdit.xdit import hooks
print("RESULT " + json.dumps({"package": fastusp_xdit.__file__, "installed": hooks.autoload_armed()}))
"""


@pytest.mark.parametrize("editable", [False, True], ids=["wheel", "editable"])
def test_pip_install_ships_pth_and_entry_points(tmp_path, editable):
    """``pip install [-e] .`` (a copy of the checkout, into a temporary prefix) puts the .pth in site-packages."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "fastusp_xdit", src / "fastusp_xdit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "setup.cfg", "MANIFEST.in", "README.md", PTH.name):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src)
    prefix = tmp_path / "prefix"
    # --ignore-installed: otherwise pip first uninstalls the checkout's own install from this environment
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
                          "--prefix", str(prefix),
                          *(["-e"] if editable else []), str(src)], capture_output=True, text=True, timeout=TIMEOUT)
    assert pip.returncode == 0, pip.stderr[-4000:]
    site_packages = Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))
    assert (site_packages / PTH.name).read_text() == PTH.read_text()
    (dist_info,) = site_packages.glob("fastusp_xdit-*.dist-info")
    entry_points = (dist_info / "entry_points.txt").read_text()
    assert "fastusp = fastusp_xdit.xdit:activate" in entry_points.split("[xfuser.attention_backends]")[1], entry_points
    assert "fastusp-xdit-runner = fastusp_xdit.xdit.runner_cli:main" in entry_points, entry_points

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTUSP_XDIT_AUTOLOAD")}
    probe = subprocess.run([sys.executable, "-S", "-c", _INSTALLED_PROBE, str(site_packages),
                            sysconfig.get_path("purelib")], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=TIMEOUT)
    assert probe.returncode == 0, probe.stderr[-4000:]
    res = _result(probe)
    assert res["installed"] and res["package"].startswith(str(src if editable else site_packages)), res


_SCRIPT = """
import json, sys
from xfuser.core.distributed.attention_backend import AttentionBackendType
print("RESULT " + json.dumps({"name": __name__, "argv": sys.argv, "path0": sys.path[0],
                              "members": [m for m in AttentionBackendType.__members__ if m.startswith("FASTUSP")]}))
"""
_MODULE = """
import json, sys
print("RESULT " + json.dumps({"name": __name__, "argv": sys.argv,
                              "activated": "fastusp_xdit.xdit.backend" in sys.modules}))
"""


def test_run_script_and_module_as_main_after_activation(tmp_path):
    no_hook = {"FASTUSP_XDIT_AUTOLOAD": "0"}
    script = tmp_path / "scripts" / "probe_script.py"
    script.parent.mkdir()
    script.write_text(_SCRIPT)
    res = _result(_python(["-m", "fastusp_xdit.apps.run", str(script), "--prompt", "a cat", "-m"], env=no_hook))
    assert res == {"name": "__main__", "argv": [str(script), "--prompt", "a cat", "-m"],
                   "path0": str(script.parent), "members": ["FASTUSP", "FASTUSP_FP8", "FASTUSP_INT8", "FASTUSP_PIPELINED", "FASTUSP_OVERLAP"]}, res

    (tmp_path / "probe_module.py").write_text(_MODULE)
    res = _result(_python(["-m", "fastusp_xdit.apps.run", "-m", "probe_module", "x", "--y"], env=no_hook,
                          pythonpath=[tmp_path]))
    assert res == {"name": "__main__", "argv": [str(tmp_path / "probe_module.py"), "x", "--y"],
                   "activated": True}, res

    proc = _python(["-m", "fastusp_xdit.apps.run", str(tmp_path / "missing.py")], env=no_hook, check=False)
    assert proc.returncode != 0 and "can't open file" in proc.stderr, proc.stderr


_RUNNER_PROBE = """
import json, sys
from fastusp_xdit.xdit import runner_cli
argv = runner_cli.torchrun_argv(["--model", "m", "--ulysses_degree", "2", "--ring-degree=2", "--master_port", "1"])
print("RESULT " + json.dumps(argv), flush=True)
runner_cli.main(["--nproc_per_node=1", "--master_port=" + sys.argv[1], "--help"])
"""


def test_runner_cli_runs_xfuser_runner_through_fastusp():
    proc = _python(["-c", _RUNNER_PROBE, str(_free_port())], env={"FASTUSP_XDIT_AUTOLOAD": "0"})
    assert _result(proc) == ["--nnodes=1", "--node_rank=0", "--master_addr=localhost", "--master_port=1",
                             "--nproc_per_node=4", "-m", "fastusp_xdit.apps.run", "-m", "xfuser.runner",
                             "--model", "m", "--ulysses_degree", "2", "--ring-degree=2"]
    # the worker (fastusp_xdit.apps.run -m xfuser.runner) printed xfuser's runner help
    assert "--attention_backend ATTENTION_BACKEND" in proc.stdout, proc.stdout[-3000:]


_ENTRY_POINTS = """[xfuser.attention_backends]
fastusp = fastusp_xdit.xdit:activate
broken = fastusp_xdit_no_such_module:register
"""

_ATTENTION_PROBE = """
import json, sys
from types import SimpleNamespace
import torch
torch.set_num_threads(1)
mode, qkv_path, out_path = sys.argv[1:4]
if mode == "entry_point":
    from fastusp_xdit.xdit import compat
    compat.install()  # only lets xfuser import on CPU-only machines (no-op elsewhere); registers nothing
else:
    from fastusp_xdit.xdit import activate
    activate()
res = {"registered_before_import": "fastusp_xdit.xdit.backend" in sys.modules}
import xfuser
from xfuser.core.distributed import attention_backend as ab
res["xfuser"] = xfuser.__file__
res["patched"] = hasattr(ab, "attention_backend_from_name")
if res["patched"]:
    res["lookup"] = ab.attention_backend_from_name(" FastUSP ").name
    try:
        ab.attention_backend_from_name("no_such_backend")
    except ValueError as error:
        res["unknown"] = str(error)
from xfuser.config import xFuserArgs
from xfuser.core.distributed import init_distributed_environment
from xfuser.core.distributed.runtime_state import get_runtime_state, initialize_runtime_state
from xfuser.model_executor.layers.usp import USP
init_distributed_environment()
engine_config, _ = xFuserArgs(attention_backend="fastusp").create_config()  # name -> member in RuntimeState
config = SimpleNamespace(num_attention_heads=4, patch_size=1, in_channels=4, attention_head_dim=8)
initialize_runtime_state(SimpleNamespace(transformer=SimpleNamespace(config=config), vae_scale_factor=1),
                         engine_config)
res["backend"] = get_runtime_state().attention_backend.name
q, k, v = torch.load(qkv_path)
torch.save(USP(q, k, v), out_path)
get_runtime_state().destroy_distributed_env()
print("RESULT " + json.dumps(res))
"""


def test_patch_applies_and_entry_point_matches_activate(tmp_path, seed):
    patched = tmp_path / "patched"
    shutil.copytree(XFUSER_DIR, patched / "xfuser", ignore=shutil.ignore_patterns("__pycache__"))
    check = subprocess.run(["git", "apply", "--check", "-v", str(PATCH)], cwd=patched, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    if shutil.which("patch"):
        dry = subprocess.run(["patch", "-p1", "--dry-run", "-i", str(PATCH)], cwd=patched, capture_output=True,
                             text=True, timeout=60)
        assert dry.returncode == 0 and "FAILED" not in dry.stdout, dry.stdout + dry.stderr
    subprocess.run(["git", "apply", str(PATCH)], cwd=patched, check=True, timeout=60)

    plugin = tmp_path / "plugin"  # an installed distribution declaring fastusp's entry point, and a broken one
    dist_info = plugin / "fastusp_xdit_probe-0.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fastusp-xdit-probe\nVersion: 0.0\n")
    (dist_info / "entry_points.txt").write_text(_ENTRY_POINTS)

    gen = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(1, 4, 24, 8, generator=gen) for _ in range(3)]  # BHSD
    torch.save(qkv, tmp_path / "qkv.pt")
    env = {"FASTUSP_XDIT_AUTOLOAD": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1"}
    runs = {}
    for mode, path in (("entry_point", [patched, plugin]), ("activate", [])):
        out = tmp_path / f"{mode}.pt"
        proc = _python(["-c", _ATTENTION_PROBE, mode, str(tmp_path / "qkv.pt"), str(out)], pythonpath=path,
                       env={**env, "MASTER_PORT": str(_free_port())})
        runs[mode] = (_result(proc), torch.load(out))

    ep, ep_out = runs["entry_point"]
    assert ep["xfuser"].startswith(str(patched)) and ep["patched"], ep
    assert not ep["registered_before_import"] and ep["lookup"] == "FASTUSP" and ep["backend"] == "FASTUSP", ep
    assert "FASTUSP_FP8" in ep["unknown"] and "Plugin 'broken' failed to load" in ep["unknown"], ep["unknown"]
    act, act_out = runs["activate"]
    assert act["xfuser"].startswith(str(XFUSER_DIR)) and not act["patched"] and act["backend"] == "FASTUSP", act

    q, k, v = (t.double() for t in qkv)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ v
    err = ((act_out.double() - ref).abs().max() / ref.abs().max()).item()
    assert torch.equal(ep_out, act_out), f"seed={seed}: entry-point and activate() paths differ"
    assert err < 1e-5, f"seed={seed}: fastusp USP vs float64 reference rel. error {err:.2e} (tol 1e-5, fp32)"
