"""``fastusp-xdit doctor``: one screen (and ``--json``) describing this machine and what fastusp would do on it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fastusp_xdit.apps import doctor
from fastusp_xdit.ops import select_backend
from fastusp_xdit.xdit.variants import VARIANTS

REPO = Path(__file__).resolve().parents[1]
MARK = "=== json ==="
PROBE = f"""
from fastusp_xdit.apps.cli import main
assert main(["doctor"]) == 0
print({MARK!r})
assert main(["doctor", "--json"]) == 0
"""


def test_doctor_describes_this_machine_in_text_and_json():
    env = dict(os.environ, FASTUSP_XDIT_AUTOLOAD="0",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("FASTUSP_ATTN_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text, report = proc.stdout.split(MARK + "\n")
    report = json.loads(report)

    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["xfuser"] == "0.7.0", report
    assert len(report["gpus"]) == torch.cuda.device_count(), report["gpus"]
    assert report["xfuser"] == {"imports": True, "fastusp_backends_registered": True}, report["xfuser"]
    hook = report["import_hook"]
    assert hook["FASTUSP_XDIT_AUTOLOAD"] == "0" and not hook["enabled"], hook
    probe = torch.empty(1, 1, 1, 128, dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available() else "cpu")
    backends = report["backends"]
    assert set(backends) == set(VARIANTS), backends
    assert all(b["local_attention"] == select_backend(probe) for b in backends.values()), backends
    assert backends["fastusp"]["codec_kernels"] is None and backends["fastusp_fp8"]["codec_kernels"], backends
    assert backends["fastusp_int8"]["codec_kernels"] == {"int8": "triton" if torch.cuda.is_available() else "torch"}

    assert text.strip() == doctor.render(report), "text mode renders the same report"
    for words in (f"torch {torch.__version__}", "flash-attn", "import hook", "--attention_backend fastusp_fp8"):
        assert words in text, (words, text)
    if not report["gpus"]:
        assert len(text.splitlines()) <= 25, text  # one screen


def test_import_hook_report_follows_the_pth_file_and_the_switch(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor.site, "getsitepackages", lambda: [str(tmp_path)])
    monkeypatch.delenv("FASTUSP_XDIT_AUTOLOAD", raising=False)
    assert str(tmp_path / doctor.PTH) not in doctor._import_hook()["pth_files"]
    (tmp_path / doctor.PTH).write_text("import fastusp_xdit._autoload\n")
    hook = doctor._import_hook()
    assert str(tmp_path / doctor.PTH) in hook["pth_files"] and hook["enabled"], hook
    monkeypatch.setenv("FASTUSP_XDIT_AUTOLOAD", "0")
    assert not doctor._import_hook()["enabled"]
