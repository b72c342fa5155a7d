"""The equivalence suites on GPUs over NCCL (run on a lent multi-GPU machine; skipped elsewhere)."""
import pytest
import torch

from fastusp_xdit.apps.launch import run_distributed
from fastusp_xdit.usp.verify import run_cases

import test_usp
import test_usp_fp8
import test_usp_staged

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")


def _on_cuda(cases):
    return [dict(c, device="cuda") for c in cases]


def test_usp_nccl_matches_reference(seed):
    cases = _on_cuda(test_usp.random_cases(2, seed, 6))
    flux = dict(batch=1, heads=24, kv_heads=24, seq_q=4096, seq_kv=4096, head_dim=128, dtype="bfloat16",
                joint="front", joint_len=512, seed=seed, device="cuda")
    cases += [dict(flux, ulysses=2, ring=1), dict(flux, ulysses=1, ring=2)]
    test_usp._check(run_distributed(run_cases, 2, cases, backend="nccl", timeout=300), seed)


def test_usp_fp8_nccl(seed):
    cases = _on_cuda(test_usp_fp8._cases([(2, 1), (1, 2)], seed, compile_one=True))
    test_usp_fp8._check(run_distributed(run_cases, 2, cases, backend="nccl", timeout=300), seed)


def test_cuda_graphs_with_ring_and_ulysses(seed):
    """torch.compile(mode="reduce-overhead") captures and replays USP, ring included, equal to eager."""
    base = dict(batch=1, heads=8, kv_heads=8, seq_q=1024, seq_kv=1024, head_dim=128, dtype="bfloat16", joint="front",
                joint_len=64, seed=seed, device="cuda", compile=True, compile_mode="reduce-overhead")
    cases = [dict(base, ulysses=2, ring=1), dict(base, ulysses=1, ring=2), dict(base, ulysses=1, ring=2, fp8="qvo,k,ring_kv")]
    per_rank = run_distributed(run_cases, 2, cases, backend="nccl", timeout=300)
    for rank, results in enumerate(per_rank):
        for res in results:
            assert res["graph_breaks"] == 0 and res["compile_err"] <= 2e-2, f"rank {rank} seed={seed}: {res}"


def test_staged_nccl_with_cuda_graphs(seed):
    """usp_attention_staged over NCCL equals usp_attention, issues in the staged order, and replays under
    CUDA graphs (mode="reduce-overhead", Inductor) equal to eager."""
    rng = test_usp_staged.random.Random(seed)
    cases = [test_usp_staged._case(rng, u, r, device="cuda", dtype="bfloat16", fp8=fp8, compile=True,
                                   compiler="inductor", compile_mode="reduce-overhead")
             for u, r in ((2, 1), (1, 2)) for fp8 in (None, "qvo,k")]
    for rank, results in enumerate(run_distributed(test_usp_staged.staged_worker, 2, cases, backend="nccl",
                                                   timeout=300)):
        for case, res in zip(cases, results):
            order = test_usp_staged._expected_events(case["ulysses"])
            assert res["equal"] and res["events"] == order, (rank, res, case)
            assert res["breaks"] == 0 and res["compile_err"] <= 2e-2, f"rank {rank} seed={seed}: {res} {case}"
