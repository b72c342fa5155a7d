"""``fastusp-xdit doctor``: what this machine has and what fastusp would do on it, on one screen.

Reports package versions, CUDA devices and how they are linked (``nvidia-smi topo -m``), the NCCL
version, FP8 support (native e4m3 needs sm >= 8.9, where the Triton codec runs), the ``.pth`` import
hook (installed file, ``FASTUSP_XDIT_AUTOLOAD``, armed in this process), whether xfuser imports with
the fastusp backends registered, and per backend variant the local attention kernel
(:func:`fastusp_xdit.ops.select_backend` for bf16, head_dim 128) and the FP8 codec path. Always exits
0: it describes, it does not judge. ``--json`` prints the same facts as one JSON object.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap

PACKAGES = ("torch", "xfuser", "yunchang", "diffusers", "transformers", "flash-attn", "triton", "fastusp-xdit")
PTH = "fastusp_xdit_autoload.pth"


def versions() -> dict:
    """Installed version of each package in :data:`PACKAGES` (None: not installed), and Python's."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    if out["fastusp-xdit"] is None:
        from .. import __version__

        out["fastusp-xdit"] = f"{__version__} (source tree, not pip-installed)"
    return out


def gpus() -> list[dict]:
    """CUDA devices torch sees: index, name, compute capability, memory, native FP8."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1), "fp8_e4m3": (p.major, p.minor) >= (8, 9)})
    return out


def device_summary() -> str:
    """One line naming the compute devices (for result records)."""
    devs = gpus()
    if not devs:
        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    import torch

    names = sorted({d["name"] for d in devs})
    return f"{len(devs)}x {', '.join(names)} (sm {devs[0]['capability']}), CUDA {torch.version.cuda}"


def _topology() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        proc = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi topo -m failed: {e}"
    return proc.stdout.strip() if proc.returncode == 0 else f"nvidia-smi topo -m failed: {proc.stderr.strip()}"


def _nccl() -> str | None:
    import torch

    if not (torch.cuda.is_available() and torch.distributed.is_nccl_available()):
        return None
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _import_hook() -> dict:
    from ..xdit import hooks

    dirs = [*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_path("purelib")]
    files = sorted({os.path.join(d, PTH) for d in dirs if os.path.isfile(os.path.join(d, PTH))})
    env = os.environ.get("FASTUSP_XDIT_AUTOLOAD")
    return {"pth_files": files, "FASTUSP_XDIT_AUTOLOAD": env, "enabled": bool(files) and (env or "1").strip() != "0",
            "armed_in_this_process": hooks.autoload_armed()}


def _xfuser() -> dict:
    """Import xfuser with fastusp active; whether the backend names reached its enum."""
    from ..xdit.pipeline import backend_names, quiet_libraries
    from ..xdit.variants import VARIANTS

    try:
        quiet_libraries()
        names = backend_names()
    except Exception as e:  # a broken install is exactly what doctor must report
        return {"imports": False, "error": f"{type(e).__name__}: {e}"}
    return {"imports": True, "fastusp_backends_registered": all(n in names for n in VARIANTS)}


def _variants() -> dict:
    """Per backend variant: local attention kernel for bf16 head_dim 128, its wire codecs and their kernels."""
    import torch

    from ..comm.codecs import CODECS, TENSORS, WireSpec
    from ..ops import select_backend
    from ..xdit.variants import VARIANTS

    cuda = torch.cuda.is_available()
    probe = torch.empty(1, 1, 1, 128, dtype=torch.bfloat16, device="cuda:0" if cuda else "cpu")
    try:
        local = select_backend(probe)
    except ValueError as e:  # a bad FASTUSP_ATTN_BACKEND
        local = f"error: {e}"
    out = {}
    for name, variant in VARIANTS.items():
        wire = WireSpec.of(variant.wire)
        codecs = sorted({getattr(wire, t) for t in TENSORS} - {"raw"})
        out[name] = {"local_attention": local, "usp_kwargs": variant.usp_kwargs, "wire": str(wire),
                     "codec_kernels": {c: CODECS[c]().kernel(probe.device) for c in codecs} or None}
    return out


def collect() -> dict:
    """Everything doctor reports, as plain data."""
    import torch

    devs = gpus()
    return {"versions": versions(), "platform": platform.platform(), "cpu_cores": os.cpu_count(),
            "torch_cuda": torch.version.cuda, "gpus": devs, "topology": _topology() if devs else None,
            "nccl": _nccl(), "fp8_native": any(d["fp8_e4m3"] for d in devs), "import_hook": _import_hook(),
            "FASTUSP_ATTN_BACKEND": os.environ.get("FASTUSP_ATTN_BACKEND"), "xfuser": _xfuser(),
            "backends": _variants()}


def render(r: dict) -> str:
    """The one-screen text form of :func:`collect`'s report."""
    v = r["versions"]
    packages = ", ".join(f"{k} {v[k] or 'not installed'}" for k in ("python", *PACKAGES))
    lines = ["fastusp-xdit doctor", "", *textwrap.wrap(packages, 110, initial_indent="packages:  ",
                                                       subsequent_indent="           ")]
    lines.append(f"platform:  {r['platform']}, {r['cpu_cores']} CPU cores, "
                 f"torch CUDA build {r['torch_cuda'] or 'none'}")
    if r["gpus"]:
        for d in r["gpus"]:
            lines.append(f"GPU {d['index']}:     {d['name']}, sm {d['capability']}, {d['memory_gib']} GiB, "
                         f"FP8 e4m3 {'native' if d['fp8_e4m3'] else 'not native (sm < 8.9)'}")
        lines.append(f"NCCL:      {r['nccl'] or 'not available'}")
        lines.append("topology:  " + ("\n           ".join((r["topology"] or "nvidia-smi not found").splitlines())))
    else:
        lines.append("GPUs:      none (CPU mode: gloo process groups, torch's CPU flash kernel)")
    hook = r["import_hook"]
    lines.append(f"import hook: {', '.join(hook['pth_files']) or PTH + ' not installed'}; "
                 f"FASTUSP_XDIT_AUTOLOAD={hook['FASTUSP_XDIT_AUTOLOAD'] or '(unset)'} -> "
                 f"{'on' if hook['enabled'] else 'off'}; armed in this process: {hook['armed_in_this_process']}")
    x = r["xfuser"]
    lines.append("xfuser:    " + (f"imports, fastusp backends registered: {x['fastusp_backends_registered']}"
                                  if x["imports"] else f"does not import: {x['error']}"))
    if r["FASTUSP_ATTN_BACKEND"]:
        lines.append(f"FASTUSP_ATTN_BACKEND={r['FASTUSP_ATTN_BACKEND']} forces the local kernel")
    lines.append("backends (bf16, head_dim 128):")
    for name, b in r["backends"].items():
        kernels = ", ".join(f"{c} {k}" for c, k in (b["codec_kernels"] or {}).items())
        comm = f"wire {b['wire']} ({kernels})" if b["codec_kernels"] else "input-dtype communication"
        lines.append(f"  --attention_backend {name:<17} local kernel {b['local_attention']}; {comm}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastusp-xdit doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    report = collect()
    print(json.dumps(report, indent=1) if args.json else render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
