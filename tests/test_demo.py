"""``fastusp-xdit demo``: the main job end to end (tiny FLUX.1 through xDiT on 2 gloo processes), the
attention-only ``--core`` demo, and option checks.

The main job runs exactly as the README's command does, with a fresh seed: stock xfuser, ``fastusp``
and ``fastusp_fp8`` on 2 processes against 1 process, fp32. Measured (64 x 64, 4 steps): stock and
fastusp differ from the 1-process image by 3.6e-7 and from each other by 0; fastusp_fp8 (e4m3 Q, V,
O on the all-to-all) by 1.8e-4.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastusp_xdit import cli, demo_pipeline

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",  # the CPU/gloo path on any machine
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "fastusp_xdit", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"fastusp-xdit {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.timeout(300)
def test_demo_runs_the_tiny_flux_pipeline_and_writes_images_and_record(tmp_path, seed):
    from PIL import Image

    proc = _cli("demo", "--out", str(tmp_path), "--seed", str(seed))
    record = json.loads((tmp_path / "demo.json").read_text())
    assert {"command", "device", "versions", "date"} <= set(record) and record["versions"]["xfuser"] == "0.7.0"
    assert record["command"] == f"fastusp-xdit demo --out {tmp_path} --seed {seed}", record["command"]
    rows = {r["backend"]: r for r in record["rows"]}
    assert [r["world"] for r in record["rows"]] == [1, 2, 2, 2], record["rows"]
    assert set(rows) >= {"diffusers", *demo_pipeline.FASTUSP_BACKENDS}, set(rows)
    stock = next(r for r in record["rows"] if r["stock"] and r["world"] == 2)
    where = f"seed {seed}"
    assert rows["fastusp"]["rel_vs_stock"] <= TOL, (rows["fastusp"], where)
    assert max(rows["fastusp"]["rel_vs_1proc"], stock["rel_vs_1proc"]) <= TOL, (rows["fastusp"], stock, where)
    assert 1e-7 < rows["fastusp_fp8"]["rel_vs_stock"] <= 3e-2, (rows["fastusp_fp8"], where)  # FP8 did run
    for r in record["rows"]:
        assert r["sec_per_step"] > 0, r
        image = np.asarray(Image.open(tmp_path / r["png"]))
        assert image.shape == (64, 64, 3) and image.std() > 0, (r["png"], image.shape)
        assert r["config"] in proc.stdout, (r["config"], proc.stdout)


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_core_demo_matches_float64(tmp_path):
    _cli("demo", "--core", "--heads", "4", "--seq", "128", "--head-dim", "16", "--joint", "8", "--iters", "1",
         "--out", str(tmp_path))
    record = json.loads((tmp_path / "core_demo.json").read_text())
    assert {"command", "device", "versions", "date"} <= set(record)
    assert {(r["config"], r["dtype"]) for r in record["rows"]} == {
        (c, d) for c in ("single", "ulysses 2", "ring 2") for d in ("float32", "bfloat16")}
    for r in record["rows"]:  # vs float64: fp32 rounding / bf16 inputs and output
        assert r["err"] <= (1e-5 if r["dtype"] == "float32" else 2e-2), r
    assert (tmp_path / "core_demo.png").stat().st_size > 0


@pytest.mark.parametrize("args,words", [
    (["--core", "--ulysses", "2"], "--ulysses belong to the pipeline demo"),
    (["--heads", "4"], "--heads need --core"),
    (["--steps", "0"], "--steps must be positive"),
    (["--ulysses", "1"], "at least 2 processes"),
    (["--steps", "1"], "at least 2"),
])
def test_demo_refuses_bad_options(capsys, tmp_path, args, words):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--out", str(tmp_path), *args])
    assert e.value.code == 2 and words in capsys.readouterr().err
