"""``fastusp_xdit.usp`` across 2, 3 and 4 real processes sharing ONE GPU over gloo (skipped without CUDA).

NCCL refuses two ranks on one GPU; gloo stages CUDA tensors for its collectives, so every rank's shards
live on ``cuda:0`` and the CUDA kernels (cuDNN, the Triton codecs, the fused merge) run inside real
distributed calls. Each world runs one spawned job (``run_distributed(..., backend="gloo")``; every rank
pins ``cuda:0`` before the DeviceMesh would pick ``cuda:<LOCAL_RANK>``) of :mod:`fastusp_xdit.usp.verify`
case dicts with ``device="cuda"``: uneven sequence lengths and head counts, GQA, joint tokens front/rear,
bf16 and fp16, two head groups, every (Ulysses, ring) factorization (and replicas), every wire spec
(e4m3 ``qvo``, ``qvo,k``, ``qvo,k,ring_kv``; int8 ``qvo=int8,k=int8``, ``qvo=int8,k=int8,ring_kv=int8``,
with and without outlier channels) and compiled (``fullgraph=True``) cases.

Bounds: raw wires vs the float64 reference, largest element error over the output's largest element:
1e-2 (bf16), 3e-3 (fp16). 8-bit wires, verify's ``fp8_vs_raw`` (Frobenius error vs the same call with
input-dtype communication): 3e-2 per e4m3 tensor on the path, 1e-2 per int8 tensor (so 2e-2 for int8
Q/K/V/O), combined in quadrature; a path that quantizes must show some error. Compiled: no graph break,
within 2e-2 of eager.

``FASTUSP_ONE_GPU_ALLOW_CPU=1`` runs the world-2 job on CPU tensors (development on a machine without CUDA).
"""
from __future__ import annotations

import math
import os
import random
import traceback
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fastusp_xdit.apps.launch import run_distributed
from fastusp_xdit.usp.verify import run_case
from fastusp_xdit.usp.groups import usp_groups

CUDA = torch.cuda.is_available()
ALLOW_CPU = os.environ.get("FASTUSP_ONE_GPU_ALLOW_CPU") == "1"
pytestmark = pytest.mark.skipif(not (CUDA or ALLOW_CPU), reason="needs a CUDA GPU (2-4 ranks share it over gloo)")

WORLDS = (2, 3, 4) if CUDA else (2,)
DEVICE = "cuda" if CUDA else "cpu"
TOL = {"bfloat16": 1e-2, "float16": 3e-3}
PER_TENSOR = {"e4m3": 3e-2, "int8": 1e-2}
FP8_SPECS = ("qvo", "qvo,k", "qvo,k,ring_kv")
INT8_SPECS = ("qvo=int8,k=int8", "qvo=int8,k=int8,ring_kv=int8")
_TENSORS = {"qvo": ("q", "v", "o"), "q": ("q",), "k": ("k",), "v": ("v",), "o": ("o",), "ring_kv": ("ring_k", "ring_v")}


def wire_codecs(spec: str | None, ulysses: int, ring: int) -> list:
    """The 8-bit codec of every tensor a spec quantizes on this path (Ulysses tensors need U > 1, ring K/V R > 1)."""
    out = []
    for item in (spec or "").split(","):
        item = item.strip().lower()
        if not item or item == "none":
            continue
        names, _, codec = item.partition("=")
        codec = codec or "e4m3"
        if codec == "raw":
            continue
        for t in _TENSORS[names]:
            if (t.startswith("ring_") and ring > 1) or (not t.startswith("ring_") and ulysses > 1):
                out.append(codec)
    return out


def wire_bound(case: dict) -> float:
    return math.sqrt(sum(PER_TENSOR[c] ** 2 for c in wire_codecs(case.get("fp8"), case["ulysses"], case["ring"])))


