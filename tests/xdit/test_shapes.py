"""The one-process answer at every shape: xfuser 0.7.0's own wrappers with fastusp vs the plain diffusers model.

Each spawned job (gloo, fp32) builds every family's tiny random transformer (:mod:`fastusp_xdit.xdit.tiny_models`)
and xfuser's sequence-parallel wrapper holding the same weights, runs the plain model in the process
itself (the 1-process reference) and the wrapper under ``--attention_backend fastusp``, at a shape whose
token counts divide the degree and at ones that do not (xfuser zero-pads, ``torch.chunk``s unevenly,
replicates odd FLUX.1 text, or lacks ``_pad_to_sp_divisible``; :mod:`fastusp_xdit.xdit.model_fixes`).
A control drops half of every rank's keys and must miss the bound. One job per parallel configuration.
Stock xfuser at the same shapes: ``benchmarks/shapes.py`` (it drops the connection on uneven chunks).
"""
from __future__ import annotations

import pytest

from fastusp_xdit.apps.launch import run_distributed
from shapes_job import shapes_job

TOL = 1e-4  # measured: <= 3e-7 at every case (fp32)

CASES = [("wan", "even"), ("wan", "odd"), ("wan", "odd7"),
         ("flux2", "even"), ("flux2", "odd"), ("flux2", "odd_text"), ("flux2", "odd_both"),
         ("qwen", "even"), ("qwen", "odd"),
         ("hunyuan_video", "even"), ("hunyuan_video", "odd"), ("hunyuan_video", "odd_text"),
         ("flux1_runner", "even"), ("flux1_runner", "odd_text"), ("flux1_runner", "odd"), ("flux1_runner", "odd_both")]


def _check(res, where):
    bad = {case: err for case, err in res.items() if case != "control" and not (isinstance(err["fastusp"], float)
                                                                               and err["fastusp"] <= TOL)}
    assert not bad, f"{where}: fastusp vs 1 process: {bad}"
    assert res["control"] > 100 * TOL, f"{where}: the control (half the keys dropped) passed: {res['control']}"


@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2)])
def test_shapes_match_single_process(ulysses, ring):
    res = run_distributed(shapes_job, ulysses * ring, CASES, ulysses, ring, ("fastusp",), True, timeout=240)[0]
    _check(res, f"ulysses {ulysses} ring {ring}")


@pytest.mark.slow
@pytest.mark.parametrize("ulysses,ring", [(3, 1), (1, 3), (2, 2)])
def test_shapes_match_single_process_slow(ulysses, ring):
    res = run_distributed(shapes_job, ulysses * ring, CASES, ulysses, ring, ("fastusp",), True, timeout=480)[0]
    _check(res, f"ulysses {ulysses} ring {ring}")


def test_chunk_sizes_is_torch_chunk():
    import torch

    from fastusp_xdit.layout import chunk_sizes, padded_chunk_real

    for total in range(0, 30):
        for parts in range(1, 9):
            got = [c.shape[0] for c in torch.chunk(torch.zeros(total), parts)]
            assert chunk_sizes(total, parts) == got + [0] * (parts - len(got)), (total, parts)
            pad = (parts - total % parts) % parts
            held = [c.shape[0] for c in torch.chunk(torch.zeros(total + pad), parts)]
            h, real = padded_chunk_real(total, parts)
            if total:
                assert h == held and sum(real) == total, (total, parts)
