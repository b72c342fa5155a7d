"""The pipelined ring on one device: FastUSP's own ``steps.ring`` with the transfer replaced by a local one.

One process plays ring rank ``rank`` of ``R``: the blocks it would receive are the other blocks in
ring order, in the wire form the ring sends (FP8-encoded with ``ring_kv``). Everything else is the
production path: step schedule, decode, per-block attention with LSE, fp32 merge (the fused Triton
kernel on CUDA). This is as far as one device takes "CUDA graphs with ring > 1": the capture and
replay of the ring's compute under ``torch.compile(mode="reduce-overhead")``; the NCCL transfer
itself is captured in tests/test_usp_nccl.py on two GPUs.
"""
import pytest
import torch

from fastusp_xdit import layout
from fastusp_xdit.comm.codecs import WireSpec
from fastusp_xdit.ops import select_backend
from fastusp_xdit.usp import steps
from fastusp_xdit.usp.spec import CallSpec
from fastusp_xdit.usp.verify import reference_attention


def emulated_ring(q, k, v, ring: int, rank: int, fp8=None):
    """Ring rank ``rank``'s output (B, H, S, D) of full-length ``q`` against K/V split in ``ring`` blocks."""
    sizes = layout.split_sizes(k.shape[2], ring)
    tm = steps.token_major
    kv = [steps.own_block([tm(kb)], [tm(vb)]) for kb, vb in zip(k.split(sizes, 2), v.split(sizes, 2))]
    spec = CallSpec(None, None, 1, ring, 0, rank, (q.shape[2],), (sizes[rank],), (q.shape[1],), (k.shape[1],), (0,),
                    (0,), tuple(sizes), 0, 0, True, scale=None, backend=select_backend(q, k), wire=WireSpec.of(fp8),
                    head_groups=1)
    received = [steps.ring_encode(kv[(rank - step) % ring], spec) for step in range(1, ring)]
    out = steps.ring(tm(q), [kv[rank], kv[rank]], spec, shift=lambda x, rows, group: received.pop(0))
    return out.permute(1, 2, 0, 3)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("ring,rank,fp8", [(2, 1, None), (3, 2, None), (3, 0, "qvo,k,ring_kv")])
def test_emulated_ring_compiles_whole_and_matches_reference(ring, rank, fp8, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 3, n, 16, generator=g) for n in (7, 11, 11))
    eager = emulated_ring(q, k, v, ring, rank, fp8)
    tol = 5e-2 if fp8 else 1e-5  # one e4m3 round trip of K and V: ~2.6% rms each (README)
    assert _rel(eager, reference_attention(q, k, v)) <= tol, f"seed={seed}"
    explain = torch._dynamo.explain(emulated_ring)(q, k, v, ring, rank, fp8)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    compiled = torch.compile(emulated_ring, fullgraph=True, backend="aot_eager")(q, k, v, ring, rank, fp8)
    assert _rel(compiled, eager) <= 1e-6, f"seed={seed}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("ring,fp8", [(2, None), (4, None), (2, "qvo,k,ring_kv")])
def test_emulated_ring_replays_under_cuda_graphs(ring, fp8, seed):
    """Capture once, replay on fresh inputs: equal to eager each time, and no CUDA-graph skip."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(emulated_ring, fullgraph=True, mode="reduce-overhead")
    g = torch.Generator(device="cuda").manual_seed(seed)
    for i in range(4):  # warm-up, record, two replays on new data
        q, k, v = (torch.randn(1, 24, 1024, 128, device="cuda", generator=g).bfloat16() for _ in range(3))
        got = compiled(q, k, v, ring, ring - 1, fp8).clone()
        want = emulated_ring(q, k, v, ring, ring - 1, fp8)
        assert _rel(got, want) <= 2e-2, f"call {i}, seed={seed}"
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
