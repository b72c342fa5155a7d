"""Randomized distributed fuzzing of ``usp_attention`` against the single-process float64 reference.

A seeded generator (fresh seed per run, printed in every failure; ``FASTUSP_TEST_SEED=<seed>``
replays it) draws cases over world sizes 2-8 and every ``ulysses x ring`` factorization of each:
odd and zero lengths (also shorter than the world), odd head counts, GQA, joint text front/rear
(also with no other key), batch 1-3, fp32/bf16, head_dim 4-16, Sq != Skv, and for bf16 FP8
communication with a random spec among ``qvo`` / ``qvo,k`` / ``qvo,k,ring_kv``, and 1-5 pipelined
head groups (capped by the heads per Ulysses rank). Each rank compares
its output rows with the reference at the tolerances of ``test_usp`` (max error relative to the
largest element of the whole reference output: 1e-5 fp32, 1e-2 bf16); FP8 cases compare with the same run without FP8
at ``test_usp_fp8``'s bound (Frobenius, 3e-2 per FP8 tensor on the path, in quadrature). Workers
run with ``FASTUSP_CHECK_CONSISTENCY=1``, so the cross-rank check sees every case (no false alarm).

Cases of one world size share one spawned job (spawning costs ~5 s). The default run draws 12 cases
over two world sizes (one of 2-4, one of 5-8, drawn per run); ``-m slow`` runs 30 per world size
(210 cases).
"""
import os
import random

import pytest
from test_usp import TOL
from test_usp_fp8 import PER_TENSOR, fp8_tensors_on_path

from fastusp_xdit.apps.launch import run_distributed
from fastusp_xdit.usp.verify import run_cases

FP8_SPECS = ("qvo", "qvo,k", "qvo,k,ring_kv")
SLOW_PER_WORLD = 30
DEFAULT_CASES = 12


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _length(rng: random.Random, sp: int, allow_zero: bool) -> int:
    """Mostly a few tokens per rank (odd totals), sometimes fewer tokens than ranks, rarely none."""
    roll = rng.random()
    if allow_zero and roll < 0.05:
        return 0
    if roll < 0.25:
        return rng.randint(1, max(1, sp - 1))
    return rng.randint(sp, 4 * sp + 5)


def draw_case(rng: random.Random, ulysses: int, ring: int) -> dict:
    """One random case for a ``ulysses x ring`` world (a :mod:`fastusp_xdit.usp.verify` case dict)."""
    sp = ulysses * ring
    heads = rng.randint(ulysses, ulysses + 4)
    joint = rng.choice([None, "front", "rear"])
    dtype = rng.choice(["float32", "bfloat16"])
    fp8 = rng.choice(FP8_SPECS) if dtype == "bfloat16" and rng.random() < 0.5 else None
    return dict(ulysses=ulysses, ring=ring, batch=rng.randint(1, 3), heads=heads,
                kv_heads=rng.choice(_divisors(heads)), seq_q=_length(rng, sp, True),
                seq_kv=_length(rng, sp, joint is not None), head_dim=rng.choice([8, 16] if fp8 else [4, 6, 8, 16]),
                dtype=dtype, joint=joint, joint_len=rng.randint(1, 5) if joint else 0, fp8=fp8,
                head_groups=rng.choice([1, 1, 2, 3, 5]), seed=rng.randrange(2**31))


def cases_for_world(rng: random.Random, world: int, count: int) -> list[dict]:
    """``count`` cases cycling through every factorization of ``world``."""
    shapes = [(u, world // u) for u in _divisors(world)]
    return [draw_case(rng, *shapes[i % len(shapes)]) for i in range(count)]


def fuzz_worker(cases: list) -> list:
    os.environ["FASTUSP_CHECK_CONSISTENCY"] = "1"
    return run_cases(cases)


def _failures(per_rank: list) -> list[str]:
    failures = []
    for rank, results in enumerate(per_rank):
        for res in results:
            case = res["case"]
            if case["fp8"]:
                n = fp8_tensors_on_path(case)
                bound = PER_TENSOR * n**0.5 if n else 1e-6
                if not res["fp8_vs_raw"] <= bound:
                    failures.append(f"rank {rank}: FP8 error {res['fp8_vs_raw']:.4f} > {bound:.4f} for {case}")
            elif not res["err"] <= TOL[case["dtype"]]:
                failures.append(f"rank {rank}: error {res['err']:.3g} > {TOL[case['dtype']]} for {case}")
    return failures


def _run(world: int, cases: list, seed: int, timeout: float):
    failures = _failures(run_distributed(fuzz_worker, world, cases, timeout=timeout))
    assert not failures, (f"seed={seed} (replay: FASTUSP_TEST_SEED={seed}), world {world}, "
                          f"{len(failures)} failures:\n" + "\n".join(failures))


def test_fuzz_sample(seed):
    """20 fresh cases over two world sizes drawn per run."""
    rng = random.Random(seed)
    worlds = [rng.choice([2, 3, 4]), rng.choice([5, 6, 7, 8])]
    counts = [DEFAULT_CASES // 2, DEFAULT_CASES - DEFAULT_CASES // 2]
    for world, count in zip(worlds, counts):
        _run(world, cases_for_world(rng, world, count), seed, timeout=60 + 15 * world)


@pytest.mark.slow
@pytest.mark.parametrize("world", range(2, 9))
def test_fuzz_world(world, seed):
    rng = random.Random(seed * 16 + world)
    _run(world, cases_for_world(rng, world, SLOW_PER_WORLD), seed, timeout=120 + 40 * world)