def _factorizations(world: int) -> list:
    """Every (U, R) with U * R = world, plus U = 2 on half the world (replicated groups) when world = 4."""
    out = [(u, world // u) for u in range(1, world + 1) if world % u == 0]
    if world == 4:
        out.append((2, 1))
    return out


def make_cases(world: int, seed: int) -> list:
    rng = random.Random(seed * 7 + world)
    cases = []

    def common(u, r, **kw):
        return dict(ulysses=u, ring=r, device=DEVICE, seed=rng.randrange(2**31), **kw)

    for u, r in _factorizations(world):
        sp = u * r
        # the canonical even case, then uneven ones (lengths and head counts not dividing, GQA, joint tokens)
        cases.append(common(u, r, batch=1, heads=2 * u, kv_heads=2 * u, seq_q=16 * sp, seq_kv=16 * sp, head_dim=64,
                            dtype="bfloat16", kind="raw"))
        for i in range(3):
            heads = rng.randint(u, u + 3)
            joint = ("front", "rear", None)[i]
            cases.append(common(u, r, batch=rng.choice([1, 2]), heads=heads,
                                kv_heads=rng.choice([d for d in range(1, heads + 1) if heads % d == 0]),
                                seq_q=rng.randint(1, 24 * sp + 5), seq_kv=rng.randint(1, 24 * sp + 5),
                                head_dim=rng.choice([64, 128]), dtype=("bfloat16", "float16")[i % 2],
                                joint=joint, joint_len=rng.randint(1, 9) if joint else 0,
                                head_groups=2 if i < 2 else 1, kind="raw"))
        # every wire spec at sizes like tests/test_usp_fp8.py (uneven, joint tokens), with and without outliers
        if sp == world:
            for spec in FP8_SPECS + INT8_SPECS:
                for outliers in (None, 100.0):
                    cases.append(common(u, r, batch=1, heads=8, kv_heads=8, seq_q=64 * sp + 3, seq_kv=64 * sp + 1,
                                        head_dim=64, dtype=rng.choice(["bfloat16", "float16"]),
                                        joint=rng.choice(["front", "rear"]), joint_len=9, fp8=spec, outliers=outliers,
                                        head_groups=rng.choice([1, 2]),
                                        kind="int8" if "int8" in spec else "fp8"))
    # compiled (fullgraph) cases: the richest factorization of the world, raw and with a ring K/V wire
    u, r = (2, world // 2) if world % 2 == 0 else (world, 1)
    base = dict(batch=1, heads=4 * u, kv_heads=4 * u, seq_q=32 * u * r + 3, seq_kv=32 * u * r + 3, head_dim=64,
                dtype="bfloat16", joint="front", joint_len=7, compile=True, kind="compile")
    cases.append(common(u, r, **base))
    if r > 1 or world == 2:
        cases.append(common(u, r, **dict(base, fp8="qvo,k,ring_kv")))
    return cases


def one_gpu_worker(cases: list) -> list:
    """Every rank on cuda:0 (run_distributed sets LOCAL_RANK=rank, which DeviceMesh would make the device);
    each case's exception is reported in its result so one failure does not hide the others."""
    os.environ["LOCAL_RANK"] = "0"
    if CUDA:
        torch.cuda.set_device(0)
    groups: dict = {}
    out = []
    for case in cases:
        clean = {k: v for k, v in case.items() if k != "kind"}
        try:
            key = (case["ulysses"], case["ring"])
            if key not in groups:
                groups[key] = usp_groups(*key, device_type=DEVICE)
            out.append(run_case(clean, groups[key]))
        except Exception:
            out.append({"case": clean, "exception": traceback.format_exc()})
        out[-1]["kind"] = case["kind"]
    return out


@pytest.fixture(scope="module")
def results(request):
    seed = int(os.environ.get("FASTUSP_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed={seed}")

    def job(world):
        try:
            return run_distributed(one_gpu_worker, world, make_cases(world, seed), backend="gloo", timeout=400,
                                   collective_timeout=120)
        except Exception as exc:  # a whole job failed: every test of this world reports it
            return exc

    with ThreadPoolExecutor(max_workers=len(WORLDS) if CUDA else 1) as pool:
        per_world = dict(zip(WORLDS, pool.map(job, WORLDS)))
    _write_json(seed, per_world)
    return seed, per_world


def _write_json(seed, per_world) -> None:
    """Every case's numbers (rank 0's, and any rank's failures) to $FASTUSP_RESULTS_DIR/usp_one_gpu.json."""
    out_dir = os.environ.get("FASTUSP_RESULTS_DIR")
    if not out_dir:
        return
    import json
    from pathlib import Path

    doc = dict(suite="tests/test_usp_one_gpu_cuda.py", seed=seed, device=torch.cuda.get_device_name(0) if CUDA else "cpu",
               torch=torch.__version__, worlds={})
    for world, got in per_world.items():
        if isinstance(got, Exception):
            doc["worlds"][str(world)] = {"job_error": str(got)[-4000:]}
            continue
        rows = []
        for i, res in enumerate(got[0]):
            row = {k: res.get(k) for k in ("kind", "err", "fp8_vs_raw", "compile_err", "graph_breaks")
                   if res.get(k) is not None}
            row["case"] = {k: v for k, v in res["case"].items() if k not in ("device", "seed")}
            if row["kind"] in ("fp8", "int8"):
                row["bound"] = wire_bound(res["case"])
            row["failures"] = [f for rank, rank_results in enumerate(got) for f in _failures(rank_results[i], rank)]
            rows.append(row)
        doc["worlds"][str(world)] = rows
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "usp_one_gpu.json").write_text(json.dumps(doc, indent=1, default=str))


def _failures(res: dict, rank: int) -> list:
    case, kind = res["case"], res["kind"]
    where = f"rank {rank}: {case}"
    if "exception" in res:
        return [f"{where}\n{res['exception']}"]
    bad = []
    if kind == "raw" and not res["err"] <= TOL[case["dtype"]]:
        bad.append(f"err {res['err']:.3g} > {TOL[case['dtype']]} vs float64: {where}")
    if kind in ("fp8", "int8"):
        n, bound = len(wire_codecs(case["fp8"], case["ulysses"], case["ring"])), wire_bound(case)
        if not res["fp8_vs_raw"] <= max(bound, 1e-6):
            bad.append(f"{kind} error {res['fp8_vs_raw']:.4f} > {bound:.4f} ({n} 8-bit tensors): {where}")
        if n and not res["fp8_vs_raw"] > 1e-4:
            bad.append(f"{kind} path shows no quantization error at all: {where}")
        if not (res["err"] <= 0.25):
            bad.append(f"{kind} err {res['err']:.3g} vs float64 is not even close: {where}")
    if kind == "compile":
        if res["graph_breaks"] != 0:
            bad.append(f"{res['graph_breaks']} graph breaks ({res['graphs']} graphs): {where}")
        if not res["compile_err"] <= 2e-2:
            bad.append(f"compiled != eager ({res['compile_err']:.3g}): {where}")
        if not case.get("fp8") and not res["err"] <= TOL[case["dtype"]]:
            bad.append(f"err {res['err']:.3g} > {TOL[case['dtype']]} vs float64: {where}")
    return bad


def _check(results, world: int, kinds: tuple) -> None:
    seed, per_world = results
    got = per_world[world]
    if isinstance(got, Exception):
        pytest.fail(f"seed={seed} world={world}: the job failed:\n{got}")
    failures, seen = [], 0
    for rank, rank_results in enumerate(got):
        for res in rank_results:
            if res["kind"] in kinds:
                seen += 1
                failures += _failures(res, rank)
    assert seen, f"no {kinds} cases for world {world}"
    assert not failures, f"seed={seed} world={world}: {len(failures)} failures\n" + "\n\n".join(failures[:12])


@pytest.mark.parametrize("world", WORLDS)
def test_raw_wire_uneven_joint_bf16_fp16_head_groups(results, world):
    _check(results, world, ("raw",))


@pytest.mark.parametrize("world", WORLDS)
def test_fp8_wires(results, world):
    _check(results, world, ("fp8",))


@pytest.mark.parametrize("world", WORLDS)
def test_int8_wires(results, world):
    _check(results, world, ("int8",))


@pytest.mark.parametrize("world", WORLDS)
def test_compiled_fullgraph(results, world):
    _check(results, world, ("compile",))


def test_wire_bound_arithmetic():
    assert wire_codecs("qvo", 2, 1) == ["e4m3"] * 3 and wire_codecs("qvo", 1, 2) == []
    assert wire_codecs("qvo,k,ring_kv", 2, 2) == ["e4m3"] * 6
    assert math.isclose(wire_bound(dict(fp8="qvo=int8,k=int8", ulysses=2, ring=1)), 2e-2)
    assert math.isclose(wire_bound(dict(fp8="qvo,k", ulysses=2, ring=2)), 3e-2 * 2)
